"""The new analysis's own identity in ``pyproject.toml`` and the README, without what it
leaves out (``leftout``)."""

from __future__ import annotations

import json
import re

from tools.new_analysis.errors import ForkError
from tools.new_analysis.names import Author, normalize_distribution

_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
START_SECTION = "Start a new analysis"


def _toml_string(value: str) -> str:
    # A JSON string of printable text is a valid TOML basic string.
    return json.dumps(value, ensure_ascii=False)


def rewrite_pyproject(
    text: str,
    distribution: str,
    title: str,
    author: Author,
    drop_extras: tuple[str, ...] | list[str] = (),
    drop_requirements: tuple[str, ...] | list[str] = (),
    drop_folders: tuple[str, ...] | list[str] = (),
) -> str:
    """Set ``name``, ``version``, ``description`` and ``authors`` of the ``[project]`` table,
    and leave out what the new analysis does not carry.

    ``drop_extras`` are removed from ``[project.optional-dependencies]`` with the comment
    lines right above them; ``drop_requirements`` (distribution names) from every dependency
    list; ``drop_folders`` (``tools``) from the lists of the ``[tool.*]`` tables (ruff's
    ``src``). Raises ``ForkError`` if the file has no ``[project]`` table with a ``name``.
    """
    values = {
        "name": _toml_string(distribution),
        "version": _toml_string("0.1.0"),
        "description": _toml_string(title),
        "authors": f"[{{ name = {_toml_string(author.name)}, email = {_toml_string(author.email)} }}]",
    }
    dropped = {normalize_distribution(r) for r in drop_requirements}
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    table = ""
    seen: set[str] = set()
    skipping = 0  # open brackets of a multi-line value being replaced or dropped
    for line in lines:
        if skipping:
            skipping += line.count("[") - line.count("]")
            continue
        header = _HEADER.match(line)
        if header:
            table = header.group(1).replace(" ", "")
            out.append(line)
            continue
        key = re.match(r"^([\w-]+)\s*=", line)
        value = line.split("=", 1)[1] if key else ""
        if table == "project" and key and key.group(1) in values:
            name = key.group(1)
            seen.add(name)
            out.append(f"{name} = {values[name]}\n")
            skipping = max(value.count("[") - value.count("]"), 0)
            continue
        if table == "project.optional-dependencies" and key and key.group(1) in drop_extras:
            while out and out[-1].lstrip().startswith("#"):
                out.pop()
            skipping = max(value.count("[") - value.count("]"), 0)
            continue
        requirement = re.match(r"^\s*[\"']([A-Za-z0-9][A-Za-z0-9._-]*)", line)
        if requirement and normalize_distribution(requirement.group(1)) in dropped:
            continue
        if table.startswith("tool.") and drop_folders:
            line = _drop_list_items(line, drop_folders)
        out.append(line)
    if "name" not in seen:
        raise ForkError("pyproject.toml has no [project] table with a name; is this the template?")
    return "".join(out)


def _drop_list_items(line: str, items: tuple[str, ...] | list[str]) -> str:
    """``src = ["src", "tools"]`` without ``"tools"``: quoted list items equal to one of
    ``items`` are removed with their comma."""
    for item in items:
        quoted = rf"[\"']{re.escape(item)}/?[\"']"
        line = re.sub(rf",\s*{quoted}(?=\s*[\],])", "", line)
        line = re.sub(rf"(?<=\[)\s*{quoted}\s*,?\s*", "", line)
    return line


def rewrite_readme(text: str, title: str, left_out: tuple[str, ...] = ()) -> str:
    """Retitle the README and drop what belongs to what the new analysis leaves out.

    The "Start a new analysis" section goes; so does every paragraph or list item (with its
    continuation lines) that names one of ``left_out`` (file names such as ``benchmark.py``,
    folders such as ``tools/``, see ``leftout.LeftOut.names``), and the table or code block
    that such a paragraph introduces (ending with ``:``). In other code blocks only the lines
    naming one go, with the lines indented under them (a layout tree's continuation), after a
    name in a comma-separated list (``train.py, benchmark.py``) has been taken out of its list.
    """
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith("# "):
            lines[i] = f"# {title}\n"
            break
    else:
        lines.insert(0, f"# {title}\n\n")
    lines = _without_start_section(lines)
    if not left_out:
        return "".join(lines)
    mention = re.compile(rf"(?<![\w.\-])(?:{'|'.join(re.escape(n) for n in left_out)})")
    out: list[str] = []
    introduced = False  # the previous block, dropped, introduced this one
    for kind, block in _blocks(lines):
        if kind == "blank":
            if not (out and not out[-1].strip()):
                out.append(block[0])
            continue
        table = kind == "para" and block[0].lstrip().startswith("|")
        if introduced and (kind == "fence" or table):
            introduced = False
            continue
        introduced = False
        if kind == "fence":
            out.extend(_fence_without(block, left_out, mention))
        elif any(mention.search(line) for line in block):
            introduced = block[-1].rstrip().endswith(":")
        else:
            out.extend(block)
    return "".join(out)


def _fence_without(
    block: list[str], left_out: tuple[str, ...], mention: re.Pattern[str]
) -> list[str]:
    """A fenced code block without the lines naming what is left out and the lines indented
    under them."""
    out = [block[0]]
    under: int | None = None  # indent of the last dropped line
    for line in block[1:-1] if len(block) > 1 else []:
        if under is not None and line.strip() and _indent(line) > under:
            continue
        under = None
        line = _drop_from_lists(line, left_out)
        if mention.search(line):
            under = _indent(line)
            continue
        out.append(line)
    return [*out, block[-1]] if len(block) > 1 else out


def _without_start_section(lines: list[str]) -> list[str]:
    out: list[str] = []
    skip_level = 0
    fence = False
    for line in lines:
        fence_line = line.lstrip().startswith(("```", "~~~"))
        fence ^= fence_line
        heading = None if fence or fence_line else re.match(r"^(#{2,6})\s+(.*?)\s*#*\s*$", line)
        if heading:
            level = len(heading.group(1))
            if skip_level and level <= skip_level:
                skip_level = 0
            if heading.group(2).strip().lower() == START_SECTION.lower():
                skip_level = level
        if not skip_level:
            out.append(line)
    return out


_LIST_ITEM = re.compile(r"^(\s*)(?:[-*+]|\d+[.)])\s")


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _blocks(lines: list[str]) -> list[tuple[str, list[str]]]:
    """Markdown split into ``(kind, lines)`` blocks: ``blank``, ``heading``, ``fence`` (a fenced
    code block, its fence lines included), ``para`` (a paragraph or a table) or ``item`` (a
    list item with everything indented under it, fenced code and blank lines included)."""
    blocks: list[tuple[str, list[str]]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        if _is_fence(line):
            j = i + 1
            while j < len(lines) and not _is_fence(lines[j]):
                j += 1
            blocks.append(("fence", lines[i : j + 1]))
            i = j + 1
            continue
        item = _LIST_ITEM.match(line)
        if item:
            j, fence = i + 1, False
            while j < len(lines):
                nxt = lines[j]
                if fence or not nxt.strip() or _indent(nxt) > len(item.group(1)):
                    fence ^= _is_fence(nxt)
                    j += 1
                    continue
                break
            while j > i + 1 and not lines[j - 1].strip():
                j -= 1  # trailing blank lines belong to what follows
            blocks.append(("item", lines[i:j]))
            i = j
            continue
        if not line.strip() or line.startswith("#"):
            blocks.append(("blank" if not line.strip() else "heading", [line]))
            i += 1
            continue
        j = i + 1
        while (
            j < len(lines)
            and lines[j].strip()
            and not lines[j].startswith("#")
            and not _LIST_ITEM.match(lines[j])
            and not _is_fence(lines[j])
        ):
            j += 1
        blocks.append(("para", lines[i:j]))
        i = j
    return blocks


def _is_fence(line: str) -> bool:
    return line.lstrip().startswith(("```", "~~~"))


def _drop_from_lists(line: str, names: tuple[str, ...]) -> str:
    """``a.py, b.py, benchmark.py`` without ``benchmark.py`` (and its comma)."""
    for name in names:
        item = rf"`?{re.escape(name)}`?"
        line = re.sub(rf",\s*{item}(?=\s*$|\s*[,)])", "", line)
        line = re.sub(rf"(?<=[\s:(]){item},\s*", "", line)
    return line
