"""The standalone runtime on real exports: every backend and model against the golden file,
every input form, chunking, empty inputs, the default backend choice and the CLI."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from project.inference import FORMATS, PREFERENCE, ParityFailedError, load
from project.inference.threads import ThreadPolicy, apply_torch_policy
from project.predict.cli import main as cli_main

# The inter-op pool can be sized only before any inter-op work in this process, so the
# deployment policy is applied at import; intra-op threads are given back to the other tests
# until this module's models load (and again after it).
_INTRA_OP = torch.get_num_threads()
apply_torch_policy(ThreadPolicy.single())
torch.set_num_threads(_INTRA_OP)

MODELS = ("mlp", "deepsets", "transformer")


@pytest.fixture(scope="module", autouse=True)
def _restore_intra_op_threads():
    yield
    torch.set_num_threads(_INTRA_OP)


def write_manifest(export_dir: Path, manifest: dict) -> None:
    """Replace an export's manifest and its hash record, as the export writes them."""
    text = json.dumps(manifest, indent=2) + "\n"
    (export_dir / "manifest.json").write_text(text)
    (export_dir / "manifest.sha256").write_text(hashlib.sha256(text.encode()).hexdigest() + "\n")


def golden(export_dir: Path) -> dict[str, np.ndarray]:
    """The export's golden inputs and expected outputs."""
    with np.load(export_dir / "golden.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def mlp_models(exported) -> dict[str, object]:
    """The toy MLP export loaded once per backend."""
    return {fmt: load(exported("mlp"), fmt) for fmt in FORMATS}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("model_name", MODELS)
def test_backend_reproduces_golden(exported, model_name: str, fmt: str, tile_golden) -> None:
    export_dir = exported(model_name)
    model = load(export_dir, fmt)
    assert model.backend == fmt
    gold = golden(export_dir)
    got = model(gold)
    assert list(got) == list(model.output_names)
    for name in model.output_names:
        assert got[name].dtype == np.float32
        assert got[name].shape == gold[name].shape
        np.testing.assert_allclose(got[name], gold[name], atol=1e-4, rtol=1e-4)
    # Rows are independent: one row alone equals that row in the batch.
    row = tile_golden(gold, model.contract, 1)
    np.testing.assert_allclose(model(row)[name], gold[name][:1], atol=1e-4, rtol=1e-4)


def test_default_backend_is_first_preference_that_passed(exported, tmp_path: Path) -> None:
    model = load(exported("mlp"))
    assert model.backend == PREFERENCE[0]
    assert model.selection == []
    # A copy whose manifest marks the preferred artifact as failed falls back to the next.
    copy = tmp_path / "export"
    shutil.copytree(exported("mlp"), copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    for art in manifest["artifacts"]:
        if art["format"] == PREFERENCE[0]:
            art["passed"] = False
    write_manifest(copy, manifest)
    fallback = load(copy)
    assert fallback.backend == PREFERENCE[1]
    assert "parity" in fallback.selection[0]
    with pytest.raises(ParityFailedError, match="failed its parity check"):
        load(copy, PREFERENCE[0])


def _forms(gold: dict[str, np.ndarray], contract) -> dict[str, object]:
    import awkward as ak
    import pyarrow as pa

    offsets = gold["part_offsets"]
    counts = np.diff(offsets)
    flat = {n: gold[n] for n in contract.flat_names}
    fields = {f.name: gold[f"part_{f.name}"] for f in contract.jagged[0].fields}
    lists = {
        f"part_{k}": pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(v))
        for k, v in fields.items()
    }
    table = pa.table({"extra": np.zeros(len(counts)), **flat, **lists})
    shuffled = dict(reversed(list(gold.items())))  # any column order
    with_counts = {k: v for k, v in gold.items() if k != "part_offsets"}
    with_counts["part_counts"] = counts.astype(np.int32)
    return {
        "mapping": shuffled,
        "mapping with counts": with_counts,
        "mapping of float64 and int32": {
            k: (v.astype(np.float64) if v.dtype == np.float32 else v.astype(np.int32))
            for k, v in gold.items()
        },
        "arrow table": table,
        "arrow record batch": table.to_batches()[0],
        "arrow table in chunks": pa.concat_tables([table.slice(0, 30), table.slice(30)]),
        "awkward nested record": ak.zip(
            {**flat, "part": ak.unflatten(ak.zip(fields), counts)}, depth_limit=1
        ),
        "awkward with option types (as read from Parquet)": ak.from_arrow(table),
        "awkward list fields": ak.zip(
            {**flat, **{f"part_{k}": ak.unflatten(v, counts) for k, v in fields.items()}},
            depth_limit=1,
        ),
    }


def test_every_input_form_gives_the_same_result(exported, mlp_models) -> None:
    gold = golden(exported("mlp"))
    model = mlp_models["onnx"]
    for form, inputs in _forms(gold, model.contract).items():
        got = model(inputs)
        np.testing.assert_allclose(
            got["prob_top"], gold["prob_top"], atol=1e-4, rtol=1e-4, err_msg=form
        )


def test_filtered_and_reordered_awkward_arrays(exported, mlp_models) -> None:
    """``events[mask]``, ``events[::-1]``, ``events[[5, 1, 7]]``: awkward keeps them as an index
    over the original buffers; their rows are gathered and give the rows' own results."""
    gold = golden(exported("mlp"))
    model = mlp_models["onnx"]
    forms = _forms(gold, model.contract)
    n = len(gold["prob_top"])
    selections = {
        "mask": np.arange(n) % 3 == 1,
        "reversed": slice(None, None, -1),
        "list": [5, 1, 7],
    }
    for form in (
        "awkward nested record",
        "awkward list fields",
        "awkward with option types (as read from Parquet)",
    ):
        for how, selection in selections.items():
            rows = np.arange(n)[selection]
            got = model(forms[form][selection])["prob_top"]
            np.testing.assert_allclose(
                got, gold["prob_top"][rows], atol=1e-4, rtol=1e-4, err_msg=f"{form}, {how}"
            )


def test_sliced_arrow_table(exported, mlp_models) -> None:
    gold = golden(exported("mlp"))
    table = _forms(gold, mlp_models["aoti"].contract)["arrow table"]
    got = mlp_models["aoti"](table.slice(10, 20))
    np.testing.assert_allclose(got["prob_top"], gold["prob_top"][10:30], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_chunks_equal_one_big_call(exported, mlp_models, fmt: str, tile_golden) -> None:
    whole = mlp_models[fmt]
    chunked = load(exported("mlp"), fmt, max_batch=7, verify_golden=False)
    calls: list[int] = []
    run = chunked.runner.run
    chunked.runner.run = lambda arrays, outs: calls.append(len(outs[0])) or run(arrays, outs)
    cols = tile_golden(golden(exported("mlp")), whole.contract, 200)
    expected, got = whole(cols), chunked(cols)
    assert len(calls) == 29
    assert max(calls) == 7
    assert sum(calls) == 200
    for name in whole.output_names:
        np.testing.assert_allclose(got[name], expected[name], atol=1e-6, rtol=1e-6)


def test_chunks_of_a_jagged_model(exported, tile_golden) -> None:
    whole = load(exported("deepsets"), "onnx")
    chunked = load(exported("deepsets"), "onnx", max_batch=7, verify_golden=False)
    cols = tile_golden(golden(exported("deepsets")), whole.contract, 100)
    np.testing.assert_allclose(
        chunked(cols)["prob_top"], whole(cols)["prob_top"], atol=1e-6, rtol=1e-6
    )


@pytest.mark.parametrize("fmt", FORMATS)
def test_empty_input_gives_empty_outputs(mlp_models, fmt: str) -> None:
    import pyarrow as pa

    model = mlp_models[fmt]
    cols = {n: np.empty(0, np.float32) for n in model.input_names}
    cols["part_offsets"] = np.zeros(1, np.int64)
    lists = model.contract.jagged[0].field_input_names
    table = pa.table(
        {n: pa.array([], pa.float32()) for n in model.contract.flat_names}
        | {n: pa.array([], pa.list_(pa.float32())) for n in lists}
    )
    for inputs in (cols, table):
        got = model(inputs)
        assert set(got) == set(model.output_names)
        assert all(v.dtype == np.float32 and v.shape == (0,) for v in got.values())


def test_out_buffers_and_reused_outputs(exported, mlp_models, tile_golden) -> None:
    gold = golden(exported("mlp"))
    n = len(gold["prob_top"])
    for fmt, model in mlp_models.items():
        out = {o: np.full(n + 10, -1.0, np.float32) for o in model.output_names}
        got = model(gold, out=out)
        assert np.shares_memory(got["prob_top"], out["prob_top"]), fmt
        np.testing.assert_allclose(out["prob_top"][:n], gold["prob_top"], atol=1e-4, rtol=1e-4)
        assert (out["prob_top"][n:] == -1).all()
    reusing = load(exported("mlp"), "onnx", reuse_outputs=True, verify_golden=False)
    first = reusing(gold)["prob_top"]
    second = reusing(tile_golden(gold, reusing.contract, 5))["prob_top"]
    assert np.shares_memory(first, second)  # one buffer per thread, overwritten per call


def _write_root(path: Path, gold: dict[str, np.ndarray], contract, trees: tuple[str, ...]) -> None:
    import awkward as ak
    import uproot

    counts = np.diff(gold["part_offsets"])
    flat = {n: gold[n] for n in contract.flat_names}
    flat["event"] = np.arange(len(counts), dtype=np.int64) + 100
    part = ak.zip(
        {f.name: ak.unflatten(gold[f"part_{f.name}"], counts) for f in contract.jagged[0].fields}
    )
    with uproot.recreate(path) as f:
        for name in trees:
            tree = f.mktree(name, {**{k: v.dtype for k, v in flat.items()}, "part": part.type})
            tree.extend({**flat, "part": part})


def test_cli_parquet_and_root(exported, mlp_models, tmp_path: Path, capsys) -> None:
    import pyarrow.parquet as pq

    export_dir = exported("mlp")
    gold = golden(export_dir)
    contract = mlp_models["onnx"].contract
    table = _forms(gold, contract)["arrow table"]
    pq.write_table(table, tmp_path / "in.parquet")
    assert (
        cli_main(
            [
                str(export_dir),
                str(tmp_path / "in.parquet"),
                "--backend",
                "onnx",
                "--out",
                str(tmp_path / "a.parquet"),
                "--step-size",
                "30",
            ]
        )
        == 0
    )
    out = pq.read_table(tmp_path / "a.parquet")
    assert out.column_names == ["row", *contract.outputs]
    np.testing.assert_array_equal(out["row"].to_numpy(), np.arange(len(gold["prob_top"])))
    np.testing.assert_allclose(out["prob_top"].to_numpy(), gold["prob_top"], atol=1e-4)

    _write_root(tmp_path / "in.root", gold, contract, ("Events",))
    assert (
        cli_main([str(export_dir), str(tmp_path / "in.root"), "--out", str(tmp_path / "b.parquet")])
        == 0
    )
    out = pq.read_table(tmp_path / "b.parquet")
    assert out.column_names == ["event", *contract.outputs]
    np.testing.assert_array_equal(out["event"].to_numpy(), np.arange(len(gold["prob_top"])) + 100)
    np.testing.assert_allclose(out["prob_top"].to_numpy(), gold["prob_top"], atol=1e-4)

    _write_root(tmp_path / "two.root", gold, contract, ("A", "B"))
    args = [str(export_dir), str(tmp_path / "two.root"), "--out", str(tmp_path / "c.parquet")]
    assert cli_main(args) == 2
    assert "choose one with --tree" in capsys.readouterr().err
    assert cli_main([*args, "--tree", "B", "--id-columns", "event,jet_pt"]) == 0
    assert pq.read_table(tmp_path / "c.parquet").column_names[:2] == ["event", "jet_pt"]


def test_cli_real_root_file_without_the_columns(exported, tmp_path: Path) -> None:
    """A real NanoAOD file through the real entry point: the missing branches are named."""
    data = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "project.inference",
            str(exported("mlp")),
            str(data / "nanoAOD_2015_CMS_Open_Data_ttbar.root"),
            "--backend",
            "onnx",
            "--out",
            str(tmp_path / "x.parquet"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2, result.stderr
    assert "lacks 'jet_pt'" in result.stderr
    assert "Jet_pt" in result.stderr
    assert not (tmp_path / "x.parquet").exists()
