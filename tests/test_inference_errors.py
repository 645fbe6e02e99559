"""Bad inputs and bad exports: each a clear error, never a silently wrong answer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from project.inference import (
    ArtifactError,
    InputError,
    IntegrityError,
    MissingManifestError,
    ParityFailedError,
    load,
)
from project.inference.threads import ThreadPolicy, apply_torch_policy

# The inter-op pool can be sized only before any inter-op work in this process, so the
# deployment policy is applied at import; intra-op threads are given back to the other tests
# until this module's models load (and again after it).
_INTRA_OP = torch.get_num_threads()
apply_torch_policy(ThreadPolicy.single())
torch.set_num_threads(_INTRA_OP)


@pytest.fixture(scope="module", autouse=True)
def _restore_intra_op_threads():
    yield
    torch.set_num_threads(_INTRA_OP)


@pytest.fixture(scope="module")
def model(exported):
    return load(exported("deepsets"), "onnx")


@pytest.fixture
def cols(exported) -> dict[str, np.ndarray]:
    """Fresh golden inputs (tests modify them)."""
    with np.load(exported("deepsets") / "golden.npz") as data:
        return {k: data[k].copy() for k in data.files}


def test_missing_column_is_named_with_the_expected_ones(model, cols) -> None:
    del cols["jet_eta"]
    with pytest.raises(InputError, match=r"no column 'jet_eta'.*expects.*jet_pt, jet_eta"):
        model(cols)
    cols["jet_eta"] = cols["jet_pt"]
    del cols["part_offsets"]
    with pytest.raises(InputError, match=r"'part_offsets'.*part_offsets \(or part_counts\)"):
        model(cols)


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("jet_pt", "strings", "cannot be cast safely to the contract's float32"),
        ("part_offsets", "fractions", "fraction at index"),
        ("part_offsets", "booleans", "cannot be cast safely to int64"),
        ("jet_pt", "two-d", "SoA columns are 1-D"),
    ],
)
def test_unsafe_dtypes_and_shapes(model, cols, column: str, value: str, message: str) -> None:
    arr = cols[column]
    cols[column] = {
        "strings": arr.astype(str),
        "fractions": arr.astype(np.float64) + 0.5 * (np.arange(len(arr)) % 2),
        "booleans": arr.astype(bool),
        "two-d": np.stack([arr, arr], axis=1),
    }[value]
    with pytest.raises(InputError, match=message):
        model(cols)


def test_allowed_conversions_give_the_same_answer(model, cols) -> None:
    expected = model(cols)["prob_top"]
    cols["part_offsets"] = cols["part_offsets"].astype(np.float64)  # whole numbers: fine
    cols["jet_pt"] = cols["jet_pt"].astype(np.float64)
    cols["part_pt"] = cols["part_pt"][::-1].copy()[::-1]  # non-contiguous views are copied
    np.testing.assert_allclose(model(cols)["prob_top"], expected, atol=1e-6)


def test_inconsistent_lengths(model, cols) -> None:
    short = dict(cols, jet_eta=cols["jet_eta"][:-1])
    with pytest.raises(InputError, match=r"flat columns have different lengths.*'jet_eta'"):
        model(short)
    with pytest.raises(InputError, match="offsets need one entry per row plus one"):
        model(dict(cols, part_offsets=cols["part_offsets"][:-1]))


def test_bad_offsets(model, cols) -> None:
    offsets = cols["part_offsets"]
    swapped = offsets.copy()
    swapped[[3, 4]] = swapped[[4, 3]]
    with pytest.raises(InputError, match="decreases at row 3"):
        model(dict(cols, part_offsets=swapped))
    with pytest.raises(InputError, match=r"'part_dr' has \d+ values but part_offsets\[-1\]"):
        model(dict(cols, part_dr=cols["part_dr"][:-1]))
    with pytest.raises(InputError, match="must start at 0"):
        model(dict(cols, part_offsets=offsets + 1))
    counts = dict(cols, part_counts=np.diff(offsets) * -1)
    del counts["part_offsets"]
    with pytest.raises(InputError, match="negative counts"):
        model(counts)


@pytest.mark.parametrize("column", ["jet_mass", "part_pt"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused(model, exported, cols, column: str, bad: float) -> None:
    cols[column][len(cols[column]) // 2] = bad
    with pytest.raises(InputError, match=rf"non-finite input values: '{column}'"):
        model(cols)
    lenient = load(exported("deepsets"), "onnx", nan_policy="ignore", verify_golden=False)
    assert lenient(cols)["prob_top"].shape == (len(cols["jet_pt"]),)


def test_with_nan_policy_shares_the_backend_not_the_policy(model, cols) -> None:
    lenient = model.with_nan_policy("ignore")
    assert lenient.runner is model.runner
    assert lenient.nan_policy == "ignore"
    assert model.nan_policy == "raise"
    expected = model(cols)["prob_top"]
    np.testing.assert_array_equal(lenient(cols)["prob_top"], expected)
    assert lenient.workspace() is not model.workspace()
    cols["jet_eta"][0] = np.nan
    assert lenient(cols)["prob_top"].shape == expected.shape
    with pytest.raises(InputError, match="'jet_eta': 1 NaN"):
        model(cols)
    with pytest.raises(ValueError, match="nan_policy must be one of"):
        model.with_nan_policy("skip")


def test_nan_check_at_large_batches_and_float64_overflow(model, cols) -> None:
    from project.inference.columns import tile_golden

    big = tile_golden(cols, model.contract, 3000)  # beyond the small-batch fast path
    big["part_erel"][-1] = np.nan
    with pytest.raises(InputError, match="'part_erel': 1 NaN"):
        model(big)
    cols["jet_pt"] = cols["jet_pt"].astype(np.float64)
    cols["jet_pt"][0] = 1e300  # finite in float64, Inf as the contract's float32
    with pytest.raises(InputError, match="'jet_pt': 0 NaN and 1 Inf"):
        model(cols)


def test_nan_and_inf_in_one_row_of_flat_columns() -> None:
    """One event at a time with flat columns only (as the jet MLP's contract has; its own
    screen, the row's values summed): NaN, Inf and -Inf are found in every column, on the
    first call and on the same arrays again; the largest finite float32 values in all of
    them at once are not mistaken for an overflow."""
    from project.contract import Feature, InputContract
    from project.inference.prepare import InputPlan
    from project.inference.workspace import Workspace

    names = [f"x{i}" for i in range(9)]
    plan = InputPlan(InputContract(flat=tuple(Feature(n) for n in names)))
    ws = Workspace()
    row = {n: np.ones(1, np.float32) for n in names}
    arrays, n_rows = plan.prepare(row, ws)
    assert n_rows == 1
    assert all(a is row[n] for a, n in zip(arrays, names, strict=True))  # no copies
    for name in names:
        for bad in (np.nan, np.inf, -np.inf):
            for fresh in (False, True):
                plan.prepare(row, ws)  # the same arrays as the last call: the short path
                row[name][0] = bad
                cols = {k: v.copy() for k, v in row.items()} if fresh else row
                with pytest.raises(InputError, match=f"'{name}': {int(np.isnan(bad))} NaN"):
                    plan.prepare(cols, ws)
                row[name][0] = 1.0
    row[names[0]][0], row[names[1]][0] = np.inf, -np.inf  # NaN only as a sum
    with pytest.raises(InputError, match=f"'{names[0]}': 0 NaN and 1 Inf"):
        plan.prepare(row, ws)
    huge = {n: np.full(1, np.finfo(np.float32).max, np.float32) for n in names}
    assert plan.prepare(huge, ws)[1] == 1
    assert plan.prepare(huge, ws)[1] == 1  # and again on the short path


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("n_rows", [900, 5000])
def test_nan_found_in_every_column_and_every_slice(model, cols, n_rows) -> None:
    """Each column is screened on its own, longer ones in slices of ``_DOT_LIMIT`` values
    (the jagged fields at 5000 jets are several slices long): a NaN in any column, at its
    first or last value or on either side of a slice boundary, is found; the largest finite
    float32 in every value of a long column, of both signs, is neither refused nor warned
    about (the screen's sums cannot overflow)."""
    from project.inference.columns import tile_golden
    from project.inference.prepare import _DOT_LIMIT

    big = tile_golden(cols, model.contract, n_rows)
    names = model.contract.flat_names + list(model.contract.jagged[0].field_input_names)
    assert max(len(big[n]) for n in names) > 2 * _DOT_LIMIT or n_rows < 1000
    for name in names:
        n = len(big[name])
        for index in {0, n - 1, *(i for i in (_DOT_LIMIT - 1, _DOT_LIMIT) if i < n)}:
            bad = {k: v.copy() for k, v in big.items()}
            bad[name][index] = np.nan
            with pytest.raises(InputError, match=f"'{name}': 1 NaN"):
                model(bad)
    assert model(big)["prob_top"].shape == (n_rows,)
    largest = np.finfo(np.float32).max
    huge = dict(big, part_pt=np.full_like(big["part_pt"], largest))
    huge["part_pt"][1::3] = -largest
    lenient = model.with_nan_policy("ignore")
    np.testing.assert_array_equal(model(huge)["prob_top"], lenient(huge)["prob_top"])


def test_bad_arrow_and_other_inputs(model, cols) -> None:
    import pyarrow as pa

    offsets = pa.array(cols["part_offsets"].astype(np.int32))
    flat = {n: cols[n] for n in model.contract.flat_names}
    lists = {
        n: pa.ListArray.from_arrays(offsets, pa.array(cols[n]))
        for n in model.contract.jagged[0].field_input_names
    }
    with_null = dict(flat, jet_pt=pa.array([None, *cols["jet_pt"][1:].tolist()], pa.float32()))
    with pytest.raises(InputError, match="'jet_pt' has 1 null"):
        model(pa.table({**with_null, **lists}))
    in_dictionary = pa.DictionaryArray.from_arrays(  # a null value, not a null index
        pa.array(np.arange(len(cols["jet_pt"])) % 2, pa.int32()),
        pa.array([1.0, None], pa.float32()),
    )
    with pytest.raises(InputError, match="'jet_pt' has 45 null"):
        model(pa.table({**flat, "jet_pt": in_dictionary, **lists}))
    with pytest.raises(InputError, match="must be a list column"):
        model(pa.table({**flat, **lists, "part_pt": np.zeros(len(cols["jet_pt"]), np.float32)}))
    other = pa.ListArray.from_arrays(
        pa.array(np.zeros_like(cols["part_offsets"])), pa.array([], pa.float32())
    )
    with pytest.raises(InputError, match="different list lengths"):
        model(pa.table({**flat, **lists, "part_dr": other}))
    with pytest.raises(InputError, match=r"no column 'part_deta'.*The input has: jet_eta"):
        model(pa.table(flat))
    with pytest.raises(InputError, match="unsupported input type"):
        model([1, 2, 3])
    with pytest.raises(InputError, match=r"out\['prob_qcd'\] must be"):
        model(cols, out={o: np.empty(3, np.float64) for o in model.output_names})


def test_values_that_asarray_would_take_wrongly(model, cols) -> None:
    """Masked values, Arrow nulls in a mapping, a tensor that needs grad, a scalar, another
    table column of the same name, overlapping or misnamed ``out``: each an ``InputError``
    that names the column (``np.asarray`` alone drops a mask and turns nulls into NaN)."""
    import pyarrow as pa

    expected = model(cols)["prob_top"]
    pt = cols["jet_pt"]
    cols["jet_pt"] = np.ma.masked_array(pt.copy(), mask=np.arange(len(pt)) == 3)
    cols["jet_pt"].data[3] = 1e30  # what the model would see if the mask were dropped
    with pytest.raises(InputError, match=r"'jet_pt' is a masked array with 1 masked value"):
        model(cols)
    cols["jet_pt"] = np.ma.masked_array(pt.copy(), mask=False)  # nothing masked: its data
    np.testing.assert_array_equal(model(cols)["prob_top"], expected)
    cols["jet_pt"] = pa.array([*pt[:-1].tolist(), None], pa.float32())
    with pytest.raises(InputError, match="'jet_pt' has 1 null values"):
        model(cols)
    cols["jet_pt"] = torch.from_numpy(pt).requires_grad_()
    with pytest.raises(InputError, match="'jet_pt' cannot be read as a 1-D array"):
        model(cols)
    cols["jet_pt"] = None
    with pytest.raises(InputError, match="'jet_pt' is a NoneType, not an array"):
        model(cols)
    cols["jet_pt"] = pt
    flat = {n: cols[n] for n in model.contract.flat_names}
    offsets = pa.array(cols["part_offsets"].astype(np.int32))
    fields = model.contract.jagged[0].field_input_names
    lists = {n: pa.ListArray.from_arrays(offsets, pa.array(cols[n])) for n in fields}
    table = pa.table({**flat, **lists}).append_column("jet_pt", [pt])
    with pytest.raises(InputError, match="2 columns named 'jet_pt'; rename or drop"):
        model(table)
    shared = np.empty(len(pt), np.float32)
    with pytest.raises(InputError, match=r"out\['prob_top'\] and out\['prob_qcd'\] share memory"):
        model(cols, out=dict.fromkeys(model.output_names, shared))
    with pytest.raises(InputError, match="out must be a mapping of output name to array"):
        model(cols, out=[shared, shared.copy()])
    with pytest.raises(TypeError, match="max_batch must be an integer"):
        load(model.export.path, "onnx", max_batch=2.5, verify_golden=False)


def test_export_directory_without_manifest(tmp_path: Path) -> None:
    with pytest.raises(MissingManifestError, match=r"has no manifest\.json"):
        load(tmp_path)
    with pytest.raises(MissingManifestError, match="does not exist"):
        load(tmp_path / "nowhere")


@pytest.fixture
def export_copy(exported, tmp_path: Path) -> Path:
    copy = tmp_path / "export"
    shutil.copytree(exported("deepsets"), copy)
    return copy


@pytest.mark.parametrize("fmt", ["torchscript", "aoti", "onnx"])
def test_tampered_artifact_is_refused(export_copy: Path, fmt: str) -> None:
    manifest = json.loads((export_copy / "manifest.json").read_text())
    file = next(a["file"] for a in manifest["artifacts"] if a["format"] == fmt)
    data = bytearray((export_copy / file).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (export_copy / file).write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=f"{file} has sha256 .* manifest records"):
        load(export_copy, fmt)


def test_tampered_golden_file_and_bad_manifests(export_copy: Path) -> None:
    with np.load(export_copy / "golden.npz") as data:
        arrays = {k: data[k] for k in data.files}
    arrays["prob_top"] = arrays["prob_top"] + 0.5
    np.savez(export_copy / "golden.npz", **arrays)
    with pytest.raises(IntegrityError, match="golden file"):
        load(export_copy, "onnx")
    load(export_copy, "onnx", verify_golden=False)  # the artifact itself is fine

    manifest_file = export_copy / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    for art in manifest["artifacts"]:
        art["passed"] = False
    manifest_file.write_text(json.dumps(manifest))
    with pytest.raises(ParityFailedError, match="onnx: failed its parity check"):
        load(export_copy, "onnx", verify_golden=False)
    with pytest.raises(ParityFailedError):
        load(export_copy, verify_golden=False)
    manifest_file.write_text("{}")
    with pytest.raises(ArtifactError, match="not a valid export manifest"):
        load(export_copy)
    with pytest.raises(ValueError, match="unknown backend"):
        load(export_copy, "tensorrt")


def test_golden_mismatch_on_this_machine_is_refused(export_copy: Path) -> None:
    """An artifact whose outputs differ from the golden file (its hash updated) is refused."""
    from project.inference.export_dir import sha256_of

    with np.load(export_copy / "golden.npz") as data:
        arrays = {k: data[k] for k in data.files}
    arrays["prob_top"] = arrays["prob_top"] + 0.01
    np.savez(export_copy / "golden.npz", **arrays)
    manifest = json.loads((export_copy / "manifest.json").read_text())
    manifest["golden"]["sha256"] = sha256_of(export_copy / "golden.npz")
    (export_copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ParityFailedError, match="does not reproduce its golden output 'prob_top'"):
        load(export_copy, "onnx")


def test_cli_reports_bad_values_and_writes_nothing(exported, cols, tmp_path: Path, capsys) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from project.inference.cli import main

    offsets = pa.array(cols["part_offsets"].astype(np.int32))
    table = pa.table(
        {n: cols[n] for n in ("jet_pt", "jet_eta", "jet_mass", "jet_n_constituents")}
        | {n: cols[n] for n in cols if n.startswith("jet_tau")}
        | {
            n: pa.ListArray.from_arrays(offsets, pa.array(cols[n]))
            for n in cols
            if n.startswith("part_") and n != "part_offsets"
        }
    )
    bad = table.set_column(
        0, "jet_pt", pa.array(np.where(np.arange(len(table)) == 3, np.nan, cols["jet_pt"]))
    )
    pq.write_table(bad, tmp_path / "bad.parquet")
    out = tmp_path / "scores.parquet"
    assert main([str(exported("deepsets")), str(tmp_path / "bad.parquet"), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "rows from 0" in err
    assert "'jet_pt': 1 NaN" in err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "bad.parquet"]
