"""The house's layering: every import runs downwards, and the deploy stage needs no Lightning."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = "project"
# Floors, from the ground up (DESIGN.md). A module may import its own floor's modules and
# any floor below; a package's __main__.py is an entry point (like scripts/) and is exempt.
FLOORS = {
    "contract": 0,
    "utils": 0,
    "data": 1,
    "soa": 1,
    "models": 1,
    "training": 2,
    "deploy": 2,
    "inference": 2,
    "predict": 3,
}


def _room(module: str) -> str | None:
    parts = module.split(".")
    if parts[0] != PACKAGE or len(parts) < 2:
        return None
    return parts[1]


def project_imports(path: Path) -> list[tuple[int, str]]:
    """``(line, module)`` of every import of the package in ``path``, in functions too."""
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith(PACKAGE)]
        elif (
            isinstance(node, ast.ImportFrom)
            and node.module
            and node.level == 0
            and node.module.split(".")[0] == PACKAGE
        ):
            found.append((node.lineno, node.module))
    return found


def modules() -> list[Path]:
    return sorted(p for p in (SRC / PACKAGE).rglob("*.py") if p.name != "__main__.py")


def test_every_room_has_a_floor() -> None:
    rooms = {p.relative_to(SRC / PACKAGE).parts[0].removesuffix(".py") for p in modules()}
    assert rooms - {"__init__", "py"} <= set(FLOORS), sorted(rooms - set(FLOORS))


def test_imports_run_downwards() -> None:
    upward = []
    for path in modules():
        room = path.relative_to(SRC / PACKAGE).parts[0].removesuffix(".py")
        if room not in FLOORS:
            continue
        for line, module in project_imports(path):
            target = _room(module)
            if target is not None and FLOORS[target] > FLOORS[room]:
                upward.append(f"{path.relative_to(SRC)}:{line} imports {module}")
    assert not upward, "\n".join(upward)


def test_no_room_imports_in_a_circle() -> None:
    edges: dict[str, set[str]] = {}
    for path in modules():
        room = path.relative_to(SRC / PACKAGE).parts[0].removesuffix(".py")
        for _, module in project_imports(path):
            target = _room(module)
            if target is not None and target != room:
                edges.setdefault(room, set()).add(target)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in edges.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    circles = sorted(room for room in edges if reaches(room, room, {room}))
    assert not circles, {r: sorted(edges[r]) for r in circles}


def test_inference_imports_only_itself_and_the_contract() -> None:
    outside = []
    for path in sorted((SRC / PACKAGE / "inference").rglob("*.py")):
        if path.name == "__main__.py":
            continue
        for line, module in project_imports(path):
            if _room(module) not in ("inference", "contract"):
                outside.append(f"{path.relative_to(SRC)}:{line} imports {module}")
    assert not outside, "\n".join(outside)


_BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is blocked for this test")
sys.meta_path.insert(0, Block())
"""


@pytest.mark.parametrize(
    ("modules_", "blocked"),
    [
        (
            ["project.deploy.export", "project.deploy.formats", "project.deploy.parity"],
            {"lightning", "torchmetrics", "pytorch_lightning"},
        ),
    ],
)
def test_deploy_imports_without_the_training_stack(modules_: list[str], blocked: set[str]) -> None:
    code = _BLOCKER.format(blocked=sorted(blocked)) + "".join(f"import {m}\n" for m in modules_)
    loaded = f"sorted(m for m in sys.modules if m.split('.')[0] in {sorted(blocked)!r})"
    code += f"import sys; print({loaded})"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip() == "[]"
