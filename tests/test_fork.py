"""scripts/new_analysis.py: a new analysis in a temporary folder, renamed completely, trained
and tested from its own src/ without the template's package, carrying none of the template's
tooling; one without the Pythia jets, free of pythia8mc and fastjet, whose own ``make test``
and ``make demo`` pass (slow); and bad input that writes nothing.
"""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from tools.new_analysis import cli, create
from tools.new_analysis.buildfiles import drop_folder_arguments, rewrite_makefile
from tools.new_analysis.errors import ForkError
from tools.new_analysis.examples import ExamplePlan, available, prune_literals
from tools.new_analysis.imports import resort_imports
from tools.new_analysis.leftout import TEMPLATE_ONLY, LeftOut, find_dangling
from tools.new_analysis.metadata import rewrite_pyproject, rewrite_readme
from tools.new_analysis.names import Author
from tools.new_analysis.rename import Names, RenameCount, Renamer, find_leftovers
from tools.new_analysis.repo import template_files

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser as the tomli package
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "new_analysis.py"
SHARED = ROOT.parent / "shared"
AUTHOR = "A. Physicist <a.physicist@example.org>"
PACKAGE = "tthml"
MODULES = (
    "contract",
    "data",
    "deploy",
    "inference",
    "models",
    "predict",
    "soa",
    "training",
    "utils",
)
PYTHIA = ("pythia8mc", "fastjet")
# A reference to the template's package, wherever it stands (only [project...] TOML headers
# and prose are exempt): independent of the rules in tools/new_analysis/rename.py.
PYTEST = [sys.executable, "-m", "pytest", "-x", "-q", "-m", "not slow", "-p", "no:cacheprovider"]
TRAIN_FAST = [
    "data=toy",
    "trainer=cpu",
    "trainer.max_epochs=1",
    "logger=csv",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
    "test=false",
]
OLD_REFERENCE = re.compile(
    rf"(?<![\w-])project[./](?:{'|'.join(MODULES)})\b|src/project\b|-m project\b"
    r"|^\s*from\s+project(?:\.|\s+import\b)|^\s*import\s+project\s*$|hep[-_]ml[-_]template",
    re.M | re.I,
)


def run_script(args: list[str]) -> subprocess.CompletedProcess:
    """The real command, without a terminal."""
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=120,
    )


def new_args(dest: Path, **changes: str) -> list[str]:
    """Arguments of the command for a new analysis in ``dest``, with ``changes``."""
    values = {
        "--name": "ttH classifier",
        "--package": PACKAGE,
        "--author": AUTHOR,
        "--dest": str(dest),
    }
    values.update({f"--{k.replace('_', '-')}": v for k, v in changes.items()})
    return [x for kv in values.items() for x in kv]


def fork_env(fork: Path, poison: Path) -> dict[str, str]:
    """The new analysis's own src/ first, then a package ``project`` that fails on import: the
    template's package (installed in this environment) must never be reached."""
    env = {k: v for k, v in os.environ.items() if k not in ("PROJECT_ROOT", "HYDRA_FULL_ERROR")}
    env["PYTHONPATH"] = os.pathsep.join([str(fork / "src"), str(poison)])
    env["PYTHONDONTWRITEBYTECODE"] = "1"  # the new analysis stays as created
    return env


def make_analysis(base: Path, *keep: str) -> tuple[Path, subprocess.CompletedProcess]:
    """``(folder, result)``: an analysis made in ``base`` by the real command with the
    ``--keep-...`` arguments ``keep``; ../shared beside it as beside the template."""
    if SHARED.is_dir():
        (base / "shared").symlink_to(SHARED, target_is_directory=True)
    dest = base / PACKAGE
    # --include-untracked: this checkout may hold work not committed yet; a clone has none.
    result = run_script([*new_args(dest), *keep, "--include-untracked"])
    assert result.returncode == 0, result.stderr
    return dest, result


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """One analysis without the transformer model and the hzz and parquet data."""
    base = tmp_path_factory.mktemp("analyses")
    return make_analysis(base, "--keep-models", "mlp,deepsets", "--keep-data", "jets,root")


@pytest.fixture(scope="module")
def fork(made) -> Path:
    return made[0]


@pytest.fixture(scope="module")
def made_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """One analysis that keeps only the root data (and toy, always kept): no Pythia jets."""
    return make_analysis(tmp_path_factory.mktemp("analyses-root"), "--keep-data", "root")


def dependencies(pyproject: dict) -> list[str]:
    """Every requirement of a parsed pyproject.toml, its extras' included."""
    project = pyproject["project"]
    extras = project.get("optional-dependencies", {}).values()
    return [*project["dependencies"], *(r for extra in extras for r in extra)]


@pytest.fixture(scope="module")
def poison(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("poison")
    (path / "project").mkdir()
    (path / "project" / "__init__.py").write_text(
        "raise ImportError('the new analysis imported the template package project')\n"
    )
    return path


def fork_files(fork: Path) -> list[str]:
    out = subprocess.run(["git", "ls-files"], cwd=fork, capture_output=True, text=True, check=True)
    return out.stdout.split()


# --- the new analysis ---------------------------------------------------------------------
def test_prints_what_it_did_and_what_next(made) -> None:
    fork, result = made
    out = result.stdout
    assert f'Created the analysis "ttH classifier" in {fork}' in out
    assert "package       tthml (was project): src/tthml/" in out
    assert "distribution  tth-classifier (was hep-ml-template)" in out
    assert re.search(r"files +\d+ written; \d+ references renamed in \d+ files", out)
    assert "configs/model/transformer.yaml" in out
    assert "configs/data/hzz.yaml" in out
    assert f"cd {fork}" in out
    assert "make test" in out
    assert "kept data example 'toy' as well: the fast tests use it" in result.stderr


def test_no_reference_to_the_template_package_remains(fork: Path) -> None:
    files = fork_files(fork)
    assert not (fork / "src" / "project").exists()
    assert (fork / "src" / PACKAGE / "__init__.py").is_file()
    targets = []
    for rel in files:
        text = (fork / rel).read_text(errors="replace")
        lines = [
            line
            for line in text.splitlines()
            if not (rel.endswith(".toml") and line.startswith("[project"))
        ]
        hits = [line for line in lines if OLD_REFERENCE.search(line)]
        assert not hits, (rel, hits)
        targets += re.findall(r"_target_:\s*([\w.]+)", text) if rel.endswith(".yaml") else []
        if rel.endswith(".py"):
            imports = re.findall(r"^\s*(?:from|import)\s+([\w.]+)", text, re.M)
            assert not [m for m in imports if m.split(".")[0] == "project"], rel
    assert not [t for t in targets if t.split(".")[0] == "project"]
    assert {"tthml.models.MLP", "tthml.data.datamodule.SoADataModule"} <= set(targets)
    names = Names("project", PACKAGE, "hep-ml-template", "tth-classifier", MODULES)
    assert find_leftovers(fork, files, names) == []


def test_pyproject_names_the_analysis_and_keeps_the_project_table(fork: Path) -> None:
    new = tomllib.loads((fork / "pyproject.toml").read_text())
    old = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert new["project"]["name"] == "tth-classifier"
    assert new["project"]["description"] == "ttH classifier"
    assert new["project"]["authors"] == [
        {"name": "A. Physicist", "email": "a.physicist@example.org"}
    ]
    assert new["project"]["dependencies"] == old["project"]["dependencies"]
    assert not [r for r in old["project"]["dependencies"] if r.startswith(PYTHIA)]
    extras, old_extras = (
        new["project"]["optional-dependencies"],
        old["project"]["optional-dependencies"],
    )
    # The Pythia jets are kept, so is their extra; tomli serves only the template's test_fork.py.
    assert extras["pythia"] == old_extras["pythia"]
    assert sorted(p.split(">")[0].split("=")[0] for p in extras["pythia"]) == sorted(PYTHIA)
    assert extras["dev"] == [r for r in old_extras["dev"] if not r.startswith("tomli")]
    assert extras["cluster"] == old_extras["cluster"]
    assert extras.keys() == old_extras.keys()
    package_data = old["tool"]["setuptools"]["package-data"]["project"]
    assert new["tool"]["setuptools"]["package-data"] == {PACKAGE: package_data}
    assert new["tool"]["pytest"] == old["tool"]["pytest"]
    text = (fork / "pyproject.toml").read_text()
    assert "[project]\n" in text
    assert "[project.optional-dependencies]\n" in text


def test_fresh_git_repository_with_one_commit(fork: Path) -> None:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", *args], cwd=fork, capture_output=True, text=True, check=True
        ).stdout.strip()

    assert git("rev-list", "--count", "HEAD") == "1"
    assert git("status", "--porcelain") == ""
    assert git("log", "-1", "--format=%an <%ae>|%cn <%ce>") == f"{AUTHOR}|{AUTHOR}"
    assert git("rev-parse", "--abbrev-ref", "HEAD") == "main"
    assert git("log", "-1", "--format=%s") == "Start ttH classifier"


def test_no_run_outputs_and_no_template_tooling(fork: Path) -> None:
    assert sorted(p.name for p in (fork / "exported").iterdir()) == ["README.md"]
    for name in ("logs", "data", "outputs", "multirun", "build", ".venv"):
        assert not (fork / name).exists(), name
    assert not list(fork.rglob("__pycache__"))
    assert not list(fork.rglob("*.egg-info"))
    files = fork_files(fork)
    for rel in (
        "scripts/new_analysis.py",
        "scripts/benchmark.py",
        "tests/test_fork.py",
        "tests/test_benchmarks.py",
        "docs/new-analysis.md",
    ):
        assert rel not in files
    assert not (fork / "tools").exists()
    assert not [f for f in files if f.startswith("tools/")]
    readme = (fork / "README.md").read_text()
    assert "# ttH classifier\n" in readme
    assert "## Start a new analysis" not in readme
    assert "tests/test_docs_examples.py" in files
    assert "docs/add-a-model.md" in files
    assert "scripts/train.py" in files
    # What builds, tests and describes the analysis names none of it.
    left_out = re.compile(r"new_analysis|new-analysis|benchmark\.py|test_fork|(?<![\w.])tools/")
    for rel in ("README.md", "Makefile", "pyproject.toml", ".ci/run", ".github/workflows/ci.yml"):
        hits = [line for line in (fork / rel).read_text().splitlines() if left_out.search(line)]
        assert not hits, (rel, hits)
    assert ' -e ".[dev,pythia]"' in (fork / "Makefile").read_text()  # the jets are kept


def template_configs(group: str) -> list[str]:
    """Names of the template's ``configs/<group>/*.yaml``."""
    return sorted(p.stem for p in (ROOT / "configs" / group).glob("*.yaml"))


def removed_data(*kept: str) -> str:
    """The ``"data": [...]`` entry of the new analysis's ``REMOVED_EXAMPLES`` when it keeps
    ``kept`` (and toy, always kept)."""
    names = [n for n in template_configs("data") if n not in ("base", "toy", *kept)]
    return '"data": [' + ", ".join(f'"{n}"' for n in names) + "]"


def test_removed_examples(fork: Path) -> None:
    configs = fork / "configs"
    assert sorted(p.stem for p in (configs / "model").glob("*.yaml")) == ["deepsets", "mlp"]
    assert sorted(p.stem for p in (configs / "data").glob("*.yaml")) == [
        "base",
        "jets",
        "root",
        "toy",
    ]
    on_transformer = [
        n
        for n in template_configs("experiment")
        if "/model: transformer" in (ROOT / "configs" / "experiment" / f"{n}.yaml").read_text()
    ]
    assert on_transformer
    assert sorted(p.stem for p in (configs / "experiment").glob("*.yaml")) == [
        n for n in template_configs("experiment") if n not in on_transformer
    ]
    assert "  - data: jets\n" in (configs / "train.yaml").read_text()
    conftest = (fork / "tests" / "conftest.py").read_text()
    expected = (
        f'REMOVED_EXAMPLES = {{\n    {removed_data("jets", "root")},\n    "model": ["transformer"],'
    )
    assert expected in conftest
    # Lists naming every model lose the removed one.
    every_model = re.compile(r'"mlp", "deepsets", "transformer"|"deepsets", "mlp", "transformer"')
    for path in (ROOT / "tests").glob("test_*.py"):
        if every_model.search(path.read_text()) and (fork / "tests" / path.name).is_file():
            assert not every_model.search((fork / "tests" / path.name).read_text()), path.name


def test_fast_tests_pass_from_its_own_src(fork: Path, poison: Path) -> None:
    tests = ["tests/test_contract.py", "tests/test_root_source.py", "tests/test_models.py"]
    result = subprocess.run(
        [*PYTEST, *tests, "tests/test_train.py::test_module_refuses_unfitted_contract"],
        cwd=fork,
        env=fork_env(fork, poison),
        capture_output=True,
        text=True,
        timeout=300,
    )
    tail = result.stdout[-3000:] + result.stderr[-3000:]
    assert result.returncode == 0, tail
    assert re.search(r"\d+ passed", result.stdout), tail
    hzz_case = "hzz" in (ROOT / "tests" / "test_root_source.py").read_text()
    if SHARED.is_dir() and hzz_case:  # the ROOT source tests' hzz case needs the removed config
        assert "needs configs/data/hzz.yaml, removed from this analysis" in result.stdout, tail


def test_trains_with_its_renamed_targets(fork: Path, poison: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "scripts/train.py", *TRAIN_FAST, f"paths.log_dir={tmp_path}"],
        cwd=fork,
        env=fork_env(fork, poison),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (run_dir,) = (tmp_path / "train" / "runs").iterdir()
    resolved = (run_dir / "config.yaml").read_text()
    assert "_target_: tthml.models.MLP" in resolved
    assert "project." not in resolved
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()


# --- a new analysis without the Pythia jets --------------------------------------------------
def demo_recipe(makefile: str) -> list[str]:
    """The command lines of the ``demo`` rule."""
    lines = makefile.splitlines()
    start = lines.index(next(line for line in lines if line.startswith("demo:")))
    recipe = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        recipe.append(line.strip())
    return recipe


def test_without_the_jets_it_carries_no_pythia(made_root) -> None:
    fork, result = made_root
    files = fork_files(fork)
    for rel in (
        f"src/{PACKAGE}/data/sources/pythia.py",
        f"src/{PACKAGE}/data/sources/nsubjettiness.py",
        "tests/test_pythia_source.py",
        "configs/data/jets.yaml",
    ):
        assert rel not in files
    kept = {"configs/data/base.yaml", "configs/data/root.yaml", "configs/data/toy.yaml"}
    assert kept | {f"src/{PACKAGE}/data/sources/root.py"} <= set(files)
    assert "configs/data/contract/jets.yaml" in files  # the toy data's contract
    pyproject = tomllib.loads((fork / "pyproject.toml").read_text())
    assert not [r for r in dependencies(pyproject) if r.startswith(PYTHIA)]
    assert sorted(pyproject["project"]["optional-dependencies"]) == ["cluster", "dev"]
    for rel in files:
        if rel.endswith(".py"):
            imports = re.findall(r"^\s*(?:from|import)\s+([\w.]+)", (fork / rel).read_text(), re.M)
            assert not [m for m in imports if m.split(".")[0] in ("pythia8", "fastjet")], rel
            assert not [m for m in imports if re.search(r"\.(pythia|nsubjettiness)\b", m)], rel
    makefile = (fork / "Makefile").read_text()
    assert ' -e ".[dev]"' in makefile
    assert "pythia" not in makefile.lower()
    assert "  - data: root\n" in (fork / "configs" / "train.yaml").read_text()
    assert "  - override /data: root\n" in (fork / "configs/experiment/mlp.yaml").read_text()
    assert removed_data("root") in (fork / "tests" / "conftest.py").read_text()
    assert "default data  root (the template's default was removed)" in result.stdout
    assert "extras        without pythia" in result.stdout


def test_without_the_jets_make_demo_scores_the_runs_validation_sample(made_root) -> None:
    fork, _ = made_root
    recipe = demo_recipe((fork / "Makefile").read_text())
    assert recipe[0] == "$(BIN)/python scripts/train.py experiment=mlp"
    assert any(line.startswith("$(BIN)/python scripts/export.py") for line in recipe)
    assert recipe[-1].startswith(f"$(BIN)/python -m {PACKAGE}.inference exported/mlp ")
    assert "logs/mlp/runs/*/validation_sample.parquet" in recipe[-1]
    assert not [line for line in recipe if re.search(r"generate\.py|heldout|benchmark", line)]
    # The template's demo has the held-out steps the new analysis replaced.
    template = demo_recipe((ROOT / "Makefile").read_text())
    assert [line for line in template if "scripts/generate.py" in line]


@pytest.mark.slow
def test_without_the_jets_its_own_make_test_and_make_demo_pass(made_root) -> None:
    """The new analysis as its user gets it: ``make test`` creates its .venv from its own
    pyproject.toml (no pythia extra) and runs its fast tests; ``make demo`` trains on root."""
    fork, _ = made_root
    unset = ("PROJECT_ROOT", "HYDRA_FULL_ERROR", "PYTHONPATH", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items() if k not in unset}
    out = {}
    for target in ("test", "demo"):
        result = subprocess.run(
            ["make", target, f"PYTHON={sys.executable}"],
            cwd=fork,
            env=env,
            capture_output=True,
            text=True,
            timeout=3600,
        )
        assert result.returncode == 0, (target, result.stdout[-4000:], result.stderr[-4000:])
        out[target] = result.stdout
    assert re.search(r"\d+ passed", out["test"]), out["test"][-3000:]
    assert (fork / "data" / "demo-scores.parquet").is_file()
    installed = subprocess.run(
        [str(fork / ".venv" / "bin" / "python"), "-c", _INSTALLED],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert installed == ["tth-classifier"]


# Which of the new analysis and the Pythia distributions its environment has.
_INSTALLED = """
import importlib.metadata as m
for name in ("tth-classifier", "pythia8mc", "fastjet"):
    try:
        m.distribution(name)
        print(name)
    except m.PackageNotFoundError:
        pass
"""


# --- bad input: a clear message and nothing written ---------------------------------------


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"package": "1tth"}, "is not a Python identifier"),
        ({"package": "tth-ml"}, "is not a Python identifier"),
        ({"package": "class"}, "is a Python keyword"),
        ({"package": "project"}, "is the template's own package"),
        ({"package": "torch"}, "would shadow the dependency 'torch'"),
        ({"package": "lightning"}, "would shadow the dependency 'lightning'"),
        ({"package": "hydra"}, "would shadow the dependency 'hydra'"),
        ({"package": "json"}, "standard-library module"),
        ({"package": "tests"}, "is a folder of the repository"),
        ({"package": "tools"}, "is a folder of the repository"),
        ({"dist_name": "tth classifier!"}, "not valid (PEP 508)"),
        ({"dist_name": "hep_ml.template"}, "is the template's own"),
        ({"author": "nobody"}, "must look like 'A. Physicist <"),
        ({"keep_models": "mlp,resnet"}, "unknown model example(s) ['resnet']"),
        ({"keep_data": "root,base"}, "['base'] is what every data config builds on"),
    ],
)
def test_bad_input_writes_nothing(
    changes: dict[str, str], message: str, tmp_path: Path, capsys, monkeypatch
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert cli.main(new_args(tmp_path / "new", **changes), template_root=ROOT) == 1
    err = capsys.readouterr().err
    assert message in err
    assert "Nothing was written." in err
    assert list(tmp_path.iterdir()) == []


def test_refuses_a_non_empty_destination(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    dest = tmp_path / "taken"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine\n")
    assert cli.main(new_args(dest), template_root=ROOT) == 1
    assert "exists and is not empty" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["taken"]
    assert [p.name for p in dest.iterdir()] == ["notes.txt"]


def test_refuses_a_destination_inside_the_template(capsys, monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert cli.main(new_args(ROOT / "tthml-inside"), template_root=ROOT) == 1
    assert "is inside the template's checkout" in capsys.readouterr().err
    assert not (ROOT / "tthml-inside").exists()


def test_missing_arguments_without_a_terminal(tmp_path: Path) -> None:
    result = run_script(["--name", "x", "--dest", str(tmp_path / "new")])
    assert result.returncode == 1
    assert "missing --package, --author (no terminal to ask on)" in result.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("step", ["commit_all", "find_leftovers", "find_dangling"])
def test_a_failure_midway_leaves_nothing(step: str, tmp_path: Path, capsys, monkeypatch) -> None:
    def fail(*args, **kwargs):
        if step == "find_leftovers":
            return ["README.md:1: from project.models import MLP"]
        if step == "find_dangling":
            return ["Makefile:28: $(BIN)/python scripts/benchmark.py inference"], []
        raise ForkError("git commit failed")

    monkeypatch.setattr(create, step, fail)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert cli.main([*new_args(tmp_path / "new"), "--include-untracked"], template_root=ROOT) == 1
    assert "Nothing was written." in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []  # neither the folder nor the hidden staging one


def test_asks_on_a_terminal_until_the_answer_is_valid(tmp_path: Path, capsys, monkeypatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    answers = iter(["ttH classifier", "torch", PACKAGE, AUTHOR, str(tmp_path / "new"), "toy", ""])
    monkeypatch.setattr(sys, "stdin", Terminal())
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    assert cli.main(["--include-untracked"], template_root=ROOT) == 0
    out = capsys.readouterr()
    assert "would shadow the dependency 'torch'" in out.err  # asked again
    assert "examples      data: toy; model: " in out.out
    assert "default data  toy" in out.out  # no real data kept: make demo trains on toy
    assert (tmp_path / "new" / "src" / PACKAGE).is_dir()


# --- the rules themselves -------------------------------------------------------------------
NAMES = Names("project", "tthml", "hep-ml-template", "tth-classifier", MODULES)


@pytest.mark.parametrize(
    ("before", "after"),
    [
        ("from project.contract import X", "from tthml.contract import X"),
        ("from project import models", "from tthml import models"),
        ("import project", "import tthml"),
        ("    >>> from project.inference import load", "    >>> from tthml.inference import load"),
        ("_target_: project.models.MLP", "_target_: tthml.models.MLP"),
        ("python -m project.inference EXPORT", "python -m tthml.inference EXPORT"),
        ("python -m project", "python -m tthml"),
        (
            "see src/project/data/ and project/models/mlp.py",
            "see src/tthml/data/ and tthml/models/mlp.py",
        ),
        ('m.startswith("project.")', 'm.startswith("tthml.")'),
        ("pip install hep-ml-template", "pip install tth-classifier"),
        # Not references to the package: left alone.
        ("This is our project. Next", "This is our project. Next"),
        ("the project's data; PROJECT_ROOT", "the project's data; PROJECT_ROOT"),
        ("pyproject.toml and subproject.models", "pyproject.toml and subproject.models"),
        ("git clone https://host/org/project.git", "git clone https://host/org/project.git"),
        ("a project/analysis split", "a project/analysis split"),
        ("from project managers", "from project managers"),
    ],
)
def test_rename_rules(before: str, after: str) -> None:
    assert Renamer(NAMES).rewrite("x.md", before + "\n", RenameCount()) == after + "\n"


def test_rename_pyproject_keeps_the_project_table() -> None:
    before = (
        '[project]\nname = "hep-ml-template"\n\n[project.optional-dependencies]\ndev = []\n\n'
        '[tool.setuptools.package-data]\nproject = ["py.typed"]\n'
        '[tool.ruff.lint.isort]\nknown-first-party = ["project"]\n'
    )
    after = Renamer(NAMES).rewrite("pyproject.toml", before, RenameCount())
    assert after == (
        '[project]\nname = "tth-classifier"\n\n[project.optional-dependencies]\ndev = []\n\n'
        '[tool.setuptools.package-data]\ntthml = ["py.typed"]\n'
        '[tool.ruff.lint.isort]\nknown-first-party = ["tthml"]\n'
    )


def test_leftover_scan_catches_what_rules_missed(tmp_path: Path) -> None:
    (tmp_path / "a.py").write_text('import os\nfrom project import x\nT = "project.models.MLP"\n')
    (tmp_path / "b.yaml").write_text("net:\n  _target_: project.models.MLP\n")
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "tth-classifier"\n')
    found = find_leftovers(tmp_path, ["a.py", "b.yaml", "pyproject.toml"], NAMES)
    assert any(f.startswith("a.py:2:") for f in found)
    assert any(f.startswith("a.py:3:") for f in found)
    assert any(f.startswith("b.yaml:2:") for f in found)
    assert not any(f.startswith("pyproject.toml") for f in found)


def test_prune_literals_drops_removed_examples_only_from_complete_lists() -> None:
    plan = ExamplePlan(
        kept={"data": ["toy"], "model": ["mlp", "deepsets"]},
        removed={"data": [], "model": ["transformer"]},
        all_names={"data": ["toy"], "model": ["mlp", "deepsets", "transformer"]},
    )
    source = (
        'MODELS = ("mlp", "deepsets", "transformer")\n'
        "EXPECTED = [\"Could not find 'x'\", 'deepsets', 'mlp', 'transformer']\n"
        'SOME = ["mlp", "transformer"]\n'
    )
    assert prune_literals(source, plan) == (
        'MODELS = ("mlp", "deepsets")\n'
        "EXPECTED = [\"Could not find 'x'\", 'deepsets', 'mlp']\n"
        'SOME = ["mlp", "transformer"]\n'
    )


def test_readme_loses_what_belongs_to_the_template_tooling_only() -> None:
    text = (
        "# hep-ml-template\n\nIntro.\n\n## Start a new analysis\n\nRun it.\n\n### Details\n\nx\n\n"
        "## Layout\n\n```\nscripts/  entry points: train.py, benchmark.py\n  new_analysis.py  x\n"
        "src/project/\n  models/\n```\n\n- `docs/new-analysis.md`: how\n- `docs/add-a-model.md`\n"
        "- `scripts/benchmark.py train` measures\n  on toy jets.\n\n  | a | b |\n\n- Clusters\n\n"
        "Speed (`scripts/benchmark.py`):\nfast.\n\nThe end.\n\n```\ntools/    tooling: new_analysis/\n"
        "          and benchmarks/\n  a/\nsrc/\n```\n\n`tools/benchmarks/predict.py` measured:\n\n"
        "| a | b |\n| 1 | 2 |\n\nIn words.\n\nLast, in `tools/`:\n\n## Next\n"
    )
    left_out = LeftOut.of(TEMPLATE_ONLY, "project").names()
    assert rewrite_readme(text, "ttH classifier", left_out) == (
        "# ttH classifier\n\nIntro.\n\n## Layout\n\n```\nscripts/  entry points: train.py\n"
        "src/project/\n  models/\n```\n\n- `docs/add-a-model.md`\n\n- Clusters\n\nThe end.\n\n"
        "```\nsrc/\n```\n\nIn words.\n\n## Next\n"
    )


def test_pyproject_leaves_out_extras_requirements_and_folders() -> None:
    before = (
        '[project]\nname = "x"\ndependencies = [\n  "numpy>=1.24",\n]\n\n'
        "[project.optional-dependencies]\n"
        'dev = [\n  "pytest>=8",\n  "tomli>=2; python_version < \'3.11\'",  # test_fork.py\n]\n'
        '# The Pythia jets example.\n# Two lines.\npythia = [\n  "pythia8mc==8.317.2",\n]\n'
        'cluster = ["submitit"]\n\n[tool.ruff]\nsrc = ["src", "tests", "tools", "scripts"]\n'
    )
    after = rewrite_pyproject(
        before,
        "tth-classifier",
        "ttH classifier",
        Author("A. Physicist", "a@example.org"),
        drop_extras=["pythia"],
        drop_requirements=["tomli"],
        drop_folders=["tools"],
    )
    parsed = tomllib.loads(after)
    assert parsed["project"]["dependencies"] == ["numpy>=1.24"]
    assert parsed["project"]["optional-dependencies"] == {
        "dev": ["pytest>=8"],
        "cluster": ["submitit"],
    }
    assert parsed["tool"]["ruff"]["src"] == ["src", "tests", "scripts"]
    assert "Pythia" not in after


def test_makefile_of_an_analysis_without_the_jets() -> None:
    template = (ROOT / "Makefile").read_text()
    left = LeftOut.of(TEMPLATE_ONLY, "project")
    held_out = ("scripts/generate.py", "data/heldout")
    kept = rewrite_makefile(template, "project", left.names(), [], None, "jets")
    assert demo_recipe(kept) == [
        line for line in demo_recipe(template) if "scripts/benchmark.py" not in line
    ]
    assert ' -e ".[dev,pythia]"' in kept
    assert "benchmark" not in kept
    assert "held-out jets" in kept  # the rest of the demo's comment stays
    without = rewrite_makefile(template, "tthml", left.names(), ["pythia"], held_out, "root")
    assert ' -e ".[dev]"' in without
    assert "(data=root, configs/train.yaml)" in without
    assert "jets" not in without
    assert "benchmark" not in without
    assert demo_recipe(without)[-1].startswith("$(BIN)/python -m tthml.inference exported/mlp ")
    with pytest.raises(ForkError, match="no demo rule"):
        rewrite_makefile("test:\n\tpytest\n", "tthml", (), [], held_out, "root")
    lint = "lint:\n\truff check src tests scripts tools\n\truff format --check src tools/ x\n"
    assert drop_folder_arguments(lint, ["tools"]) == (
        "lint:\n\truff check src tests scripts\n\truff format --check src x\n"
    )


def test_dangling_references_to_what_is_left_out(tmp_path: Path) -> None:
    left = LeftOut.of([*TEMPLATE_ONLY, "src/tthml/data/sources/pythia.py"], "tthml")
    assert left.modules == ("tools", "tthml.data.sources.pythia")
    files = {
        "tests/test_a.py": '"""Runs ``scripts/benchmark.py``."""\n'
        "from tools.benchmarks import inference\n"
        'SCRIPT = "scripts/benchmark.py"  # measured by scripts/benchmark.py\n',
        "src/tthml/b.py": "import tthml.data.sources.pythia as p\nimport functools, setuptools\n",
        "configs/data/x.yaml": "source:\n  _target_: tthml.data.sources.pythia.PythiaJetSource\n",
        "Makefile": "bench:\n\tpython scripts/benchmark.py\n",
        "docs/guide.md": "The benchmark (`scripts/benchmark.py`) measured it.\n",
        "src/tthml/c.py": "# the tools/ folder of the template\nimport itertools\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    errors, notes = find_dangling(tmp_path, list(files), left)
    assert sorted(e.split(": ")[0] for e in errors) == [
        "Makefile:2",
        "configs/data/x.yaml:2",
        "src/tthml/b.py:1",
        "tests/test_a.py:2",
        "tests/test_a.py:3",
    ]
    assert sorted(n.split(": ")[0] for n in notes) == [
        "docs/guide.md:1",
        "src/tthml/c.py:1",
        "tests/test_a.py:1",
    ]


def test_examples_are_configs_but_not_the_shared_base() -> None:
    files = [
        "configs/data/base.yaml",
        "configs/data/root.yaml",
        "configs/data/contract/jets.yaml",
        "configs/model/mlp.yaml",
        "configs/train.yaml",
    ]
    assert available(files) == {"data": ["root"], "model": ["mlp"]}


def test_template_files_are_the_tracked_ones(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path))
    checkout, plain = tmp_path / "checkout", tmp_path / "plain"
    checkout.mkdir()
    plain.mkdir()

    def git(*args: str) -> None:
        subprocess.run(["git", *args], cwd=checkout, check=True, capture_output=True)

    git("init", "-q")
    (checkout / ".gitignore").write_text("*.log\n")
    (checkout / "tracked.txt").write_text("a\n")
    git("add", ".gitignore", "tracked.txt")
    (checkout / "untracked.txt").write_text("b\n")
    (checkout / "ignored.log").write_text("c\n")
    assert template_files(checkout, False) == ([".gitignore", "tracked.txt"], ["untracked.txt"])
    files, _ = template_files(checkout, True)
    assert files == [".gitignore", "tracked.txt", "untracked.txt"]
    with pytest.raises(ForkError, match="is not a git checkout"):
        template_files(plain, False)


def test_import_blocks_sorted_under_the_old_name_are_sorted_under_the_new_one() -> None:
    renamed = (
        "import os\n\n"
        "from tthml.data import contract\n"
        "from tthml.utils import sha256_file  # hashes\n"
        "from tests.conftest import (\n    FAST,\n    ROOT,\n)\n\n"
        "from zzz import a\nfrom aaa import b\n"  # not sorted before: left alone
    )
    assert resort_imports(renamed, "project", "tthml") == (
        "import os\n\n"
        "from tests.conftest import (\n    FAST,\n    ROOT,\n)\n"
        "from tthml.data import contract\n"
        "from tthml.utils import sha256_file  # hashes\n\n"
        "from zzz import a\nfrom aaa import b\n"
    )


def test_lint_is_clean_wherever_the_template_is(fork: Path) -> None:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed")

    def problems(root: Path) -> set[tuple[str, str]]:
        out = subprocess.run(
            [ruff, "check", "--no-cache", "--output-format", "concise", "src", "tests", "scripts"],
            cwd=root,
            capture_output=True,
            text=True,
        ).stdout
        found = re.findall(r"^(\S+?):\d+:\d+: (\w+)", out, re.M)
        return {(path.replace("src/project/", f"src/{PACKAGE}/"), code) for path, code in found}

    assert problems(fork) <= problems(ROOT)
