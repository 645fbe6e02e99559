"""The deploy stage: exported artifacts match the eager graph, manifests are complete and
honest, and failures publish nothing."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from project.contract import InputContract
from project.deploy import formats
from project.deploy.export import ExportFailed, run_export
from project.deploy.graph import CheckpointError, load_checkpoint
from project.deploy.manifest import validate_manifest
from project.inference.backends import open_backend
from project.utils import sha256_file

ROOT = Path(__file__).resolve().parents[1]


def _manifest(export_dir: Path) -> dict:
    return json.loads((export_dir / "manifest.json").read_text())


def _golden_inputs(
    export_dir: Path, contract: InputContract
) -> tuple[list[np.ndarray], np.lib.npyio.NpzFile]:
    golden = np.load(export_dir / "golden.npz")
    return [golden[n] for n in contract.input_names], golden


def test_export_publishes_all_formats_with_passing_parity(exported, each_model: str) -> None:
    export_dir = exported(each_model)
    manifest = _manifest(export_dir)
    validate_manifest(manifest)
    assert manifest["parity"]["passed"] is True
    assert {(a["format"], a["device"]) for a in manifest["artifacts"]} == {
        ("torchscript", "cpu"),
        ("aoti", "cpu"),
        ("onnx", "cpu"),
        ("exported_program", "cpu"),
    }
    for artifact in manifest["artifacts"]:
        assert sha256_file(export_dir / artifact["file"]) == artifact["sha256"]
        assert artifact["passed"]
        for row in artifact["parity"]:
            assert row["max_abs"] <= row["tolerance"]["abs"] + row["tolerance"]["rel"]
            assert {1, 2, 7, 256, 1000} <= set(row["batch_sizes"])
            assert row["rowwise_max_abs"] is not None
    onnx_rows = next(a for a in manifest["artifacts"] if a["format"] == "onnx")["parity"]
    assert [r["optimization"] for r in onnx_rows] == ["all", "none"]
    assert sha256_file(export_dir / "golden.npz") == manifest["golden"]["sha256"]
    assert manifest["source"]["checkpoint_sha256"] == sha256_file(manifest["source"]["checkpoint"])
    assert "FAIL" not in manifest["parity"]["table"]
    # No temporary directories are left beside the published one.
    assert not [p for p in export_dir.parent.iterdir() if p.name.startswith(".")]


def test_artifacts_replay_golden_set(exported, each_model: str) -> None:
    export_dir = exported(each_model)
    manifest = _manifest(export_dir)
    contract = InputContract.from_dict(manifest["contract"])
    inputs, golden = _golden_inputs(export_dir, contract)
    # The runtime's backends; the saved torch.export program is replayed in test_consumers.py.
    for artifact in (a for a in manifest["artifacts"] if a["format"] != "exported_program"):
        backend = open_backend(artifact["format"], export_dir / artifact["file"])
        outputs = backend([torch.from_numpy(a) for a in inputs])
        for name, got in zip(contract.outputs, outputs, strict=True):
            np.testing.assert_allclose(got.numpy(), golden[name], atol=1e-4, rtol=1e-4)
    # Probabilities of one row sum to one.
    total = sum(golden[o] for o in contract.outputs)
    np.testing.assert_allclose(total, 1.0, atol=1e-5)


def test_saved_graphs_carry_symbolic_dimensions(exported, each_model: str) -> None:
    import onnx

    export_dir = exported(each_model)
    manifest = _manifest(export_dir)
    contract = InputContract.from_dict(manifest["contract"])
    onnx_model = onnx.load(export_dir / "model.onnx")
    params = {i.name: i.type.tensor_type.shape.dim[0].dim_param for i in onnx_model.graph.input}
    assert [i.name for i in onnx_model.graph.input] == contract.input_names
    assert all(params[n] for n in contract.input_names)
    for coll in contract.jagged:
        # Fields of one collection share one symbol, distinct from the batch symbol.
        symbols = {params[n] for n in coll.field_input_names}
        assert len(symbols) == 1
        assert symbols != {params[contract.input_names[0]]}
    aoti = next(a for a in manifest["artifacts"] if a["format"] == "aoti")
    assert aoti["range_constraints"], "the exported program has no symbolic dimensions"
    assert aoti["cpp_threads"] == 1
    assert aoti["cpu_isa"]


def test_deploy_graph_on_raw_inputs_equals_trained_module_on_batches(trained_run) -> None:
    from project.training.module import ClassifierModule

    run_dir = trained_run("deepsets")
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    loaded = load_checkpoint(ckpt)
    module = ClassifierModule.load_from_checkpoint(
        ckpt, map_location="cpu", weights_only=True
    ).eval()
    contract = loaded.contract
    rng = np.random.default_rng(3)
    n, counts = 9, rng.integers(0, 30, 9)
    counts[2] = 0
    raw = {f.name: rng.uniform(1, 400, n).astype(np.float32) for f in contract.flat}
    coll = contract.jagged[0]
    raw[coll.offsets_name] = np.r_[0, np.cumsum(counts)].astype(np.int64)
    for f in coll.fields:
        raw[coll.field_input_name(f.name)] = rng.uniform(0.01, 50, counts.sum()).astype(np.float32)
    batch = {k: torch.from_numpy(v) for k, v in raw.items()}
    with torch.no_grad():
        expected = module(batch).softmax(-1)
        got = loaded.graph(*(batch[k] for k in contract.input_names))
    for i, out in enumerate(got):
        torch.testing.assert_close(out, expected[:, i], atol=1e-6, rtol=1e-6)


@pytest.fixture
def failing_export(trained_run, tmp_path: Path, compose_export):
    """``failing_export(extra) -> output dir``: an export of the mlp run with ``extra``
    overrides that must fail."""
    return lambda extra: _failing_export(trained_run, tmp_path, extra, compose_export)


def _failing_export(trained_run, tmp_path: Path, extra: list[str], compose_export) -> Path:
    out = tmp_path / "exported"
    cfg = compose_export(
        [f"run_dir={trained_run('mlp')}", f"output_dir={out}", "name=mlp", "devices=[cpu]", *extra]
    )
    with pytest.raises(ExportFailed, match="nothing was published"):
        run_export(cfg)
    return out


def test_parity_failure_publishes_nothing(failing_export) -> None:
    out = failing_export(
        ["formats=[torchscript,onnx]", "parity.tolerance.onnx.abs=0", "parity.tolerance.onnx.rel=0"]
    )
    assert list(out.iterdir()) == []


def _damage_onnx(monkeypatch, damage: Callable[[bytes], bytes]) -> None:
    """Export ONNX as usual, then replace the file's bytes with ``damage(bytes)``."""
    real = formats.export_onnx

    def damaged(graph, example, contract, path, *args, **kwargs):
        info = real(graph, example, contract, path, *args, **kwargs)
        path.write_bytes(damage(path.read_bytes()))
        return info

    monkeypatch.setattr(formats, "export_onnx", damaged)


def test_corrupted_artifact_publishes_nothing(failing_export, monkeypatch) -> None:
    def zero_64_bytes(data: bytes) -> bytes:
        middle = len(data) // 2
        return data[:middle] + b"\0" * 64 + data[middle + 64 :]

    _damage_onnx(monkeypatch, zero_64_bytes)
    out = failing_export(["formats=[onnx]"])
    assert list(out.iterdir()) == []


def test_artifact_that_cannot_load_prints_the_childs_reason(
    failing_export, monkeypatch, capsys
) -> None:
    """The table shows a failure's first line; the child's own error follows it in full."""
    _damage_onnx(monkeypatch, lambda data: b"not an ONNX model")
    out = failing_export(["formats=[onnx]"])
    assert list(out.iterdir()) == []
    printed = capsys.readouterr().out
    reasons = printed.split("onnx/cpu/all failed: ", 1)[1].split("\nonnx/cpu/none failed: ")[0]
    first, *rest = reasons.splitlines()
    assert first.startswith("loading/running model.onnx in a fresh process exited with status")
    # The child's traceback, indented under its row: onnxruntime names what it could not parse.
    assert rest, reasons
    assert all(line.startswith("    ") for line in rest), reasons
    assert "onnxruntime" in reasons.lower() or "protobuf" in reasons.lower(), reasons
    # The other optimisation level failed the same way: its reason is not printed twice.
    assert "onnx/cpu/none failed: the same reason as onnx/cpu/all" in printed, printed


def test_allow_partial_publishes_and_records_failures(
    trained_run, tmp_path: Path, compose_export
) -> None:
    out = tmp_path / "exported"
    cfg = compose_export(
        [f"run_dir={trained_run('mlp')}", f"output_dir={out}", "name=mlp", "devices=[cpu]",
         "formats=[torchscript,onnx]", "parity.tolerance.onnx.abs=0", "parity.tolerance.onnx.rel=0", "allow_partial=true"]
    )  # fmt: skip
    manifest = run_export(cfg).manifest
    assert manifest["allow_partial"] is True
    assert manifest["parity"]["passed"] is False
    assert manifest["failed_artifacts"] == ["onnx/cpu"]
    assert {a["format"]: a["passed"] for a in manifest["artifacts"]} == {
        "torchscript": True,
        "onnx": False,
    }


def test_existing_export_is_kept_unless_overwrite(
    trained_run, tmp_path: Path, compose_export
) -> None:
    out = tmp_path / "exported"
    base = [
        f"run_dir={trained_run('mlp')}",
        f"output_dir={out}",
        "name=mlp",
        "formats=[torchscript]",
    ]
    first = run_export(compose_export([*base, "devices=[cpu]"])).manifest
    with pytest.raises(FileExistsError, match="overwrite=true"):
        run_export(compose_export([*base, "devices=[cpu]"]))
    second = run_export(compose_export([*base, "devices=[cpu]", "overwrite=true"])).manifest
    assert second["created"] >= first["created"]
    assert sorted(p.name for p in out.iterdir()) == ["mlp"]


def test_tampered_checkpoint_is_refused(trained_run, tmp_path: Path, compose_export) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run("mlp"), run_dir)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    with ckpt.open("ab") as fh:
        fh.write(b"tampered")
    cfg = compose_export([f"run_dir={run_dir}", "ckpt=last", f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(CheckpointError, match="sha256"):
        run_export(cfg)
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_run_without_checkpoints_is_refused(tmp_path: Path, compose_export) -> None:
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.yaml").write_text("{}\n")
    cfg = compose_export([f"run_dir={run_dir}", f"output_dir={tmp_path / 'out'}"])
    with pytest.raises(CheckpointError, match="not found"):
        run_export(cfg)


def test_checkpoint_of_another_contract_is_refused(
    trained_run, tmp_path: Path, fast_overrides, compose_train, compose_export
) -> None:
    flat_only = compose_train(
        [*fast_overrides, "model=mlp", "data.contract.jagged=[]", "trainer.max_epochs=1"],
        tmp_path / "flat",
    )
    from project.training.run import train

    train(flat_only)
    other_ckpt = Path(flat_only.paths.output_dir) / "checkpoints" / "last.ckpt"
    cfg = compose_export(
        [f"run_dir={trained_run('deepsets')}", f"ckpt={other_ckpt}", f"output_dir={tmp_path / 'o'}"]
    )
    with pytest.raises(CheckpointError, match="the checkpoint belongs to another run"):
        run_export(cfg)


def test_unknown_format_and_unwritable_output_are_refused(
    trained_run, tmp_path: Path, compose_export
) -> None:
    run = trained_run("mlp")
    with pytest.raises(ValueError, match="unknown export formats"):
        run_export(compose_export([f"run_dir={run}", "formats=[tflite]"]))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(PermissionError, match="cannot write exports"):
        run_export(compose_export([f"run_dir={run}", f"output_dir={blocker / 'sub'}"]))


def test_export_cli_reports_bad_run_dir(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "scripts/export.py",
            f"run_dir={tmp_path / 'nope'}",
            f"paths.log_dir={tmp_path}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert "export failed" in proc.stderr
    assert "not found" in proc.stderr


def test_dynamic_shape_specs_follow_contract(exported) -> None:
    contract = InputContract.from_dict(_manifest(exported("deepsets"))["contract"])
    names = contract.input_dims
    assert names["part_offsets"] == "batch_plus_1"
    assert names["jet_pt"] == "batch"
    assert names["part_pt"] == "n_part"
    (specs,) = formats.dynamic_shapes(contract)
    assert len(specs) == len(contract.input_names)
