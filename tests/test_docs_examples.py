"""The examples of docs/*.md, run as written, so the documentation cannot drift from the code.

A fenced block preceded by ``<!-- test: run -->`` is executed; one preceded by
``<!-- test: write PATH -->`` is written to ``PATH`` first (a config the next blocks compose).
Each document runs top to bottom in one namespace, from a scratch copy of the repository's
``configs/`` (so written configs never touch the real one), with ``../shared/data`` beside it
as beside the real checkout.
"""

from __future__ import annotations

import re
import shutil
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
from hydra.core.global_hydra import GlobalHydra

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SHARED = ROOT.parent / "shared"
# The documents that must each carry at least one tested example.
GUIDES = ("add-a-data-source.md", "add-a-model.md", "add-an-experiment.md")
_STEP = re.compile(
    r"^<!--\s*test:\s*(?P<kind>run|write)(?:\s+(?P<target>\S+))?\s*-->\s*\n"
    r"(?P<fence>```|~~~)(?P<lang>[\w-]*)\n(?P<body>.*?)^(?P=fence)\s*$",
    re.M | re.S,
)


@dataclass(frozen=True)
class Step:
    """One tagged block of a document."""

    kind: str
    target: str | None
    lang: str
    code: str
    line: int  # line of the first code line in the document


def doc_steps(path: Path) -> list[Step]:
    """The tagged blocks of ``path``, in order."""
    text = path.read_text()
    steps = []
    for m in _STEP.finditer(text):
        line = text.count("\n", 0, m.start("body")) + 1
        steps.append(Step(m["kind"], m["target"], m["lang"], m["body"], line))
    return steps


def documents() -> list[str]:
    """Names of the documents with tagged examples."""
    return sorted(p.name for p in DOCS.glob("*.md") if doc_steps(p))


def test_every_guide_has_tested_examples() -> None:
    for name in GUIDES:
        steps = doc_steps(DOCS / name)
        assert any(s.kind == "run" and s.lang == "python" for s in steps), name


@pytest.mark.filterwarnings("ignore:.*deprecated:FutureWarning")  # torch.jit, in the model guide
@pytest.mark.parametrize("name", documents())
def test_doc_examples_run(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = DOCS / name
    steps = doc_steps(path)
    if any("shared" in s.code for s in steps) and not (SHARED / "data").is_dir():
        pytest.skip(f"{name} reads ../shared/data, which is not beside {ROOT}")
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "configs", repo / "configs")
    if SHARED.is_dir():
        (tmp_path / "shared").symlink_to(SHARED, target_is_directory=True)
    monkeypatch.chdir(repo)
    monkeypatch.setenv("PROJECT_ROOT", str(repo))
    # A real module, so a class defined in an example can be a _target_ (f"{__name__}.Net").
    module = types.ModuleType(f"docs_{path.stem.replace('-', '_')}")
    module.__file__ = str(path)
    monkeypatch.setitem(sys.modules, module.__name__, module)
    try:
        for step in steps:
            if step.kind == "write":
                assert step.target, f"{name}:{step.line}: 'test: write' needs a path"
                target = repo / step.target
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(step.code)
            else:
                assert step.lang == "python", f"{name}:{step.line}: only python blocks can run"
                # Padded so tracebacks give the line numbers of the document.
                code = compile("\n" * (step.line - 1) + step.code, str(path), "exec")
                exec(code, module.__dict__)
    finally:
        GlobalHydra.instance().clear()
