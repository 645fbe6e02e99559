"""Shared fixtures: the real Hydra configs, composed and shrunk for fast CPU runs.

Tests reach everything here through fixtures (``repo_root``, ``fast_overrides``,
``compose_train``, ``compose_export``, ``trained_run``, ``exported``, ``tile_golden``); a test
parametrised over every model config asks for ``each_model``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

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


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``each_model``: one test per model config (configs/model/*.yaml)."""
    if "each_model" in metafunc.fixturenames:
        metafunc.parametrize("each_model", MODELS)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked ``gpu`` where no CUDA device exists."""
    if has_cuda():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def _compose_train(overrides: list[str], tmp_path: Path) -> DictConfig:
    """Compose ``configs/train.yaml`` with ``overrides``, writing everything under ``tmp_path``."""
    from project.training.run import register_resolvers

    register_resolvers()  # ${best_precision:...} in configs/trainer/default.yaml
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


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository's root directory."""
    return ROOT


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data``: the real ROOT files the tests read."""
    return SHARED_DATA


@pytest.fixture(scope="session")
def fast_overrides() -> list[str]:
    """Overrides that shrink the training config to toy data and one quiet CPU epoch."""
    return list(FAST)


@pytest.fixture(scope="session")
def compose_train():
    """``compose_train(overrides, tmp_path) -> cfg``: ``configs/train.yaml`` composed with
    ``overrides``, every output under ``tmp_path``."""
    return _compose_train


@pytest.fixture(scope="session")
def compose_export():
    """``compose_export(overrides) -> cfg``: ``configs/export.yaml`` composed."""
    return _compose_export


@pytest.fixture
def train_cfg(tmp_path: Path) -> DictConfig:
    """The real training config on toy data, one CPU epoch."""
    return _compose_train(FAST, tmp_path)


def _compose_export(overrides: list[str]) -> DictConfig:
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
            cfg = _compose_train(overrides, tmp)
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
            cfg = _compose_export(
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


def _contract_of(
    flat: Any = None,
    jagged: Any = None,
    label: str | None = None,
    selection: str | None = None,
    per_object: str | None = None,
    max_length: int = 8,
) -> Any:
    """A contract from source-style declarations: ``flat`` a list of column names or a mapping
    name -> expression, ``jagged`` a mapping collection -> list of field names (stored as
    ``<collection>_<field>``) or mapping field -> expression."""
    from project.contract import Feature, InputContract, JaggedCollection

    def features(decl: Any) -> tuple:
        if isinstance(decl, dict):
            return tuple(Feature(n, expr=str(e)) for n, e in decl.items())
        return tuple(Feature(n) for n in decl or ())

    collections = tuple(
        JaggedCollection(c, max_length, features(fields)) for c, fields in (jagged or {}).items()
    )
    return InputContract(
        flat=features(flat),
        jagged=collections,
        classes=("c0", "c1"),
        label=label,
        selection=selection,
        per_object=per_object,
    )


def _read_table(source: Any, labels: bool | None = None, **declarations: Any) -> Any:
    """Read ``source`` into a ``ColumnarData`` through a contract made by ``_contract_of``
    (``labels`` defaults to whether a label is declared)."""
    from project.data.expressions import TableSpec
    from project.data.sources import load

    spec_args = {
        k: declarations.pop(k) for k in ("weight", "nan_policy", "ids") if k in declarations
    }
    contract = _contract_of(**declarations)
    use_labels = declarations.get("label") is not None if labels is None else labels
    return load(source, TableSpec(contract, labels=use_labels, **spec_args))


@pytest.fixture(scope="session")
def contract_of():
    """``contract_of(flat=..., jagged=..., label=..., selection=..., per_object=...)``: a
    two-class contract from source-style declarations (see ``_contract_of``)."""
    return _contract_of


@pytest.fixture(scope="session")
def read_table():
    """``read_table(source, flat=..., jagged=..., label=..., ...)``: the source's table built
    through such a contract (see ``_read_table``)."""
    return _read_table


def _tile_golden(golden: dict[str, Any], contract: Any, batch: int) -> dict[str, Any]:
    """An export's golden rows repeated to ``batch`` rows, as contiguous SoA input columns."""
    import numpy as np

    from project.data.columnar import ColumnarData

    table = ColumnarData.from_soa(golden, contract)
    return table.take(np.arange(batch) % len(table)).to_soa(contract)


@pytest.fixture(scope="session")
def tile_golden():
    """``tile_golden(golden, contract, batch) -> columns``: the golden inputs (a mapping of
    input name to array, extra names ignored) repeated to ``batch`` rows."""
    return _tile_golden
