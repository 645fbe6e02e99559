"""Bad inputs and bad exports: each a clear error, never a silently wrong answer."""

from __future__ import annotations

import hashlib
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
from project.predict.cli import main as cli_main

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


def write_manifest(export_dir: Path, manifest: dict) -> None:
    """Replace an export's manifest and its hash record, as the export writes them."""
    text = json.dumps(manifest, indent=2) + "\n"
    (export_dir / "manifest.json").write_text(text)
    (export_dir / "manifest.sha256").write_text(hashlib.sha256(text.encode()).hexdigest() + "\n")


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
    # Offsets may start anywhere, but never below 0 nor past the end of the fields.
    with pytest.raises(InputError, match=r"'part_offsets' starts at -1: .* cannot be negative"):
        model(dict(cols, part_offsets=offsets - 1))
    with pytest.raises(InputError, match=r"part_offsets\[-1\] is \d+: the offsets point past"):
        model(dict(cols, part_offsets=offsets + 1))
    counts = dict(cols, part_counts=np.diff(offsets) * -1)
    del counts["part_offsets"]
    with pytest.raises(InputError, match="negative counts"):
        model(counts)


def _counts(cols: dict[str, np.ndarray], counts: np.ndarray) -> dict[str, np.ndarray]:
    out = dict(cols, part_counts=counts)
    del out["part_offsets"]
    return out


def test_counts_that_wrap_around_or_overflow(model, cols) -> None:
    """Counts are checked before they become offsets: uint64 counts holding 2**64-1 (a -1
    stored unsigned, which wraps back into plausible offsets), int64 counts whose sum
    overflows, and counts that do not sum to the fields' length are refused."""
    expected = model(cols)["prob_top"]
    counts = np.diff(cols["part_offsets"]).astype(np.uint64)
    np.testing.assert_array_equal(model(_counts(cols, counts))["prob_top"], expected)
    wrapped = counts.copy()
    wrapped[0] = 2**64 - 1  # a -1 stored unsigned: offsets[1] would become -1
    wrapped[1] = int(counts[1]) + int(counts[0]) + 1  # the same total, modulo 2**64
    with pytest.raises(InputError, match=r"'part_counts' has values beyond the int64 range"):
        model(_counts(cols, wrapped))
    huge = np.full(len(counts), 2**62, np.int64)
    with pytest.raises(InputError, match="'part_counts' sums beyond the int64 range"):
        model(_counts(cols, huge))
    short = counts.astype(np.int64)
    short[2] += 1
    with pytest.raises(
        InputError, match=r"has \d+ values but 'part_counts' sums to \d+: the counts must cover"
    ):
        model(_counts(cols, short))
    with pytest.raises(InputError, match="'part_counts' has dtype bool, which cannot be cast"):
        model(_counts(cols, counts.astype(bool)))


def test_offsets_and_counts_given_together_must_agree(model, cols) -> None:
    expected = model(cols)["prob_top"]
    both = dict(cols, part_counts=np.diff(cols["part_offsets"]))
    np.testing.assert_array_equal(model(both)["prob_top"], expected)
    both["part_counts"] = both["part_counts"][::-1].copy()
    with pytest.raises(InputError, match=r"both 'part_offsets' and 'part_counts' .* disagree"):
        model(both)


def test_booleans_only_where_the_contract_declares_them(model, cols, export_copy) -> None:
    """A bool column is refused unless its feature is declared ``boolean: true``; then it is
    taken as 0/1, the same as those numbers given as float32."""
    flags = cols["jet_n_constituents"] > np.median(cols["jet_n_constituents"])
    with pytest.raises(InputError, match="'jet_n_constituents' holds booleans, but the contract"):
        model(dict(cols, jet_n_constituents=flags))
    manifest = json.loads((export_copy / "manifest.json").read_text())
    for feature in manifest["contract"]["flat"]:
        if feature["name"] == "jet_n_constituents":
            feature["boolean"] = True
    write_manifest(export_copy, manifest)
    declared = load(export_copy, "onnx")
    assert declared.contract.flat[3].boolean
    as_numbers = declared(dict(cols, jet_n_constituents=flags.astype(np.float32)))["prob_top"]
    np.testing.assert_array_equal(
        declared(dict(cols, jet_n_constituents=flags))["prob_top"], as_numbers
    )
    assert not np.allclose(as_numbers, model(cols)["prob_top"])


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


def test_nan_check_at_large_batches_and_float64_overflow(model, cols, tile_golden) -> None:
    big = tile_golden(cols, model.contract, 3000)
    big["part_erel"][-1] = np.nan
    with pytest.raises(InputError, match="'part_erel': 1 NaN"):
        model(big)
    cols["jet_pt"] = cols["jet_pt"].astype(np.float64)
    cols["jet_pt"][0] = 1e300  # finite in float64, Inf as the contract's float32
    with pytest.raises(InputError, match="'jet_pt': 0 NaN and 1 Inf"):
        model(cols)


def test_nan_and_inf_in_one_row_of_flat_columns() -> None:
    """One event at a time with flat columns only (as the jet MLP's contract has): NaN, Inf
    and -Inf are found in every column, in fresh arrays and in the same arrays refilled in
    place; the largest finite float32 values in all of them at once are not an overflow."""
    from project.contract import Feature, InputContract
    from project.inference.prepare import InputPlan, Workspace

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
                plan.prepare(row, ws)
                row[name][0] = bad
                cols = {k: v.copy() for k, v in row.items()} if fresh else row
                with pytest.raises(InputError, match=f"'{name}': {int(np.isnan(bad))} NaN"):
                    plan.prepare(cols, ws)
                row[name][0] = 1.0
    row[names[0]][0], row[names[1]][0] = np.inf, -np.inf
    with pytest.raises(InputError, match=f"'{names[0]}': 0 NaN and 1 Inf"):
        plan.prepare(row, ws)
    huge = {n: np.full(1, np.finfo(np.float32).max, np.float32) for n in names}
    assert plan.prepare(huge, ws)[1] == 1
    assert plan.prepare(huge, ws)[1] == 1


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("n_rows", [900, 5000])
def test_nan_found_in_every_column_at_any_position(model, cols, n_rows, tile_golden) -> None:
    """A NaN in any column, at its first, middle or last value, is found; the largest finite
    float32 in every value of a long column, of both signs, is neither refused nor warned
    about."""
    big = tile_golden(cols, model.contract, n_rows)
    names = model.contract.flat_names + list(model.contract.jagged[0].field_input_names)
    for name in names:
        n = len(big[name])
        for index in {0, n // 2, n - 1}:
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
    cols["jet_pt"] = pt
    eta = cols["jet_eta"]
    cols["jet_eta"] = torch.from_numpy(eta).requires_grad_()  # numpy columns beside it
    with pytest.raises(InputError, match="'jet_eta' cannot be read as a 1-D array"):
        model(cols)
    # With the first column a tensor, the call takes tensors (and gives them back).
    cols["jet_pt"], cols["jet_eta"] = torch.from_numpy(pt).requires_grad_(), eta
    np.testing.assert_array_equal(model(cols)["prob_top"].numpy(), expected)
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

    manifest = json.loads((export_copy / "manifest.json").read_text())
    for art in manifest["artifacts"]:
        art["passed"] = False
    write_manifest(export_copy, manifest)
    with pytest.raises(ParityFailedError, match="onnx: failed its parity check"):
        load(export_copy, "onnx", verify_golden=False)
    with pytest.raises(ParityFailedError):
        load(export_copy, verify_golden=False)
    write_manifest(export_copy, {})
    with pytest.raises(ArtifactError, match="not a valid export manifest: at the top level"):
        load(export_copy)
    with pytest.raises(ValueError, match="unknown backend"):
        load(export_copy, "tensorrt")


def test_manifest_changed_after_export_is_refused(export_copy: Path) -> None:
    """``manifest.sha256`` covers the manifest: changed means or a verdict edited by hand
    are refused, and so is a manifest without its hash record."""
    manifest_file = export_copy / "manifest.json"
    manifest = json.loads(manifest_file.read_text())
    manifest["contract"]["flat"][0]["mean"] += 1.0
    manifest_file.write_text(json.dumps(manifest, indent=2) + "\n")
    with pytest.raises(IntegrityError, match=r"manifest .*manifest\.json has sha256 .* but "
                       r"manifest\.sha256 records"):  # fmt: skip
        load(export_copy, "onnx", verify_golden=False)
    (export_copy / "manifest.sha256").unlink()
    with pytest.raises(IntegrityError, match=r"has no manifest\.sha256"):
        load(export_copy, "onnx", verify_golden=False)


@pytest.mark.parametrize(
    ("change", "where"),
    [
        (lambda m: m["artifacts"][0].update(passed="false"), "at artifacts/0/passed: 'false'"),
        (lambda m: m["contract"]["flat"][0].update(mean="1.5"), "at contract/flat/0/mean"),
        (lambda m: m["inputs"][0].update(dtype="float16"), "at inputs/0/dtype"),
        (lambda m: m["tolerance"]["onnx"].update(abs=-1), "at tolerance/onnx/abs"),
        (lambda m: m.pop("golden"), "at the top level: 'golden' is a required property"),
    ],
)
def test_manifest_is_validated_against_the_schema(export_copy: Path, change, where: str) -> None:
    """Types included: ``"passed": "false"`` as text, a mean as text, an unknown dtype, a
    negative tolerance and a missing golden set are each refused, and the place is named.
    The schema trusted is the runtime's own, not the copy inside the export."""
    manifest = json.loads((export_copy / "manifest.json").read_text())
    change(manifest)
    write_manifest(export_copy, manifest)
    (export_copy / "manifest.schema.json").write_text("{}")  # would accept anything
    with pytest.raises(ArtifactError, match=rf"not a valid export manifest: {where}"):
        load(export_copy, "onnx", verify_golden=False)


def _point_onnx_at(export_copy: Path, file: str) -> None:
    manifest = json.loads((export_copy / "manifest.json").read_text())
    art = next(a for a in manifest["artifacts"] if a["format"] == "onnx")
    art["file"] = file
    write_manifest(export_copy, manifest)


def test_files_outside_the_export_directory_are_refused(exported, export_copy: Path) -> None:
    """An artifact or golden path that leaves the export (``..``, absolute, or a symbolic
    link to elsewhere) is refused, even with the other file's correct sha256: a copied
    export must not serve another model."""
    other = exported("mlp") / "model.onnx"  # its sha256 differs; recorded as this one's
    manifest = json.loads((export_copy / "manifest.json").read_text())
    art = next(a for a in manifest["artifacts"] if a["format"] == "onnx")
    art["sha256"] = hashlib.sha256(other.read_bytes()).hexdigest()
    write_manifest(export_copy, manifest)
    relative = "../" * len(export_copy.parts) + str(other).lstrip("/")
    for file in (relative, str(other)):
        _point_onnx_at(export_copy, file)
        with pytest.raises(ArtifactError, match="inside the export directory"):
            load(export_copy, "onnx", verify_golden=False)
    (export_copy / "model.onnx").unlink()
    (export_copy / "model.onnx").symlink_to(other)
    _point_onnx_at(export_copy, "model.onnx")
    with pytest.raises(ArtifactError, match=r"onnx artifact 'model.onnx' .* leaves the export"):
        load(export_copy, "torchscript", verify_golden=False)  # checked whichever is loaded
    manifest = json.loads((export_copy / "manifest.json").read_text())
    manifest["golden"]["file"] = "../golden.npz"
    write_manifest(export_copy, manifest)
    with pytest.raises(ArtifactError, match="inside the export directory"):
        load(export_copy, "torchscript")


def test_golden_file_of_objects_is_refused(export_copy: Path) -> None:
    """A golden file holding object arrays (only loadable with pickle, which could run code)
    is refused with its reason, even with its hash recorded."""
    with np.load(export_copy / "golden.npz") as data:
        arrays = {k: data[k] for k in data.files}
    arrays["prob_top"] = arrays["prob_top"].astype(object)
    np.savez(export_copy / "golden.npz", **arrays)
    manifest = json.loads((export_copy / "manifest.json").read_text())
    manifest["golden"]["sha256"] = hashlib.sha256(
        (export_copy / "golden.npz").read_bytes()
    ).hexdigest()
    write_manifest(export_copy, manifest)
    with pytest.raises(ArtifactError, match=r"cannot be read as numeric arrays.*Python objects"):
        load(export_copy, "onnx")
    load(export_copy, "onnx", verify_golden=False)


def test_golden_mismatch_on_this_machine_is_refused(export_copy: Path) -> None:
    """An artifact whose outputs differ from the golden file (its hash updated) is refused."""
    with np.load(export_copy / "golden.npz") as data:
        arrays = {k: data[k] for k in data.files}
    arrays["prob_top"] = arrays["prob_top"] + 0.01
    np.savez(export_copy / "golden.npz", **arrays)
    manifest = json.loads((export_copy / "manifest.json").read_text())
    manifest["golden"]["sha256"] = hashlib.sha256(
        (export_copy / "golden.npz").read_bytes()
    ).hexdigest()
    write_manifest(export_copy, manifest)
    with pytest.raises(ParityFailedError, match="does not reproduce its golden output 'prob_top'"):
        load(export_copy, "onnx")


def _input_table(cols: dict[str, np.ndarray]):
    import pyarrow as pa

    offsets = pa.array(cols["part_offsets"].astype(np.int32))
    return pa.table(
        {n: cols[n] for n in ("jet_pt", "jet_eta", "jet_mass", "jet_n_constituents")}
        | {n: cols[n] for n in cols if n.startswith("jet_tau")}
        | {
            n: pa.ListArray.from_arrays(offsets, pa.array(cols[n]))
            for n in cols
            if n.startswith("part_") and n != "part_offsets"
        }
    )


def test_cli_reports_bad_values_and_writes_nothing(exported, cols, tmp_path: Path, capsys) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = _input_table(cols)
    bad = table.set_column(
        0, "jet_pt", pa.array(np.where(np.arange(len(table)) == 3, np.nan, cols["jet_pt"]))
    )
    pq.write_table(bad, tmp_path / "bad.parquet")
    out = tmp_path / "scores.parquet"
    assert (
        cli_main([str(exported("deepsets")), str(tmp_path / "bad.parquet"), "--out", str(out)]) == 2
    )
    err = capsys.readouterr().err
    assert "rows from 0" in err
    assert "'jet_pt': 1 NaN" in err
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "bad.parquet"]


def test_cli_refuses_bad_files_and_arguments(exported, cols, tmp_path: Path, capsys) -> None:
    """Each refused before anything is scored or written, with the reason."""
    import pyarrow.parquet as pq
    import uproot

    export = str(exported("deepsets"))
    good = tmp_path / "in.parquet"
    pq.write_table(_input_table(cols), good)
    (tmp_path / "text.parquet").write_text("run,event\n1,2\n")
    (tmp_path / "cut.parquet").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with uproot.recreate(tmp_path / "ntuple.root") as f:
        f.mkrntuple("Events", {"jet_pt": cols["jet_pt"]})
    (tmp_path / "outdir").mkdir()
    cases = {
        ("text.parquet",): "is not a readable Parquet file",
        ("cut.parquet",): "it may be truncated",
        ("ntuple.root", "--tree", "Events"): "is an RNTuple, which this source does not read yet",
    }
    for (name, *more), message in cases.items():
        out = tmp_path / f"{name}.scores.parquet"
        assert cli_main([export, str(tmp_path / name), "--out", str(out), *more]) == 2, name
        assert message in capsys.readouterr().err, name
        assert not out.exists()
    assert cli_main([export, str(good), "--out", str(tmp_path / "outdir")]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert cli_main([export, str(good), "--out", str(good)]) == 2
    assert "is the input file itself" in capsys.readouterr().err
    assert pq.read_table(good).equals(_input_table(cols))  # the input is untouched
    for option in ("--step-size", "--max-batch"):
        with pytest.raises(SystemExit) as exit_info:
            cli_main([export, str(good), "--out", str(tmp_path / "x.parquet"), option, "0"])
        assert exit_info.value.code == 2
        assert f"{option}: must be at least 1, got 0" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["in.parquet", "text.parquet", "cut.parquet", "ntuple.root", "outdir"]
    )


def test_cli_output_goes_through_its_own_temporary_file(exported, cols, tmp_path: Path) -> None:
    """Another run writing the same ``--out`` (its temporary file beside it) is not touched,
    and two runs at once both leave a whole, readable output."""
    import threading

    import pyarrow.parquet as pq

    export = str(exported("deepsets"))
    source = tmp_path / "in.parquet"
    pq.write_table(_input_table(cols), source)
    out = tmp_path / "scores.parquet"
    others = tmp_path / ".scores.parquet.tmp"  # the name every run used to share
    others.write_bytes(b"another run's output, half written")
    assert cli_main([export, str(source), "--out", str(out), "--backend", "onnx"]) == 0
    assert others.read_bytes() == b"another run's output, half written"
    assert oct(out.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    expected = pq.read_table(out)
    codes: list[int] = []
    args = [export, str(source), "--out", str(out), "--backend", "onnx", "--step-size", "7"]
    runs = [threading.Thread(target=lambda: codes.append(cli_main(args))) for _ in range(2)]
    for run in runs:
        run.start()
    for run in runs:
        run.join()
    assert codes == [0, 0]
    assert pq.read_table(out).equals(expected)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [".scores.parquet.tmp", "in.parquet", "scores.parquet"]
    )


def _umask() -> int:
    import os

    mask = os.umask(0)
    os.umask(mask)
    return mask
