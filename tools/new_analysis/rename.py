"""Rename the template's import package in text, by token rules, and prove none is left.

"project" is also an English word and a TOML table (``[project]`` in ``pyproject.toml``), so
nothing here is a blind search-and-replace. A reference to the package is renamed only where
it has the shape of one:

- a dotted path: ``project.models.MLP`` (a ``_target_``, an import, ``-m project.inference``,
  a name in a docstring);
- an import statement at the start of a line: ``import project``, ``from project import x``;
- ``python -m project``, the string ``"project."`` (a module-name prefix);
- a source path: ``src/project``, ``project/<module>`` where ``<module>`` is one of the
  package's own modules;
- in ``pyproject.toml``, the package's key under ``[tool.setuptools.package-data]`` and quoted
  names in other ``[tool.*]`` tables; ``[project]`` table headers are never touched.

``find_leftovers`` is a separate, stricter check run on the result (imports by ``ast``,
dotted and path references by pattern); creating a new analysis fails if it finds anything.
"""

from __future__ import annotations

import ast
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 has no tomllib; the TOML check then reads lines only
    tomllib = None

_TOML_HEADER = re.compile(r"^\s*\[\[?\s*([^\]]+?)\s*\]\]?\s*(#.*)?$")
_OLD_DISTRIBUTION = re.compile(r"hep[-_.]ml[-_.]template", re.IGNORECASE)


@dataclass(frozen=True)
class Names:
    """Old and new names of the package and the distribution.

    ``modules`` are the old package's top-level modules and subpackages (``data``, ``models``,
    ...): path references ``project/<module>`` are renamed and checked only for these.
    """

    old_package: str
    new_package: str
    old_distribution: str
    new_distribution: str
    modules: tuple[str, ...]


@dataclass
class RenameCount:
    """How many references each rule renamed, over all files."""

    by_rule: dict[str, int] = field(default_factory=dict)
    files: int = 0

    @property
    def total(self) -> int:
        """All renamed references."""
        return sum(self.by_rule.values())

    def add(self, rule: str, n: int) -> None:
        """Count ``n`` more references renamed by ``rule``."""
        if n:
            self.by_rule[rule] = self.by_rule.get(rule, 0) + n


class Renamer:
    """Applies the rules of the module docstring to one file's text at a time."""

    def __init__(self, names: Names) -> None:
        self.names = names
        old = re.escape(names.old_package)
        mods = "|".join(re.escape(m) for m in sorted(names.modules, key=len, reverse=True))
        new = names.new_package
        self.rules: list[tuple[str, re.Pattern[str], str]] = [
            (
                "import statement",
                re.compile(rf"^(\s*(?:>>>\s+|\.\.\.\s+)?from\s+){old}(?=\s+import\b)", re.M),
                rf"\g<1>{new}",
            ),
            (
                "import statement",
                re.compile(
                    rf"^(\s*(?:>>>\s+|\.\.\.\s+)?import\s+){old}(?=\s*$|\s*[,;#]|\s+as\b)", re.M
                ),
                rf"\g<1>{new}",
            ),
            ("dotted path", re.compile(rf"(?<![\w.\-/]){old}(?=\.[A-Za-z_])"), new),
            ("python -m", re.compile(rf"(?<=-m ){old}(?![\w.\-])"), new),
            ("module prefix string", re.compile(rf"(?<=[\"']){old}(?=\.[\"'])"), new),
            ("source path", re.compile(rf"(?<![\w.\-])src/{old}(?![\w\-])"), f"src/{new}"),
            ("package path", re.compile(rf"(?<![\w.\-/]){old}/(?=(?:{mods})\b)"), f"{new}/"),
        ]
        new_dist = names.new_distribution
        self.distribution_rules = [
            ("distribution name", re.compile(re.escape(names.old_distribution)), new_dist),
            (
                "distribution name",
                re.compile(re.escape(names.old_distribution.replace("-", "_"))),
                new_dist.replace("-", "_"),
            ),
        ]

    def rewrite(self, path: str, text: str, count: RenameCount) -> str:
        """Return ``text`` (the content of ``path``, relative to the repository) renamed."""
        toml = path.endswith(".toml")
        out: list[str] = []
        table = ""
        changed = False
        for line in text.splitlines(keepends=True):
            if toml:
                header = _TOML_HEADER.match(line)
                if header:
                    table = header.group(1).replace(" ", "")
                    out.append(line)
                    continue
            new_line = self._rewrite_line(line, count)
            if toml and table.startswith("tool."):
                new_line = self._rewrite_tool_table(new_line, table, count)
            changed |= new_line != line
            out.append(new_line)
        count.files += changed
        return "".join(out)

    def _rewrite_line(self, line: str, count: RenameCount) -> str:
        for rule, pattern, repl in self.rules + self.distribution_rules:
            line, n = pattern.subn(repl, line)
            count.add(rule, n)
        return line

    def _rewrite_tool_table(self, line: str, table: str, count: RenameCount) -> str:
        old, new = re.escape(self.names.old_package), self.names.new_package
        if table.startswith(
            ("tool.setuptools.package-data", "tool.setuptools.exclude-package-data")
        ):
            line, n = re.subn(rf"^(\s*){old}(\s*=)", rf"\g<1>{new}\g<2>", line)
            count.add("pyproject package key", n)
        # Quoted package names in tool settings: packages.find include, ruff first-party...
        line, n = re.subn(rf"(?<=[\"']){old}(?=(?:\*|\.\*)?[\"'])", new, line)
        count.add("pyproject package key", n)
        return line


def find_leftovers(root: Path, files: list[str], names: Names) -> list[str]:
    """Every remaining reference to the old package or distribution in the files under
    ``root``, as ``"path:line: text"``; empty when the rename is complete.

    Stricter than the rename rules: Python imports are read with ``ast``; in every text file
    a dotted ``project.<module>``, a path ``project/<module>`` or ``src/project``, an import
    line, ``-m project`` and the old distribution name count, wherever they stand (only
    ``[project...]`` TOML table headers are exempt).
    """
    old = re.escape(names.old_package)
    mods = "|".join(re.escape(m) for m in names.modules)
    patterns = [
        re.compile(rf"(?<![\w\-]){old}[./](?:{mods})\b"),
        re.compile(rf"\bsrc/{old}\b(?![\-])"),
        re.compile(rf"^\s*(?:>>>\s+)?from\s+{old}(?:\.|\s+import\b)", re.M),
        re.compile(rf"^\s*(?:>>>\s+)?import\s+{old}(?:\.|\s*$|\s*[,;#]|\s+as\b)", re.M),
        re.compile(rf"-m\s+{old}\b"),
        _OLD_DISTRIBUTION,
    ]
    found: list[str] = []
    if (root / "src" / names.old_package).exists():
        found.append(f"src/{names.old_package}: the old package folder is still there")
    for rel in files:
        text = read_text(root / rel)
        if text is None:
            continue
        for lineno, line in enumerate(text.splitlines(), 1):
            if rel.endswith(".toml") and _TOML_HEADER.match(line):
                continue
            if any(p.search(line) for p in patterns):
                found.append(f"{rel}:{lineno}: {line.strip()[:120]}")
        if rel.endswith(".py"):
            found += _python_leftovers(rel, text, names.old_package)
        if rel == "pyproject.toml":
            found += _pyproject_leftovers(text, names)
    return found


def _python_leftovers(rel: str, text: str, old: str) -> list[str]:
    try:
        tree = ast.parse(text, filename=rel)
    except SyntaxError as err:
        return [
            f"{rel}:{err.lineno}: cannot be parsed, so its imports cannot be checked: {err.msg}"
        ]
    found = []
    for node in ast.walk(tree):
        modules: list[str] = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            modules = [node.module]
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and re.fullmatch(rf"{re.escape(old)}\.(\w+(\.\w+)*)?", node.value)
        ):
            modules = [node.value]
        for module in modules:
            if module == old or module.startswith(f"{old}."):
                found.append(f"{rel}:{node.lineno}: imports or names module {module!r}")
    return found


def _pyproject_leftovers(text: str, names: Names) -> list[str]:
    if tomllib is None:
        return []
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        return [f"pyproject.toml: not valid TOML after renaming: {err}"]
    found = []
    project = data.get("project")
    if not isinstance(project, dict) or project.get("name") != names.new_distribution:
        found.append(
            f"pyproject.toml: the [project] table must name the distribution "
            f"{names.new_distribution!r}, found {project and project.get('name')!r}"
        )
    setuptools = data.get("tool", {}).get("setuptools", {})
    for key in ("package-data", "exclude-package-data"):
        if names.old_package in setuptools.get(key, {}):
            found.append(f"pyproject.toml: [tool.setuptools.{key}] still has {names.old_package!r}")
    return found


def read_text(path: Path) -> str | None:
    """The file's text, or ``None`` for a binary (NUL bytes or not UTF-8) or unreadable file."""
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if b"\0" in data:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None
