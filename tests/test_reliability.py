"""Reliability and security of training and export: no code run from a checkpoint, nothing
silently wrong, no lost or mixed outputs, exact resume.

CLI cases run ``scripts/train.py`` and ``scripts/export.py`` in subprocesses; the others call
``train(cfg)`` and ``run_export(cfg)`` on toy data for one or two CPU epochs. Runs are
interrupted through the callbacks of ``tests/run_control.py``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import awkward as ak
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from omegaconf import open_dict

from project.deploy.export import OWNER_FILE, UnverifiedCheckpointWarning, run_export
from project.deploy.graph import CheckpointError
from project.training.module import NonFiniteLossError
from project.training.run import RunError, train
from project.utils import sha256_file

ROOT = Path(__file__).resolve().parents[1]

# The CLI counterpart of the fast_overrides fixture.
CLI_FAST = [
    "data=toy",
    "trainer=cpu",
    "trainer.max_epochs=1",
    "trainer.enable_model_summary=false",
    "logger=csv",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
]
# A small torchscript-only export: the cases here are about publishing, not about formats.
SMALL_EXPORT = [
    "formats=[torchscript]",
    "devices=[cpu]",
    "parity.batch_sizes=[1,7]",
    "parity.large_batch=64",
    "parity.rowwise=2",
    "golden_rows=16",
]


def cli_env() -> dict[str, str]:
    """The environment of a CLI run: the repository root importable (``tests.run_control``),
    Hydra's short error output."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "PROJECT_ROOT": str(ROOT), "PYTHONPATH": path}
    env.pop("HYDRA_FULL_ERROR", None)
    return env


def cli(script: str, args: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``scripts/<script>`` with ``args``."""
    return subprocess.run(
        [sys.executable, f"scripts/{script}", *args],
        cwd=ROOT,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def log_paths(logs: Path) -> list[str]:
    return [f"paths.log_dir={logs}", f"paths.data_dir={logs.parent}/data"]


def only_child(path: Path) -> Path:
    children = list(path.iterdir())
    assert len(children) == 1, children
    return children[0]


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def compose_in(compose_train, overrides: list[str], tmp_path: Path, run_dir: Path, logs: Path):
    """The training config with its run directory and log directory set."""
    cfg = compose_train(overrides, tmp_path)
    with open_dict(cfg):
        cfg.paths.output_dir = str(run_dir)
        cfg.paths.log_dir = str(logs)
    return cfg


# --- 1. no code from a checkpoint ------------------------------------------------------------
@pytest.fixture
def hostile(tmp_path: Path, trained_run):
    """Checkpoints of a real run with hyperparameters that would run code if built: a
    ``torch.hub.load`` of a local ``hubconf.py`` that writes a marker file, and a
    ``logging.basicConfig`` that would empty a victim file."""
    hub = tmp_path / "hub"
    hub.mkdir()
    marker = tmp_path / "hubconf-ran"
    (hub / "hubconf.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n"
        "def x(**kwargs):\n    return None\n"
    )
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    hub_target = {"_target_": "torch.hub.load", "repo_or_dir": str(hub), "model": "x",
                  "source": "local"}  # fmt: skip
    log_target = {"_target_": "logging.basicConfig", "force": True, "filename": str(victim),
                  "filemode": "w"}  # fmt: skip
    source = torch.load(trained_run("mlp") / "checkpoints" / "last.ckpt", weights_only=True)

    def make(key: str, target: dict) -> Path:
        ckpt = {**source, "hyper_parameters": {**source["hyper_parameters"], key: target}}
        path = tmp_path / f"{key}-{target['_target_']}.ckpt"
        torch.save(ckpt, path)
        return path

    checkpoints = {
        "hub-net": make("net", hub_target),
        "basicConfig-net": make("net", log_target),
        "basicConfig-optimizer": make("optimizer", {**log_target, "_partial_": True}),
    }
    return checkpoints, marker, victim


def assert_nothing_ran(marker: Path, victim: Path) -> None:
    assert not marker.exists(), "the checkpoint's hubconf.py ran"
    assert victim.read_text() == "precious\n", "the checkpoint's logging.basicConfig ran"


@pytest.mark.parametrize("which", ["hub-net", "basicConfig-net"])
def test_cli_export_refuses_checkpoint_targets_outside_the_project(
    which: str, hostile, trained_run, tmp_path: Path
) -> None:
    checkpoints, marker, victim = hostile
    out = tmp_path / "exported"
    result = cli(
        "export.py",
        [f"run_dir={trained_run('mlp')}", f"ckpt={checkpoints[which]}", f"output_dir={out}",
         "name=hostile", *SMALL_EXPORT],
    )  # fmt: skip
    assert result.returncode == 1, result.stderr[-3000:]
    assert "is not a model of project.models" in result.stderr
    assert "To allow a new model, put it in src/project/models/" in result.stderr
    assert_nothing_ran(marker, victim)
    assert not (out / "hostile").exists()


@pytest.mark.parametrize("which", ["hub-net", "basicConfig-net", "basicConfig-optimizer"])
def test_resume_refuses_checkpoint_targets_outside_the_project(
    which: str, hostile, tmp_path: Path, compose_train, fast_overrides
) -> None:
    checkpoints, marker, victim = hostile
    cfg = compose_train([*fast_overrides, "model=mlp", f"ckpt_path={checkpoints[which]}"], tmp_path)
    key = which.split("-")[1]
    with pytest.raises(RunError, match=rf"checkpoint's model\.{key}\._target_ .*To allow a new"):
        train(cfg)
    assert_nothing_ran(marker, victim)
    assert not list(Path(cfg.paths.output_dir).rglob("*.ckpt"))


# --- 4. NaN/Inf in training data, a non-finite loss ------------------------------------------
@pytest.fixture
def nan_parquet(tmp_path: Path) -> Path:
    """The toy jets as Parquet (the columns of the jets contract), with NaN in three rows of
    the flat column ``jet_tau21``."""
    from project.data.sources.toy import ToyJetSource

    table = ToyJetSource(n_jets=600, seed=1).table
    columns = {
        k: ak.to_arrow(v, extensionarray=False) if isinstance(v, ak.Array) else pa.array(v)
        for k, v in table.items()
    }
    tau21 = np.array(table["jet_tau21"])
    tau21[[3, 10, 11]] = np.nan
    columns["jet_tau21"] = pa.array(tau21)
    path = tmp_path / "jets-with-nan.parquet"
    pq.write_table(pa.table(columns), path)
    return path


def test_cli_nan_in_a_parquet_column_fails_naming_it_and_drop_trains(
    nan_parquet: Path, tmp_path: Path
) -> None:
    args = [*CLI_FAST, "data=parquet", f"data.source.files=[{nan_parquet}]", "test=false"]
    failed = cli("train.py", [*args, *log_paths(tmp_path / "raise")])
    assert failed.returncode == 1
    assert (
        f"{nan_parquet} (entries 0-600): flat column 'jet_tau21' has 3 NaN and 0 Inf values"
        in failed.stderr
    ), failed.stderr[-3000:]
    assert "data.nan_policy=drop" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert not list((tmp_path / "raise").rglob("*.ckpt"))

    dropped = cli("train.py", [*args, "data.nan_policy=drop", *log_paths(tmp_path / "drop")])
    assert dropped.returncode == 0, dropped.stderr[-3000:]
    run_dir = only_child(tmp_path / "drop" / "train" / "runs")
    assert "3 rows with NaN or Inf values dropped" in (run_dir / "train.log").read_text()
    assert np.isfinite(summary(run_dir)["metrics"]["train/loss"])
    assert np.isfinite(summary(run_dir)["metrics"]["val/loss"])


def test_non_finite_training_loss_stops_training_before_checkpointing(
    tmp_path: Path, compose_train, fast_overrides
) -> None:
    # AdamW moves every weight by about lr per step: with 1e30 the logits overflow at once.
    cfg = compose_train(
        [*fast_overrides, "model=mlp", "model.optimizer.lr=1e30", "trainer.max_epochs=2"],
        tmp_path,
    )
    with pytest.raises(
        NonFiniteLossError, match=r"training loss is (nan|inf) in epoch 0 .*Lower the"
    ):
        train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    assert not list(run_dir.rglob("*.ckpt"))
    assert not (run_dir / "metrics.json").exists()


# --- 5. a checkpoint without its hash record -------------------------------------------------
def test_export_warns_about_a_checkpoint_without_hash_record_and_require_hash_refuses(
    tmp_path: Path, trained_run, compose_export
) -> None:
    run_dir = trained_run("mlp")
    loose = tmp_path / "elsewhere" / "model.ckpt"
    loose.parent.mkdir()
    loose.write_bytes((run_dir / "checkpoints" / "last.ckpt").read_bytes())
    out = tmp_path / "exported"
    args = [f"run_dir={run_dir}", f"ckpt={loose}", f"output_dir={out}", "name=loose", *SMALL_EXPORT]

    with pytest.raises(CheckpointError, match=r"has no recorded hash .*require_hash=true"):
        run_export(compose_export([*args, "require_hash=true"]))
    assert not out.exists()

    with pytest.warns(UnverifiedCheckpointWarning, match=r"model\.ckpt has no recorded hash"):
        result = run_export(compose_export(args))
    assert result.manifest["source"]["checkpoint_sha256"] == sha256_file(loose)
    assert (out / "loose" / "manifest.json").is_file()


# --- 6. exact resume -------------------------------------------------------------------------
def test_resume_after_sigkill_repeats_an_uninterrupted_run_bitwise(tmp_path: Path) -> None:
    args = [*CLI_FAST, "model=mlp", "model.net.dropout=0.3", "trainer.max_epochs=3"]
    killer = [
        "+callbacks.killer._target_=tests.run_control.KillAtEpochStart",
        "+callbacks.killer.epoch=1",
    ]
    killed = cli("train.py", [*args, *killer, *log_paths(tmp_path / "a")])
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    runs = tmp_path / "a" / "train" / "runs"
    run_dir = only_child(runs)
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, weights_only=True)["epoch"] == 0  # epoch 1 never ended

    resumed = cli("train.py", [*args, f"ckpt_path={last}", *log_paths(tmp_path / "a")])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert only_child(runs) == run_dir  # into the killed run's directory
    assert summary(run_dir)["resumed_from"] == str(last)
    assert summary(run_dir)["epochs"] == 3

    whole = cli("train.py", [*args, *log_paths(tmp_path / "b")])
    assert whole.returncode == 0, whole.stderr[-3000:]
    whole_dir = only_child(tmp_path / "b" / "train" / "runs")
    ours = torch.load(last, weights_only=True)["state_dict"]
    theirs = torch.load(whole_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    assert ours.keys() == theirs.keys()
    assert [k for k in ours if not torch.equal(ours[k], theirs[k])] == []
    assert summary(run_dir)["metrics"]["test/auroc"] == summary(whole_dir)["metrics"]["test/auroc"]


# --- 7. ckpt_path=last: this task's run, in its directory, of this model ---------------------
def test_cli_ckpt_path_last_resumes_this_tasks_run_in_its_directory(
    tmp_path: Path, compose_train, fast_overrides
) -> None:
    logs = tmp_path / "logs"
    own = logs / "train" / "runs" / "own"
    train(compose_in(compose_train, [*fast_overrides, "test=false"], tmp_path, own, logs))
    # A newer run of another task, with another model: never this task's ckpt_path=last.
    other = logs / "other" / "runs" / "newer"
    other_args = [*fast_overrides, "test=false", "task_name=other", "model.net.hidden=[8]"]
    train(compose_in(compose_train, other_args, tmp_path, other, logs))
    assert (other / "checkpoints" / "last.ckpt").stat().st_mtime >= (
        own / "checkpoints" / "last.ckpt"
    ).stat().st_mtime

    result = cli(
        "train.py",
        [*CLI_FAST, "test=false", "ckpt_path=last", "trainer.max_epochs=2", *log_paths(logs)],
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert only_child(logs / "train" / "runs") == own  # no new run directory
    assert summary(own)["resumed_from"] == str(own / "checkpoints" / "last.ckpt")
    assert (summary(own)["epochs"], len(summary(own)["epoch_seconds"])) == (2, 1)
    assert (own / ".hydra" / "config.yaml").is_file()
    assert summary(other)["epochs"] == 1


@pytest.fixture(scope="module")
def one_epoch_run(tmp_path_factory: pytest.TempPathFactory, compose_train, fast_overrides):
    """A finished one-epoch MLP run: ``(run_dir, fast overrides)``."""
    tmp = tmp_path_factory.mktemp("one_epoch")
    cfg = compose_train([*fast_overrides, "model=mlp", "test=false"], tmp)
    train(cfg)
    return Path(cfg.paths.output_dir)


@pytest.mark.parametrize(
    ("override", "match"),
    [
        (
            "model.net.hidden=[16]",
            r"another model \(model.net hidden: \[128, 128, 64\] there, \[16\]",
        ),
        ("data.contract.classes=[b,s]", r"other classes \(\['qcd', 'top'\] there, \['b', 's'\]"),
        ("data.contract.jagged=[]", r"other input names \(\['jet_pt', .*'part_offsets'"),
        ("data.source.n_jets=700", r"contract differs from this run's in \['flat', 'jagged'\]"),
    ],
)
def test_resume_refuses_a_checkpoint_of_another_model_or_contract(
    override: str, match: str, one_epoch_run: Path, tmp_path: Path, compose_train, fast_overrides
) -> None:
    last = one_epoch_run / "checkpoints" / "last.ckpt"
    digest = sha256_file(last)
    cfg = compose_train([*fast_overrides, "model=mlp", f"ckpt_path={last}", override], tmp_path)
    with pytest.raises(RunError, match=rf"cannot resume from {last}: .*{match}"):
        train(cfg)
    assert sha256_file(last) == digest
    assert not list(Path(cfg.paths.output_dir).rglob("*.ckpt"))


# --- 8. outputs replaced atomically ----------------------------------------------------------
def test_run_outputs_are_replaced_whole_never_rewritten_in_place(
    tmp_path: Path, compose_train, fast_overrides
) -> None:
    """A reader holding an output of the first run (here: a hard link to it) keeps that
    complete file while the resumed run writes its own: each writer writes a unique temporary
    file and renames it into place."""
    run_dir, logs = tmp_path / "logs" / "train" / "runs" / "r", tmp_path / "logs"
    train(compose_in(compose_train, list(fast_overrides), tmp_path, run_dir, logs))
    names = ["config.yaml", "metrics.json", "checkpoints/sha256.json", "plots/roc.png",
             "plots/scores.png"]  # fmt: skip
    held = tmp_path / "held"
    held.mkdir()
    before = {}
    for i, name in enumerate(names):
        before[name] = (run_dir / name).read_bytes()
        os.link(run_dir / name, held / str(i))

    resume = [*fast_overrides, "ckpt_path=last", "trainer.max_epochs=2"]
    train(compose_in(compose_train, resume, tmp_path, run_dir, logs))
    for i, name in enumerate(names):
        assert (held / str(i)).read_bytes() == before[name], f"{name} was rewritten in place"
        assert not (run_dir / name).samefile(held / str(i)), name
    assert summary(run_dir)["epochs"] == 2
    assert (run_dir / "plots" / "roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [p for p in run_dir.rglob("*.tmp")]


# --- 10. export names ------------------------------------------------------------------------
@pytest.mark.parametrize("name", [".", "..", "a/b", "", "<absolute>", ".hidden", "a\\b"])
def test_export_name_must_be_one_plain_directory_name(
    name: str, tmp_path: Path, trained_run, compose_export
) -> None:
    out, elsewhere = tmp_path / "exported", tmp_path / "elsewhere"
    cfg = compose_export([f"run_dir={trained_run('mlp')}", f"output_dir={out}", "overwrite=true"])
    with open_dict(cfg):
        cfg.name = str(elsewhere) if name == "<absolute>" else name
    with pytest.raises(ValueError, match=r"is not a single plain directory name: give one like"):
        run_export(cfg)
    assert not out.exists()
    assert not elsewhere.exists()


def test_cli_export_name_dot_with_overwrite_leaves_the_export_root(
    tmp_path: Path, trained_run
) -> None:
    out = tmp_path / "exported"
    (out / "keep").mkdir(parents=True)
    (out / "keep" / "manifest.json").write_text("{}\n")
    result = cli(
        "export.py", [f"run_dir={trained_run('mlp')}", f"output_dir={out}", "name=.",
                      "overwrite=true", *SMALL_EXPORT],
    )  # fmt: skip
    assert result.returncode == 1
    assert "export name '.' is not a single plain directory name" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]  # no .exported.old-*
    assert [p.name for p in out.iterdir()] == ["keep"]
    assert (out / "keep" / "manifest.json").read_text() == "{}\n"


# --- 11. temporaries of killed exports -------------------------------------------------------
def test_export_removes_temporary_directories_of_killed_exports(
    tmp_path: Path, trained_run, compose_export
) -> None:
    out = tmp_path / "exported"
    args = [f"run_dir={trained_run('mlp')}", f"output_dir={out}", "name=mlp", *SMALL_EXPORT]
    proc = subprocess.Popen(
        [sys.executable, "scripts/export.py", *args],
        cwd=ROOT,
        env=cli_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 180
        while not list(out.glob(f".mlp.tmp-*/{OWNER_FILE}")):
            assert proc.poll() is None, "the export ended before it could be killed"
            assert time.monotonic() < deadline
            time.sleep(0.02)
    finally:
        proc.kill()
        proc.wait()
    stale = list(out.glob(".mlp.tmp-*"))
    assert len(stale) == 1
    assert not (out / "mlp").exists()

    # A temporary directory of a live export (this process's parent, alive) is kept.
    live = out / ".other.tmp-live"
    live.mkdir()
    (live / OWNER_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getppid()}))

    result = run_export(compose_export(args))
    assert not stale[0].exists()
    assert live.is_dir()
    assert sorted(p.name for p in out.iterdir()) == [".other.tmp-live", "mlp"]
    assert not (result.export_dir / OWNER_FILE).exists()


# --- 12. one training per run directory ------------------------------------------------------
def test_cli_second_training_in_the_same_run_directory_fails(tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    run_dir = logs / "train" / "runs" / "shared"
    started, release = tmp_path / "started", tmp_path / "release"
    hold = [
        "+callbacks.hold._target_=tests.run_control.HoldAtTrainStart",
        f"+callbacks.hold.started={started}",
        f"+callbacks.hold.release={release}",
    ]
    args = [*CLI_FAST, "test=false", f"hydra.run.dir={run_dir}", *log_paths(logs)]
    first_log = tmp_path / "first.stderr"
    with first_log.open("w") as log:
        first = subprocess.Popen(
            [sys.executable, "scripts/train.py", *args, *hold],
            cwd=ROOT,
            env=cli_env(),
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
    try:
        deadline = time.monotonic() + 180
        while not started.exists():
            assert first.poll() is None, first_log.read_text()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        second = cli("train.py", args)
        release.touch()
        first.wait(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert second.returncode == 1
    assert f"run directory {run_dir} is in use by another training" in second.stderr
    assert "Traceback" not in second.stderr
    assert first.returncode == 0, first_log.read_text()[-3000:]
    assert summary(run_dir)["epochs"] == 1
    assert summary(run_dir)["resumed_from"] is None


# --- 13. permissions -------------------------------------------------------------------------
@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def modes(root: Path) -> dict[str, str]:
    """Every file and directory under ``root`` (itself included) with its permission bits."""
    entries = [root, *root.rglob("*")]
    return {str(p.relative_to(root)): oct(p.stat().st_mode & 0o777) for p in entries}


def test_run_directory_and_export_follow_the_umask(
    umask_022, tmp_path: Path, compose_train, fast_overrides, compose_export
) -> None:
    cfg = compose_train([*fast_overrides, "model=mlp"], tmp_path)
    train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    result = run_export(
        compose_export([f"run_dir={run_dir}", f"output_dir={tmp_path / 'exported'}",
                        "name=mlp", *SMALL_EXPORT])
    )  # fmt: skip
    for root in (run_dir, result.export_dir):
        found = modes(root)
        want = {p: "0o755" if (root / p).is_dir() else "0o644" for p in found}
        assert found == want, root
    for name in ("config.yaml", "metrics.json", "checkpoints/last.ckpt", "plots/roc.png",
                 "validation_sample.parquet"):  # fmt: skip
        assert name in modes(run_dir)
    assert {"manifest.json", "golden.npz", "model.ts"} <= set(modes(result.export_dir))


# --- unclear errors made clear ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.batch_size=abc", "data.batch_size must be a whole number, got 'abc' (str)"),
        ("data.batch_size=2.5", "data.batch_size must be a whole number, got 2.5 (float)"),
        ("data.split=[0.8,0.2]", "data.split must be three split fractions (train, validation, "
                                 "test), got [0.8, 0.2]"),
    ],
)  # fmt: skip
def test_cli_config_value_of_the_wrong_kind_is_named(
    override: str, expected: str, tmp_path: Path
) -> None:
    result = cli("train.py", [*CLI_FAST, override, *log_paths(tmp_path)])
    assert result.returncode == 1
    assert f"training failed: {expected}" in result.stderr, result.stderr[-3000:]
    assert "give for instance" in result.stderr or "for instance data.split=" in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.rglob("metrics.json"))


def test_export_removes_earlier_exports_displaced_by_a_killed_publish(tmp_path: Path) -> None:
    """An export killed between its two renames leaves the displaced earlier export as
    ``.<name>.old-*``; the next export's clean-up removes it, and the published ones stay."""
    from project.deploy.export import remove_stale_temporaries

    published = tmp_path / "mlp"
    published.mkdir()
    (published / "manifest.json").write_text("{}")
    displaced = tmp_path / ".mlp.old-1733000000000000"
    displaced.mkdir()
    (displaced / "manifest.json").write_text("{}")
    assert remove_stale_temporaries(tmp_path) == [displaced]
    assert not displaced.exists()
    assert (published / "manifest.json").is_file()
