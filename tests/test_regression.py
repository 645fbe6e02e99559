"""Regression and multi-task models: trained on the toy truth mass, exported with parity, in
physical units from the runtime, and a multi-task golden set replayed in C++."""

from __future__ import annotations

import importlib.util
import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from project.contract import ContractError, InputContract, Target
from project.data.datamodule import SoADataModule
from project.data.sources.toy import ToyJetSource
from project.training.metrics import regression_summary

CPP = Path(__file__).resolve().parents[1] / "cpp"
TARGET = "jet_truth_mass"


def _train(compose_train, fast_overrides, tmp: Path, overrides: list[str]):
    from project.training.run import train

    cfg = compose_train([*fast_overrides, *overrides], tmp)
    metrics = train(cfg)
    return Path(cfg.paths.output_dir), metrics


def _export(compose_export, run_dir: Path, out: Path, name: str, formats: str):
    from project.deploy.export import run_export

    cfg = compose_export(
        [
            f"run_dir={run_dir}",
            f"output_dir={out}",
            f"name={name}",
            "devices=[cpu]",
            f"formats={formats}",
        ]
    )
    return run_export(cfg)


@pytest.fixture(scope="module")
def regression(compose_train, compose_export, fast_overrides, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("regression")
    run_dir, metrics = _train(
        compose_train,
        fast_overrides,
        tmp,
        ["experiment=toy_regression", "trainer.max_epochs=6", "data.source.n_jets=2000"],
    )
    result = _export(compose_export, run_dir, tmp / "exported", "regression", "[torchscript,onnx]")
    return run_dir, metrics, result


def test_regression_reaches_r2_above_0_9(regression) -> None:
    run_dir, metrics, _ = regression
    assert metrics[f"test/r2_{TARGET}"] > 0.9
    assert 0.95 < metrics[f"test/response_{TARGET}"] < 1.05
    assert 0 < metrics[f"test/resolution_{TARGET}"] < 0.15
    assert metrics[f"test/mae_{TARGET}"] < 15.0  # GeV, on a spread of about 55 GeV
    assert "test/auroc" not in metrics  # no classes
    png = run_dir / "plots" / f"regression_{TARGET}.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (run_dir / "plots" / "roc.png").exists()


def test_regression_export_passes_parity_in_physical_units(regression) -> None:
    from project.inference import load

    _, _, result = regression
    manifest = result.manifest
    assert manifest["contract"]["outputs"] == [TARGET]
    assert {a["format"] for a in manifest["artifacts"]} == {"torchscript", "onnx"}
    assert all(a["passed"] for a in manifest["artifacts"])
    golden = np.load(result.export_dir / "golden.npz")
    truth = golden[f"true_{TARGET}"]
    names = InputContract.from_dict(manifest["contract"]).input_names
    inputs = {name: golden[name] for name in names}
    for backend in ("torchscript", "onnx"):
        model = load(result.export_dir, backend=backend)
        pred = model(inputs)[TARGET]
        np.testing.assert_allclose(pred, golden[TARGET], rtol=1e-4, atol=1e-3)
        # GeV, not standardised units: the deployed graph undoes the target's scaling.
        summary = regression_summary(pred, truth)
        assert summary["r2"] > 0.9, backend
        assert abs(pred.mean() / truth.mean() - 1) < 0.05, backend
        assert truth.mean() > 50


def test_regression_target_with_nan_is_an_error(repo_root) -> None:
    from omegaconf import OmegaConf

    d = OmegaConf.to_container(OmegaConf.load(repo_root / "configs/data/contract/jets.yaml"))
    d.update(
        jagged=[],
        classes=[],
        regression=[{"name": TARGET, "expr": "jet_truth_mass * sqrt(jet_eta)"}],
    )
    dm = SoADataModule(ToyJetSource(n_jets=300), InputContract.from_dict(d))
    with (
        pytest.warns(RuntimeWarning),
        pytest.raises(
            ContractError,
            match=r"toy jets \(n_jets=300, seed=0\) \(entries 0-300\): regression target 'jet_truth_mass' has \d+ NaN and 0 Inf values .*data\.nan_policy=drop",
        ),
    ):
        dm.setup()


def test_regression_only_contract_has_no_label() -> None:
    from project.contract import Feature

    contract = InputContract(flat=(Feature("jet_pt"),), classes=(), regression=(Target(TARGET),))
    assert contract.outputs == (TARGET,)
    assert contract.label is None
    assert contract.n_outputs == 1


# --- multi-task ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def multitask(compose_train, compose_export, fast_overrides, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multitask")
    run_dir, metrics = _train(
        compose_train,
        fast_overrides,
        tmp,
        ["experiment=toy_multitask", "trainer.max_epochs=4", "data.source.n_jets=2000"],
    )
    # TorchScript only: the C++ replay's other format, AOTInductor, is replayed for the
    # classifiers in test_cpp.py, and the outputs' names come from the manifest either way.
    result = _export(compose_export, run_dir, tmp / "exported", "multitask", "[torchscript]")
    return run_dir, metrics, result


def test_multitask_trains_both_heads(multitask) -> None:
    run_dir, metrics, result = multitask
    assert metrics["test/auroc"] > 0.9
    assert metrics[f"test/r2_{TARGET}"] > 0.5
    assert {"test/loss_class", f"test/loss_{TARGET}"} <= set(metrics)
    contract = result.manifest["contract"]
    assert contract["outputs"] == ["prob_qcd", "prob_top", TARGET]
    assert contract["regression"][0]["loss_weight"] == 0.5
    golden = np.load(result.export_dir / "golden.npz")
    np.testing.assert_allclose(golden["prob_qcd"] + golden["prob_top"], 1.0, atol=1e-5)
    assert golden[TARGET].mean() > 50  # GeV
    for name in ("roc", "scores", "efficiency_vs_pt", f"regression_{TARGET}"):
        assert (run_dir / "plots" / f"{name}.png").is_file(), name


def _cpp_module(name: str):
    spec = importlib.util.spec_from_file_location(f"cpp_{name}", CPP / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_multitask_golden_set_replays_in_cpp(multitask, tmp_path) -> None:
    build, unpack = _cpp_module("build"), _cpp_module("unpack_golden")
    try:
        binary = build.build()
    except build.MissingDependencies as err:
        pytest.skip(f"C++ consumer not buildable here: {err}")
    _, _, result = multitask
    golden = unpack.unpack(result.export_dir, tmp_path / "golden")
    run = subprocess.run(
        [
            str(binary),
            str(result.export_dir),
            str(golden),
            "--format",
            "torchscript",
            "--min-time",
            "0.05",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    rows = json.loads((result.export_dir / "manifest.json").read_text())["golden"]["rows"]
    for batch in (1, rows):
        assert f"[torchscript] batch={batch}" in run.stdout
    assert "FAIL" not in run.stdout.replace("RESULT PASS", "")
    assert "RESULT PASS" in run.stdout
