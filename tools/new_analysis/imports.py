"""Keep import blocks in isort order after the package is renamed.

``from project...`` sorts before ``from tests...``; ``from tthml...`` sorts after it. A block of
imports that was sorted under the old name is re-sorted under the new one, statement by
statement and otherwise unchanged, so the new analysis passes ``ruff check`` (rule I001)
whenever the template did. Blocks that were not sorted before, or that hold comments,
relative imports or several statements on one line, are left as they are.
"""

from __future__ import annotations

import ast
import itertools


def _key(node: ast.stmt, rename: tuple[str, str] | None) -> tuple[int, str]:
    """isort's order within a section: ``import x`` lines first, then ``from x import``,
    each by module name, case-insensitively; ``rename`` maps a root package back."""
    name = node.names[0].name if isinstance(node, ast.Import) else node.module or ""
    if rename:
        new, old = rename
        root, dot, rest = name.partition(".")
        name = old + dot + rest if root == new else name
    return (isinstance(node, ast.ImportFrom), name.lower())


def _sortable(node: ast.stmt) -> bool:
    if isinstance(node, ast.Import):
        return len(node.names) == 1
    return isinstance(node, ast.ImportFrom) and node.level == 0


def _runs(body: list[ast.stmt]) -> list[list[ast.stmt]]:
    """Maximal runs of import statements on consecutive lines (one isort section each)."""
    # A statement sharing a line with its neighbour (``import a; import b``) stays put.
    shared = set()
    for a, b in itertools.pairwise(body):
        if b.lineno <= a.end_lineno:
            shared |= {id(a), id(b)}
    runs: list[list[ast.stmt]] = []
    current: list[ast.stmt] = []
    for node in body:
        ok = _sortable(node) and id(node) not in shared
        if ok and current and node.lineno == current[-1].end_lineno + 1:
            current.append(node)
            continue
        if len(current) > 1:
            runs.append(current)
        current = [node] if ok else []
    if len(current) > 1:
        runs.append(current)
    return runs


def resort_imports(text: str, old: str, new: str) -> str:
    """Re-sort, under the name ``new``, the import runs of ``text`` (already renamed) that
    were sorted under ``old``."""
    if new not in text:
        return text
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return text
    lines = text.splitlines(keepends=True)
    edits: list[tuple[int, int, list[str]]] = []
    for node in ast.walk(tree):
        for field in ("body", "orelse", "finalbody"):
            body = getattr(node, field, None)
            if not isinstance(body, list):
                continue
            for run in _runs(body):
                before = [_key(n, (new, old)) for n in run]
                after = sorted(run, key=lambda n: _key(n, None))
                if before != sorted(before) or after == run:
                    continue
                start, end = run[0].lineno - 1, run[-1].end_lineno
                pieces = [lines[n.lineno - 1 : n.end_lineno] for n in after]
                edits.append((start, end, [line for piece in pieces for line in piece]))
    for start, end, new_lines in sorted(edits, reverse=True):
        lines[start:end] = new_lines
    return "".join(lines)
