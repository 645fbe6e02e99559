"""How the runtime runs: zero-copy hand-over, buffer reuse, the threading policy, concurrency,
and that it imports without the training stack."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from project.inference import FORMATS, InputError, ThreadPolicyError, load
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
def models(exported) -> dict[str, object]:
    """The toy deep-sets export (flat columns and a jagged collection), once per backend."""
    return {fmt: load(exported("deepsets"), fmt) for fmt in FORMATS}


@pytest.fixture(scope="module")
def gold(exported) -> dict[str, np.ndarray]:
    with np.load(exported("deepsets") / "golden.npz") as data:
        return {k: data[k] for k in data.files}


class _SpySession:
    """An ONNX Runtime session that records the data pointers of the inputs handed to it,
    through ``run`` or an I/O binding."""

    def __init__(self, session, seen: list[int]) -> None:
        self.session, self.seen = session, seen

    def run(self, outputs, feed):
        self.seen.extend(a.ctypes.data for a in feed.values())
        return self.session.run(outputs, feed)

    def io_binding(self):
        binding = self.session.io_binding()
        bind = binding.bind_cpu_input

        def spy(name: str, arr: np.ndarray) -> None:
            self.seen.append(arr.ctypes.data)
            bind(name, arr)

        binding.bind_cpu_input = spy
        return binding

    def run_with_iobinding(self, binding) -> None:
        self.session.run_with_iobinding(binding)


def _spy_pointers(model) -> list[int]:
    """Make ``model`` record the data pointers its backend receives; returns the record."""
    seen: list[int] = []
    if model.backend == "onnx":
        model.runner.session = _SpySession(model.runner.session, seen)
    else:
        call = model.runner.call

        def spy(tensors):
            seen.extend(t.data_ptr() for t in tensors)
            return call(tensors)

        model.runner.call = spy
    return seen


@pytest.mark.parametrize("fmt", FORMATS)
def test_zero_copy_for_contiguous_columns(exported, gold, fmt: str, tile_golden) -> None:
    import pyarrow as pa

    model = load(exported("deepsets"), fmt, verify_golden=False)
    seen = _spy_pointers(model)
    cols = tile_golden(gold, model.contract, 50)
    pointers = [cols[n].ctypes.data for n in model.input_names]
    model(cols)
    assert seen == pointers
    seen.clear()
    model(cols, out={o: np.empty(50, np.float32) for o in model.output_names})
    assert seen == pointers  # ONNX Runtime's I/O binding too

    # Arrow: read-only views of Arrow's buffers, also handed over as they are, no warning.
    fields = model.contract.jagged[0].field_input_names
    offsets = pa.array(cols["part_offsets"])
    batch = pa.RecordBatch.from_pydict(
        {n: cols[n] for n in model.contract.flat_names}
        | {n: pa.LargeListArray.from_arrays(offsets, pa.array(cols[n])) for n in fields}
    )
    arrow_ptrs = [batch.column(n).buffers()[1].address for n in model.contract.flat_names]
    arrow_ptrs.append(batch.column(fields[0]).buffers()[1].address)  # int64 offsets
    arrow_ptrs += [batch.column(n).values.buffers()[1].address for n in fields]
    seen.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = model(batch)
    assert seen == arrow_ptrs
    np.testing.assert_allclose(got["prob_top"], model(cols)["prob_top"], atol=1e-6)


def _view(cols: dict[str, np.ndarray], contract, before: int, after: int) -> dict:
    """``cols`` as a framework's view of a larger collection: offsets that start at
    ``before`` into field arrays with ``before`` objects in front and ``after`` behind
    (NaN: values of other rows, which the model must not read)."""
    view = dict(cols, part_offsets=cols["part_offsets"] + before)
    for name in contract.jagged[0].field_input_names:
        pad = np.full(before, np.nan, np.float32), np.full(after, np.nan, np.float32)
        view[name] = np.concatenate([pad[0], cols[name], pad[1]])
    return view


@pytest.mark.parametrize("fmt", FORMATS)
def test_offsets_views_equal_the_rows_cut_out(models, gold, fmt: str, tile_golden) -> None:
    """Offsets starting at ``k > 0`` that index longer field arrays (a framework's
    sub-range) give the answer of the same rows cut out, for every backend, in one call and
    in chunks of ``max_batch``; the fields are handed over without a copy."""
    model = models[fmt]
    cols = tile_golden(gold, model.contract, 60)
    expected = model(cols)["prob_top"]
    for before, after in ((0, 5), (17, 0), (17, 5)):
        view = _view(cols, model.contract, before, after)
        np.testing.assert_allclose(model(view)["prob_top"], expected, rtol=1e-6, atol=1e-7)
        counts = {k: v for k, v in view.items() if k != "part_offsets"}
        counts["part_counts"] = np.diff(view["part_offsets"])
        with pytest.raises(
            InputError, match=r"values but 'part_counts' sums to \d+: the counts must cover"
        ):
            model(counts)  # counts describe rows from the first object: no view
    view = _view(cols, model.contract, 17, 5)
    chunked = model.with_nan_policy("raise")
    chunked.max_batch = 7
    np.testing.assert_allclose(chunked(view)["prob_top"], expected, rtol=1e-6, atol=1e-7)
    spied = load(model.export.path, fmt, verify_golden=False)
    seen = _spy_pointers(spied)
    spied(view)
    fields = model.contract.jagged[0].field_input_names
    assert seen[-len(fields) :] == [view[n].ctypes.data + 17 * 4 for n in fields]


@pytest.mark.parametrize("fmt", FORMATS)
def test_inconsistent_offsets_stay_errors(models, gold, fmt: str, tile_golden) -> None:
    model = models[fmt]
    view = _view(tile_golden(gold, model.contract, 20), model.contract, 4, 3)
    offsets = view["part_offsets"]
    for bad, message in (
        (np.concatenate([offsets[:5], offsets[4:5] - 1, offsets[6:]]), "decreases at row 4"),
        (offsets - 5, "starts at -1: offsets index the field arrays"),
        (offsets + 4, r"part_offsets\[-1\] is \d+: the offsets point past the end"),
    ):
        with pytest.raises(InputError, match=message):
            model(dict(view, part_offsets=bad))


@pytest.mark.parametrize("fmt", FORMATS)
def test_conversion_buffers_are_reused(models, gold, fmt: str, tile_golden) -> None:
    model = models[fmt]

    def converted(n_rows: int, seed: int) -> dict[str, np.ndarray]:
        cols = tile_golden(gold, model.contract, n_rows)
        out = {
            k: v.astype(np.float64) + seed * 1e-3 for k, v in cols.items() if v.dtype == np.float32
        }
        out["part_counts"] = np.diff(cols["part_offsets"]).astype(np.int32)  # counts to offsets
        return out

    model(converted(2000, 0))
    model(converted(10, 0))  # small batches also use a scratch buffer of their own
    ws = model.workspace()
    before = {k: (id(b), b.ctypes.data, len(b)) for k, b in ws.buffers.items()}
    assert {"jet_pt", "part_pt", "counts:part_counts"} <= set(before)
    for n_rows, seed in ((2000, 1), (1500, 2), (10, 3)):
        model(converted(n_rows, seed))
        assert {k: (id(b), b.ctypes.data, len(b)) for k, b in ws.buffers.items()} == before
    model(converted(4000, 4))  # a larger batch grows the buffers
    assert ws.buffers["jet_pt"].ctypes.data != before["jet_pt"][1]
    assert len(ws.buffers["jet_pt"]) >= 4000

    # After warm-up a call allocates nothing that grows with the input (numpy allocations
    # are traced by tracemalloc; an allocation per column would be ~16k * 8 bytes each).
    for n_rows in (4000, 1000):
        inputs = [converted(n_rows, s) for s in range(3)]
        out = {o: np.empty(n_rows, np.float32) for o in model.output_names}
        model(inputs[0], out=out)
        tracemalloc.start()
        try:
            base = tracemalloc.get_traced_memory()[0]
            for cols in inputs:
                model(cols, out=out)
            current, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert peak - base < 16_384, (n_rows, peak - base)
        assert current - base < 4_096


@pytest.mark.parametrize("fmt", FORMATS)
def test_columns_refilled_in_place_give_their_new_values(
    models, gold, fmt: str, tile_golden
) -> None:
    """A host that refills the same buffers every call gets the new values' outputs, for
    zero-copy float32 columns and for converted float64 ones alike."""
    model = models[fmt]
    cols = tile_golden(gold, model.contract, 40)
    cols["jet_eta"] = cols["jet_eta"].astype(np.float64)  # converted into a buffer
    first = model(cols)["prob_top"].copy()
    assert np.array_equal(model(cols)["prob_top"], first)
    rng = np.random.default_rng(3)
    for name in model.contract.flat_names:
        cols[name][:] = rng.permutation(cols[name])  # same objects, new values
    for name in model.contract.jagged[0].field_input_names:
        cols[name] *= 1.25
    expected = model({k: v.copy() for k, v in cols.items()})["prob_top"]
    again = model(cols)["prob_top"]
    assert not np.allclose(again, first)
    np.testing.assert_array_equal(again, expected)


@pytest.mark.parametrize("fmt", FORMATS)
def test_same_columns_again_are_checked_again(models, gold, fmt: str, tile_golden) -> None:
    """The very arrays of the last call again: values refilled in place are read and
    screened, offsets re-checked, and an array given another dtype, shape or strides in place
    is taken as it now is."""
    model = models[fmt]
    cols = tile_golden(gold, model.contract, 30)
    first = model(cols)["prob_top"].copy()
    np.testing.assert_array_equal(model(cols)["prob_top"], first)

    def fresh() -> np.ndarray:  # what the same values give in new arrays
        return model({k: v.copy() for k, v in cols.items()})["prob_top"]

    rng = np.random.default_rng(5)
    for name in model.contract.flat_names:
        cols[name][:] = rng.permutation(cols[name])
    field = model.contract.jagged[0].field_input_names[0]
    cols[field] *= 0.5
    np.testing.assert_array_equal(model(cols)["prob_top"], fresh())
    assert not np.allclose(model(cols)["prob_top"], first)

    for name, where in ((model.contract.flat_names[0], 7), (field, -1)):
        saved = cols[name][where]
        for bad in (np.nan, np.inf):
            model(cols)
            cols[name][where] = bad
            with pytest.raises(InputError, match=name):
                model(cols)
            cols[name][where] = saved
    offsets = cols["part_offsets"]
    model(cols)
    offsets[5], saved = offsets[4] - 1, offsets[5]
    with pytest.raises(InputError, match="decreases at row 4"):
        model(cols)
    offsets[5] = saved
    model(cols)
    offsets[-1] += 1
    with pytest.raises(InputError, match="point past the end"):
        model(cols)
    offsets[-1] -= 1
    np.testing.assert_array_equal(model(cols)["prob_top"], fresh())

    # A dtype set in place (float32 bits read as int32 values) or a shape set in place is
    # seen: the column is taken as the array it now is, not as it was.
    name = model.contract.flat_names[1]
    before = model(cols)["prob_top"].copy()
    if _set_in_place(cols[name], "dtype", np.int32):
        try:
            again = model(cols)["prob_top"]
            np.testing.assert_array_equal(again, fresh())
            assert not np.array_equal(again, before)
        finally:
            _set_in_place(cols[name], "dtype", np.float32)
    model(cols)
    if _set_in_place(cols[name], "shape", (15, 2)):
        try:
            with pytest.raises(InputError, match=name):
                model(cols)
        finally:
            _set_in_place(cols[name], "shape", (30,))
    np.testing.assert_array_equal(model(cols)["prob_top"], fresh())


@pytest.mark.parametrize("fmt", FORMATS)
def test_strides_set_in_place_are_seen(models, gold, fmt: str, tile_golden) -> None:
    """A column of the last call made strided in place (every second value of its buffer)
    is read as it now is, by the backend and by the NaN check alike."""
    model = models[fmt]
    cols = tile_golden(gold, model.contract, 30)
    for name in (model.contract.flat_names[0], model.contract.jagged[0].field_input_names[0]):
        column = cols[name]
        for nan_at in (None, 1, 2):  # no NaN; outside the strided view; inside it
            buffer = np.repeat(column, 2)  # [a, a, b, b, ...]
            buffer[1::2] *= 1.5  # so that every second value differs from the first n
            cols[name] = buffer[: len(column)]
            model(cols)
            if not _set_in_place(cols[name], "strides", (8,)):
                pytest.skip("this numpy no longer sets strides in place")
            if nan_at is not None:
                buffer[nan_at] = np.nan
            if nan_at == 2:
                with pytest.raises(InputError, match=name):
                    model(cols)
                continue
            fresh = {k: np.ascontiguousarray(v) for k, v in cols.items()}
            np.testing.assert_array_equal(model(cols)["prob_top"], model(fresh)["prob_top"])
        cols[name] = column


def _set_in_place(arr: np.ndarray, attr: str, value: object) -> bool:
    """``arr.<attr> = value``, which numpy deprecated (strides in 2.4, dtype and shape in 2.5);
    ``False`` where this numpy no longer allows it, so that no caller can do it either."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            setattr(arr, attr, value)
        except AttributeError:
            return False
    return True


@pytest.mark.parametrize("fmt", FORMATS)
def test_counts_refilled_in_place_give_their_new_offsets(
    models, gold, fmt: str, tile_golden
) -> None:
    """Counts refilled in place are turned into offsets again."""
    model = models[fmt]
    cols = tile_golden(gold, model.contract, 30)
    counts = np.diff(cols.pop("part_offsets"))
    cols["part_counts"] = counts
    first = model(cols)["prob_top"].copy()
    moved = counts[3]  # move one particle's worth of count from row 3 to row 4
    assert moved > 0
    counts[3] -= 1
    counts[4] += 1
    expected = model({k: v.copy() for k, v in cols.items()})["prob_top"]
    again = model(cols)["prob_top"]
    np.testing.assert_array_equal(again, expected)
    assert not np.array_equal(again[3:5], first[3:5])


@pytest.mark.parametrize("fmt", FORMATS)
def test_thread_counts_inside_a_call_are_one(models, gold, fmt: str) -> None:
    model = models[fmt]
    assert model.policy == ThreadPolicy.single()
    assert model.threads["policy"] == "single"
    assert model.threads["torch_intra_op"] == 1
    assert model.threads["torch_inter_op"] == 1
    observed: list[tuple[int, int]] = []
    if fmt == "onnx":
        opts = model.runner.session.get_session_options()
        assert (opts.intra_op_num_threads, opts.inter_op_num_threads) == (1, 1)
        assert str(opts.execution_mode).endswith("ORT_SEQUENTIAL")
        assert model.threads["onnx_execution_mode"] == "ORT_SEQUENTIAL"
        original = model.runner.run

        def record(*args):
            observed.append((torch.get_num_threads(), torch.get_num_interop_threads()))
            return original(*args)

        model.runner.run = record
    else:
        call = model.runner.call

        def record(tensors):
            observed.append((torch.get_num_threads(), torch.get_num_interop_threads()))
            return call(tensors)

        model.runner.call = record
    try:
        model(gold)
        worker = threading.Thread(target=model, args=(gold,))
        worker.start()
        worker.join()
    finally:
        vars(model.runner).pop("run", None)
        if fmt != "onnx":
            model.runner.call = call
    assert observed == [(1, 1), (1, 1)]
    # Someone changing PyTorch's threads after load is caught, not run with.
    torch.set_num_threads(2)
    try:
        if fmt != "onnx":
            with pytest.raises(ThreadPolicyError, match="set_num_threads"):
                model(gold)
    finally:
        torch.set_num_threads(1)


@pytest.mark.parametrize("fmt", FORMATS)
def test_eight_threads_share_one_model(models, gold, fmt: str, tile_golden) -> None:
    model = models[fmt]
    batches = [tile_golden(gold, model.contract, n) for n in (1, 5, 33, 77, 130, 2, 64, 9)]
    expected = [model(b)["prob_top"].copy() for b in batches]
    results: dict[int, list[np.ndarray]] = {}
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def work(i: int) -> None:
        try:
            start.wait()
            mine = []
            for step in range(12):
                j = (i + step) % len(batches)
                mine.append((j, model(batches[j])["prob_top"].copy()))
            results[i] = mine
        except BaseException as err:  # reported below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for mine in results.values():
        for j, got in mine:
            np.testing.assert_array_equal(got, expected[j])


def _python(code: str, tmp_path: Path) -> dict:
    """Run ``code`` in a fresh interpreter (from a file: TorchScript needs the source)."""
    script = tmp_path / "script.py"
    script.write_text(code)
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, check=False, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_imports_without_the_training_stack(exported, tmp_path: Path) -> None:
    export_dir = exported("transformer")
    code = f"""
import json, sys
for name in ("lightning", "hydra", "omegaconf", "uproot", "dask", "pytorch_lightning"):
    sys.modules[name] = None  # any import of them now raises ImportError
import numpy as np
import project.inference as inference
model = inference.load({str(export_dir)!r})
with np.load({str(export_dir / "golden.npz")!r}) as data:
    gold = {{k: data[k] for k in data.files}}
diff = float(np.abs(model(gold)["prob_top"] - gold["prob_top"]).max())
roots = {{m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}}
print(json.dumps({{"diff": diff, "backend": model.backend,
    "loaded": sorted(roots & {{"lightning", "hydra", "omegaconf", "uproot", "dask", "pyarrow",
                              "awkward", "torchmetrics", "matplotlib"}}),
    "project": sorted(m for m in sys.modules if m.startswith("project."))}}))
"""
    out = _python(code, tmp_path)
    assert out["diff"] < 1e-4
    assert out["loaded"] == []
    assert out["project"]
    assert all(m.startswith(("project.inference", "project.contract")) for m in out["project"])


def test_policy_too_late_is_an_error(exported, tmp_path: Path) -> None:
    code = f"""
import json, torch

@torch.jit.script
def negate(x: torch.Tensor) -> torch.Tensor:
    return torch.jit.wait(torch.jit.fork(torch.neg, x))

negate(torch.ones(1))  # inter-op work: the inter-op pool now exists with its default size
import project.inference as inference
try:
    inference.load({str(exported("mlp"))!r}, "onnx")
    error = None
except inference.ThreadPolicyError as err:
    error = str(err)
model = inference.load({str(exported("mlp"))!r}, "onnx", threads="unrestricted")
print(json.dumps({{"error": error, "policy": model.policy.name, "threads": model.threads}}))
"""
    out = _python(code, tmp_path)
    assert out["error"]
    assert "before any other PyTorch work" in out["error"]
    assert out["policy"] == "unrestricted"
    assert out["threads"]["policy"] == "unrestricted"


def test_onnx_outputs_into_out_equal_its_own(models, gold) -> None:
    """ONNX Runtime's own outputs (``InferenceSession.run``) and outputs written into
    ``out=`` through an I/O binding are the same values."""
    model = models["onnx"]
    out = {o: np.full(len(gold["prob_top"]), -1.0, np.float32) for o in model.output_names}
    got = model(gold, out=out)
    for name, value in model(gold).items():
        np.testing.assert_array_equal(got[name], value)
        assert np.shares_memory(got[name], out[name])
