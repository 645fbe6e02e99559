"""Training through the real Hydra configs: smoke runs, run artifacts, resuming, DDP and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import hydra
import pytest
import torch
from hydra.errors import InstantiationException
from omegaconf import OmegaConf, open_dict

from project.contract import InputContract
from project.training.module import ClassifierModule
from project.training.run import resolve_ckpt_path, train

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

ROOT = Path(__file__).resolve().parents[1]


def read_summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def run_cli(args: list[str], timeout: float = 240) -> subprocess.CompletedProcess:
    env = {**os.environ, "PROJECT_ROOT": str(ROOT)}
    env.pop("HYDRA_FULL_ERROR", None)
    return subprocess.run(
        [sys.executable, "scripts/train.py", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# --- smoke runs ------------------------------------------------------------------------------
@pytest.mark.parametrize("model", ["mlp", "deepsets", "transformer"])
def test_fast_dev_run(model: str, tmp_path: Path, fast_overrides, compose_train) -> None:
    cfg = compose_train([*fast_overrides, f"model={model}", "trainer.fast_dev_run=true"], tmp_path)
    metrics = train(cfg)
    run_dir = Path(cfg.paths.output_dir)
    summary = read_summary(run_dir)
    assert summary["global_step"] == 1  # one training batch
    assert torch.isfinite(torch.tensor(metrics["train/loss"]))
    assert 0.0 <= metrics["val/auroc"] <= 1.0
    assert 0.0 <= metrics["test/auroc"] <= 1.0
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "plots" / "roc.png").is_file()
    # fast_dev_run writes no checkpoint (a smoke test must not become ckpt_path=last).
    assert not list(run_dir.rglob("*.ckpt"))


# --- a short real run ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_epoch_run(tmp_path_factory: pytest.TempPathFactory, fast_overrides, compose_train):
    """One 2-epoch MLP run through the real configs, shared by the artifact tests."""
    tmp_path = tmp_path_factory.mktemp("two_epochs")
    cfg = compose_train([*fast_overrides, "model=mlp", "trainer.max_epochs=2"], tmp_path)
    metrics = train(cfg)
    return cfg, metrics, Path(cfg.paths.output_dir)


def test_run_directory_artifacts(two_epoch_run) -> None:
    _cfg, metrics, run_dir = two_epoch_run
    for name in (
        "config.yaml",
        "metrics.json",
        "checkpoints/last.ckpt",
        "plots/roc.png",
        "plots/scores.png",
    ):
        assert (run_dir / name).is_file(), name
    for name in ("roc.png", "scores.png"):
        assert (run_dir / "plots" / name).read_bytes()[:8] == PNG_MAGIC
    summary = read_summary(run_dir)
    assert summary["epochs"] == 2
    assert summary["global_step"] == 2 * 6  # ceil(358 train rows / 64) per epoch
    assert summary["world_size"] == 1
    assert summary["resumed_from"] is None
    assert len(summary["epoch_seconds"]) == 2
    assert summary["metrics"]["test/auroc"] == pytest.approx(metrics["test/auroc"])
    assert 0.7 < summary["metrics"]["test/auroc"] <= 1.0  # the toy classes are separable
    assert Path(summary["best_checkpoint"]).is_file()
    assert Path(summary["best_checkpoint"]).parent == run_dir / "checkpoints"
    assert Path(summary["best_checkpoint"]).name.startswith("epoch")  # the monitored one
    written = OmegaConf.load(run_dir / "config.yaml")
    assert written.model.net._target_ == "project.models.MLP"
    assert written.paths.output_dir == str(run_dir)
    assert written.trainer.max_epochs == 2
    assert written.model.scheduler.T_max == 2  # resolved interpolation


def test_checkpoint_loads_safely_with_the_fitted_contract(two_epoch_run) -> None:
    cfg, _, run_dir = two_epoch_run
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    contract = InputContract.from_dict(ckpt["hyper_parameters"]["contract"])
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")
    assert contract.fitted
    assert contract == datamodule.contract
    assert ckpt["hyper_parameters"]["net"]["_target_"] == "project.models.MLP"
    # The constants in the weights are the contract's.
    means = ckpt["state_dict"]["model.assembler.flat_norm.mean"]
    torch.testing.assert_close(means, torch.tensor([f.mean for f in contract.flat]))
    scales = ckpt["state_dict"]["model.assembler.jagged_norm.0.scale"]
    torch.testing.assert_close(scales, torch.tensor([f.scale for f in contract.jagged[0].fields]))
    # last.ckpt is the state after the final epoch.
    assert ckpt["global_step"] == read_summary(run_dir)["global_step"]
    assert ckpt["epoch"] == 1
    module = ClassifierModule.load_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    assert module.contract == contract


def test_last_checkpoint_is_latest_epoch_not_best(
    tmp_path: Path, fast_overrides, compose_train
) -> None:
    """With a monitor whose best is epoch 0, last.ckpt must still hold the final epoch."""
    cfg = compose_train(
        [
            *fast_overrides,
            "model=mlp",
            "trainer.max_epochs=2",
            "test=false",
            "callbacks.model_checkpoint.monitor=epoch",
            "callbacks.model_checkpoint.mode=min",
            "callbacks.early_stopping=null",
        ],
        tmp_path,
    )
    train(cfg)
    ckpt_dir = Path(cfg.paths.output_dir) / "checkpoints"
    best = [p for p in ckpt_dir.glob("*.ckpt") if p.name != "last.ckpt"]
    assert len(best) == 1
    assert torch.load(best[0], weights_only=True)["epoch"] == 0
    last = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert (last["epoch"], last["global_step"]) == (1, 12)
    hashes = json.loads((ckpt_dir / "sha256.json").read_text())
    assert set(hashes) == {"last.ckpt", best[0].name}


def test_resume_from_last(tmp_path: Path, fast_overrides, compose_train) -> None:
    logs = tmp_path / "logs"
    first_cfg = compose_train([*fast_overrides, "model=mlp", "test=false"], tmp_path / "first")
    with open_dict(first_cfg):
        first_cfg.paths.output_dir = str(logs / "train" / "runs" / "first")  # a run of this task
    train(first_cfg)
    first_dir = Path(first_cfg.paths.output_dir)
    first = read_summary(first_dir)
    assert (first["epochs"], first["global_step"]) == (1, 6)

    cfg = compose_train(
        [*fast_overrides, "model=mlp", "ckpt_path=last", "trainer.max_epochs=2", "test=false"],
        tmp_path / "second",
    )
    with open_dict(cfg):
        cfg.paths.log_dir = str(logs)  # where the first run lives
    train(cfg)
    second = read_summary(Path(cfg.paths.output_dir))
    assert second["resumed_from"] == str(first_dir / "checkpoints" / "last.ckpt")
    assert second["epochs"] == 2
    assert second["global_step"] == 2 * first["global_step"]
    assert len(second["epoch_seconds"]) == 1  # only epoch 1 ran


def test_resolve_ckpt_path(tmp_path: Path) -> None:
    task_dir = tmp_path / "logs" / "train"
    own_dir = task_dir / "runs" / "c"
    assert resolve_ckpt_path(None, own_dir, task_dir) is None
    with pytest.raises(FileNotFoundError, match=r"no checkpoints/last\.ckpt"):
        resolve_ckpt_path("last", own_dir, task_dir)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_ckpt_path(str(tmp_path / "nope.ckpt"), own_dir, task_dir)
    paths = {}
    for i, name in enumerate(("a", "b")):
        p = task_dir / "runs" / name / "checkpoints" / "last.ckpt"
        p.parent.mkdir(parents=True)
        p.write_bytes(b"x")
        os.utime(p, (1000 + i, 1000 + i))
        paths[name] = p
    # The newest run of another task is never this task's ckpt_path=last.
    other = tmp_path / "logs" / "other" / "runs" / "z" / "checkpoints" / "last.ckpt"
    other.parent.mkdir(parents=True)
    other.write_bytes(b"x")
    assert resolve_ckpt_path("last", own_dir, task_dir) == str(paths["b"])  # the newest
    os.utime(paths["a"], (2000, 2000))
    assert resolve_ckpt_path("last", own_dir, task_dir) == str(paths["a"])
    own = own_dir / "checkpoints" / "last.ckpt"
    own.parent.mkdir(parents=True)
    own.write_bytes(b"x")
    assert resolve_ckpt_path("last", own_dir, task_dir) == str(own)  # a restarted run
    assert resolve_ckpt_path(str(paths["b"]), own_dir, task_dir) == str(paths["b"])


def test_module_refuses_unfitted_contract(train_cfg) -> None:
    datamodule = hydra.utils.instantiate(train_cfg.data, _convert_="all")
    with pytest.raises(InstantiationException, match="no standardisation constants"):
        hydra.utils.instantiate(train_cfg.model, contract=datamodule.raw_contract.to_dict())
    net = OmegaConf.to_container(train_cfg.model.net)
    with pytest.raises(ValueError, match="no standardisation constants"):
        ClassifierModule(net, datamodule.raw_contract.to_dict(), optimizer={})


# --- the CLI ---------------------------------------------------------------------------------
def test_cli_ddp_two_cpu_processes(tmp_path: Path) -> None:
    result = run_cli(
        [
            "data=toy",
            "trainer=cpu",
            "trainer.devices=2",
            "trainer.strategy=ddp",
            "trainer.max_epochs=1",
            "logger=csv",
            "callbacks.progress_bar=null",
            f"paths.log_dir={tmp_path}",
            f"paths.data_dir={tmp_path}/data",
        ]
    )
    assert result.returncode == 0, result.stderr[-4000:]
    runs = list((tmp_path / "train" / "runs").iterdir())
    assert len(runs) == 1, runs
    run_dir = runs[0]
    # Only the launching process wrote Hydra's files; the worker wrote none anywhere.
    hydra_dirs = sorted(p for p in tmp_path.rglob("*") if p.is_dir() and "hydra" in p.name)
    assert hydra_dirs == [run_dir / ".hydra"]
    assert {p.name for p in tmp_path.iterdir()} <= {"train", "data"}  # nothing stray
    summary = read_summary(run_dir)
    assert summary["world_size"] == 2
    assert summary["global_step"] == 3  # each rank: 179 of 358 train rows, batches of 64
    assert "test/auroc" in summary["metrics"]
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert (run_dir / "plots" / "roc.png").is_file()


BASE = [
    "data=toy",
    "trainer=cpu",
    "trainer.max_epochs=1",
    "logger=csv",
    "callbacks.progress_bar=null",
]


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model=mlpp", ["Could not find 'model/mlpp'", "deepsets", "mlp", "transformer"]),
        ("trainer.max_epoch=1", ["trainer.max_epoch", "not in struct"]),
        ("data.batch_size=0", ["batch_size must be >= 1, got 0"]),
    ],
)
def test_cli_bad_input(override: str, expected: list[str], tmp_path: Path) -> None:
    result = run_cli(
        [*BASE, f"paths.log_dir={tmp_path}", f"paths.data_dir={tmp_path}/data", override]
    )
    assert result.returncode != 0
    for text in expected:
        assert text in result.stderr, (text, result.stderr[-3000:])
    assert not list(tmp_path.rglob("metrics.json"))


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("data.contract.classes=[qcd]", r"need at least two classes, got \['qcd'\]"),
        (
            "data.contract.flat.0.name=jet_ptt",
            r"column 'jet_ptt' does not exist in toy jets.*close matches: \['jet_pt'",
        ),
        ("data.contract.jagged.0.fields.2.transform=sqrt", "unknown transform 'sqrt'"),
        ("data.split=[0.5,0.6]", "split fractions must be positive and sum to 1"),
    ],
)
def test_bad_data_config_fails_before_training(
    override: str, match: str, tmp_path: Path, fast_overrides, compose_train
) -> None:
    """The same errors in process (the CLI prints them as above); nothing is written."""
    cfg = compose_train([*fast_overrides, override], tmp_path)
    with pytest.raises(Exception, match=match):
        train(cfg)
    assert not (tmp_path / "run").exists()
