"""The new analysis's own identity in ``pyproject.toml`` and the README."""

from __future__ import annotations

import json
import re

from tools.new_analysis.errors import ForkError
from tools.new_analysis.names import Author

_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
START_SECTION = "Start a new analysis"


def _toml_string(value: str) -> str:
    # A JSON string of printable text is a valid TOML basic string.
    return json.dumps(value, ensure_ascii=False)


def rewrite_pyproject(text: str, distribution: str, title: str, author: Author) -> str:
    """Set ``name``, ``version``, ``description`` and ``authors`` of the ``[project]`` table.

    Raises ``ForkError`` if the file has no ``[project]`` table with a ``name``.
    """
    values = {
        "name": _toml_string(distribution),
        "version": _toml_string("0.1.0"),
        "description": _toml_string(title),
        "authors": f"[{{ name = {_toml_string(author.name)}, email = {_toml_string(author.email)} }}]",
    }
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    table = ""
    seen: set[str] = set()
    skipping = 0  # open brackets of a multi-line value being replaced
    for line in lines:
        if skipping:
            skipping += line.count("[") - line.count("]")
            continue
        header = _HEADER.match(line)
        if header:
            table = header.group(1).replace(" ", "")
            out.append(line)
            continue
        key = re.match(r"^(\w+)\s*=", line)
        if table == "project" and key and key.group(1) in values:
            name = key.group(1)
            seen.add(name)
            out.append(f"{name} = {values[name]}\n")
            value = line.split("=", 1)[1]
            skipping = max(value.count("[") - value.count("]"), 0)
            continue
        out.append(line)
    if "name" not in seen:
        raise ForkError("pyproject.toml has no [project] table with a name; is this the template?")
    return "".join(out)


def rewrite_readme(text: str, title: str, template_only: tuple[str, ...] = ()) -> str:
    """Retitle the README and drop what belongs to the template's tooling for new analyses:
    the "Start a new analysis" section, and list items or code lines (a layout tree) that
    name one of the ``template_only`` paths."""
    lines = text.splitlines(keepends=True)
    for i, line in enumerate(lines):
        if line.startswith("# "):
            lines[i] = f"# {title}\n"
            break
    else:
        lines.insert(0, f"# {title}\n\n")
    names = [_basename(p) for p in template_only]
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
        if skip_level:
            continue
        listed = fence or re.match(r"^\s*[-*+]\s", line)
        if listed and not fence_line and any(n in line for n in names):
            continue
        out.append(line)
    return "".join(out)


def _basename(path: str) -> str:
    """``scripts/new_analysis.py`` -> ``new_analysis.py``; ``src/project/fork/`` -> ``fork/``."""
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return f"{name}/" if path.endswith("/") else name


def mentions(text: str, paths: tuple[str, ...]) -> list[str]:
    """The ``paths`` whose file or folder name ``text`` still contains."""
    return [p for p in paths if _basename(p) in text]
