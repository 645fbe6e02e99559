"""What a new analysis leaves out, and the check that nothing it keeps still needs it.

A new analysis is an analysis, not a template: it carries neither the template's own tooling
(this tool, the benchmarks under ``tools/``, the scripts that run them, their tests and this
tool's guide) nor the files of the examples it does not keep (``examples.EXAMPLE_FILES``).
The README, the Makefile, CI and ``pyproject.toml`` are rewritten without them (``metadata``);
``find_dangling`` then reads every kept file:

- a Python import of a left-out module, a ``_target_`` naming one, a Python string (not a
  docstring) naming a left-out file, or a line of the README, Makefile, CI or
  ``pyproject.toml`` naming one is an error: the new analysis would fail or point at nothing;
- any other mention (a comment, a docstring, prose in ``docs/``) is a note for the user.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

from tools.new_analysis.rename import read_text

# The template's own tooling, in template paths (a folder ends with "/").
TEMPLATE_ONLY = (
    "tools/",
    "scripts/new_analysis.py",
    "scripts/benchmark.py",
    "tests/test_fork.py",
    "tests/test_benchmarks.py",
    "docs/new-analysis.md",
)
# Requirements only the template's tooling needs: tests/test_fork.py reads TOML on Python 3.10.
TEMPLATE_ONLY_REQUIREMENTS = ("tomli",)
# Files whose every line is checked strictly: what builds, tests and describes the analysis.
_STRICT_FILES = ("README.md", "Makefile", "pyproject.toml", ".ci/", ".github/")


@dataclass(frozen=True)
class LeftOut:
    """What a new analysis does not carry: ``paths`` (relative, in the new analysis's names;
    a folder ends with ``/``) and the importable ``modules`` among them."""

    paths: tuple[str, ...]
    modules: tuple[str, ...]

    @classmethod
    def of(cls, paths: list[str] | tuple[str, ...], package: str) -> LeftOut:
        """The left-out ``paths`` (already renamed to the new ``package``) and their modules:
        ``src/<package>/a/b.py`` is ``<package>.a.b``, ``tools/x/y.py`` is ``tools.x.y``."""
        modules = []
        for path in paths:
            if path.startswith(f"src/{package}/"):
                path = path[len("src/") :]
            elif not path.startswith("tools/"):
                continue
            if path.endswith("/"):
                modules.append(path.rstrip("/").replace("/", "."))
            elif path.endswith(".py"):
                modules.append(path.removesuffix(".py").removesuffix("/__init__").replace("/", "."))
        return cls(tuple(paths), tuple(dict.fromkeys(modules)))

    def names(self) -> tuple[str, ...]:
        """How a text names them: a folder by its path (``tools/``), a file by its file name
        (``benchmark.py``, which also matches ``scripts/benchmark.py``)."""
        return tuple(p if p.endswith("/") else p.rsplit("/", 1)[-1] for p in self.paths)

    def pattern(self) -> re.Pattern[str] | None:
        """Matches a mention of any of them in text, or None when nothing is left out."""
        alternatives = [re.escape(n) for n in self.names()]
        alternatives += [re.escape(m) + r"(?![\w])" for m in self.modules if "." in m]
        if not alternatives:
            return None
        return re.compile(rf"(?<![\w.\-])(?:{'|'.join(alternatives)})")

    def is_module(self, module: str) -> bool:
        """Whether importing ``module`` needs something left out."""
        return any(module == m or module.startswith(f"{m}.") for m in self.modules)


def find_dangling(root: Path, files: list[str], left: LeftOut) -> tuple[list[str], list[str]]:
    """``(errors, notes)``: the kept files' references to what ``left`` leaves out, each as
    ``"path:line: text"``; see the module docstring for which is which."""
    mention = left.pattern()
    errors: list[str] = []
    notes: list[str] = []
    if mention is None:
        return errors, notes
    for rel in files:
        text = read_text(root / rel)
        if text is None:
            continue
        strict = rel in _STRICT_FILES or rel.startswith(_STRICT_FILES)
        code: set[int] = set()
        if rel.endswith(".py"):
            errors += _python_errors(rel, text, left, mention, code)
        for lineno, line in enumerate(text.splitlines(), 1):
            if lineno in code:
                continue
            target = re.match(r"^\s*_target_\s*:\s*([\w.]+)", line)
            if target and left.is_module(target.group(1)):
                errors.append(f"{rel}:{lineno}: {line.strip()[:120]}")
            elif mention.search(line):
                (errors if strict else notes).append(f"{rel}:{lineno}: {line.strip()[:120]}")
    return errors, notes


def _python_errors(
    rel: str, text: str, left: LeftOut, mention: re.Pattern[str], lines: set[int]
) -> list[str]:
    """Imports of left-out modules and non-docstring strings naming left-out files; the lines
    reported are added to ``lines`` (so they are not reported again as notes)."""
    try:
        tree = ast.parse(text, filename=rel)
    except SyntaxError:
        return []
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                docstrings.add(id(body[0].value))
    found = []
    for node in ast.walk(tree):
        bad = None
        if isinstance(node, ast.Import):
            bad = next((a.name for a in node.names if left.is_module(a.name)), None)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            bad = node.module if left.is_module(node.module) else None
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
            and mention.search(node.value)
        ):
            bad = node.value
        if bad is not None:
            line = text.splitlines()[node.lineno - 1].strip()
            found.append(f"{rel}:{node.lineno}: {line[:120]}")
            lines.add(node.lineno)
    return found
