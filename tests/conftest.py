"""Shared fixtures: the real Hydra configs, composed and shrunk for fast CPU runs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONFIG_DIR = ROOT / "configs"
SHARED_DATA = ROOT.parent / "shared" / "data"

os.environ.setdefault("PROJECT_ROOT", str(ROOT))


def has_cuda() -> bool:
    """Whether a CUDA device is usable."""
    return torch.cuda.is_available()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` where no CUDA device exists."""
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def compose_train(overrides: list[str], tmp_path: Path) -> DictConfig:
    """Compose ``configs/train.yaml`` with ``overrides``, writing everything under ``tmp_path``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(tmp_path / "run")
        cfg.paths.log_dir = str(tmp_path / "logs")
        cfg.paths.data_dir = str(tmp_path / "data")
    GlobalHydra.instance().clear()
    return cfg


FAST = [
    "data=toy",
    "trainer=cpu",
    "trainer.max_epochs=1",
    "trainer.enable_model_summary=false",
    "logger=csv",
    "callbacks.progress_bar=null",
    "callbacks.model_summary=null",
]


@pytest.fixture
def train_cfg(tmp_path: Path) -> DictConfig:
    """The real training config on toy data, one CPU epoch."""
    return compose_train(FAST, tmp_path)


def compose_export(overrides: list[str]) -> DictConfig:
    """Compose ``configs/export.yaml`` with ``overrides``."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name="export", overrides=overrides)
    GlobalHydra.instance().clear()
    return cfg


MODELS = tuple(sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml")))  # configs/model/*


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory):
    """``trained_run(model) -> run_dir``: a toy-data training run per model, made once per
    session (two CPU epochs, small networks)."""
    from project.training.run import train

    cache: dict[str, Path] = {}

    def get(model: str) -> Path:
        if model not in cache:
            tmp = tmp_path_factory.mktemp(f"run-{model}")
            overrides = [*FAST, f"model={model}", "trainer.max_epochs=2", "data.source.n_jets=600"]
            cfg = compose_train(overrides, tmp)
            train(cfg)
            cache[model] = Path(cfg.paths.output_dir)
        return cache[model]

    return get


@pytest.fixture(scope="session")
def exported(trained_run, tmp_path_factory: pytest.TempPathFactory):
    """``exported(model) -> export_dir``: all three formats of ``trained_run(model)`` for the
    CPU, exported once per session (AOTInductor compiles take tens of seconds each)."""
    from project.deploy.export import run_export

    out = tmp_path_factory.mktemp("exported")
    cache: dict[str, Path] = {}

    def get(model: str) -> Path:
        if model not in cache:
            cfg = compose_export(
                [
                    f"run_dir={trained_run(model)}",
                    f"output_dir={out}",
                    f"name={model}",
                    "devices=[cpu]",
                ]
            )
            cache[model] = run_export(cfg).export_dir
        return cache[model]

    return get
