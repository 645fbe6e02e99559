"""The runtime's tensor path on the CPU (the path every CUDA call takes): torch tensor and DLPack
columns taken without a copy, tensors out, the host-side checks and the value checks with the
host's messages, views, chunks and counts; the device argument."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from project.inference import FORMATS, InputError, load
from project.inference.tensors import TensorPlan
from project.inference.threads import ThreadPolicy, apply_torch_policy

# The inter-op pool can be sized only before any inter-op work in this process (see
# test_inference.py); intra-op threads are given back to the other tests afterwards.
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


def _tensors(cols: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {k: torch.from_numpy(np.array(v)) for k, v in cols.items()}


def _spy(model) -> list[list[int]]:
    """Record the data pointers of every backend call's inputs (the runner's ``call``)."""
    seen: list[list[int]] = []
    call = model.runner.call

    def spy(tensors):
        seen.append([t.data_ptr() for t in tensors])
        return call(tensors)

    model.runner.call = spy
    return seen


@pytest.mark.parametrize("fmt", FORMATS)
def test_tensor_columns_without_a_copy_give_tensors(exported, gold, fmt: str, tile_golden) -> None:
    """Tensor columns go to the backend as they are (the offsets, clamped into the fields'
    range, are the one copy), and the outputs are tensors equal to the numpy call's."""
    model = load(exported("deepsets"), fmt, verify_golden=False)
    seen = _spy(model)
    cols = tile_golden(gold, model.contract, 50)
    tensors = _tensors(cols)
    got = model(tensors)
    offsets = model.contract.jagged[0].offsets_name
    expected = [0 if n == offsets else tensors[n].data_ptr() for n in model.input_names]
    assert [0 if n == offsets else p for n, p in zip(model.input_names, seen[0], strict=True)] == (
        expected
    )
    numpy_out = model(cols)
    for name in model.output_names:
        assert isinstance(got[name], torch.Tensor)
        assert got[name].dtype == torch.float32
        np.testing.assert_array_equal(got[name].numpy(), numpy_out[name])


def test_dlpack_columns_from_host_arrays(models, gold, tile_golden) -> None:
    """Numpy arrays (DLPack producers) beside a tensor column are taken through DLPack, in
    place; an object that only speaks DLPack is taken too."""

    class OnlyDLPack:
        def __init__(self, arr: np.ndarray) -> None:
            self.arr = arr

        def __dlpack__(self, **kwargs):
            return self.arr.__dlpack__(**kwargs)

        def __dlpack_device__(self):
            return self.arr.__dlpack_device__()

    model = models["torchscript"]
    cols = tile_golden(gold, model.contract, 20)
    first = model.contract.flat_names[0]
    mixed: dict = {n: OnlyDLPack(a) for n, a in cols.items()}
    mixed[first] = torch.from_numpy(cols[first])
    seen = _spy(model)
    try:
        got = model(mixed)
    finally:
        del model.runner.call  # the instance attribute: the class's method again
    fields = model.contract.jagged[0].field_input_names
    pointers = dict(zip(model.input_names, seen[0], strict=True))
    assert all(pointers[n] == cols[n].ctypes.data for n in [*model.contract.flat_names, *fields])
    for name, value in model(cols).items():
        np.testing.assert_array_equal(got[name].numpy(), value)


def test_views_chunks_counts_and_empty_batches(models, gold, tile_golden) -> None:
    model = models["torchscript"]
    coll = model.contract.jagged[0]
    cols = _tensors(tile_golden(gold, model.contract, 30))
    whole = model(cols)
    # A view of rows 7..: the offsets start at k > 0 and index the whole fields.
    view = {**cols, coll.offsets_name: cols[coll.offsets_name][7:]}
    view.update({n: cols[n][7:] for n in model.contract.flat_names})
    for name in model.output_names:
        torch.testing.assert_close(model(view)[name], whole[name][7:], rtol=1e-6, atol=1e-7)
    # Counts (int32) instead of offsets, and chunks of 7 rows (offsets views of the fields).
    counts = {k: v for k, v in cols.items() if k != coll.offsets_name}
    counts[coll.counts_name] = torch.diff(cols[coll.offsets_name]).to(torch.int32)
    chunked = load(model.export.path, "torchscript", max_batch=7, verify_golden=False)
    for got in (model(counts), chunked(cols), chunked(counts)):
        for name in model.output_names:
            torch.testing.assert_close(got[name], whole[name], rtol=1e-6, atol=1e-7)
    empty = model(_tensors(tile_golden(gold, model.contract, 0)))
    assert all(v.shape == (0,) and isinstance(v, torch.Tensor) for v in empty.values())


def test_host_side_checks_name_the_column(models, gold, tile_golden) -> None:
    model = models["onnx"]
    coll = model.contract.jagged[0]
    cols = _tensors(tile_golden(gold, model.contract, 12))
    first, field = model.contract.flat_names[0], coll.field_input_names[0]
    cases = {
        "missing": ({k: v for k, v in cols.items() if k != field}, f"no column {field!r}"),
        "2-D": ({**cols, first: cols[first].reshape(3, 4)}, "has shape (3, 4)"),
        "complex": ({**cols, field: cols[field].to(torch.complex64)}, "complex64"),
        "booleans": ({**cols, first: cols[first] > 0}, "holds booleans"),
        "lengths": ({**cols, first: cols[first][:-1]}, "different lengths"),
        "rows": ({**cols, coll.offsets_name: cols[coll.offsets_name][:-1]}, "describes 11 rows"),
        "float offsets": (
            {**cols, coll.offsets_name: cols[coll.offsets_name].double()},
            "must be integers",
        ),
        "uint64 counts": (
            {**cols, coll.counts_name: torch.diff(cols[coll.offsets_name]).to(torch.uint64)},
            "must be integers",
        ),
        "a list": ({**cols, field: [1.0] * 12}, "is a list"),
    }
    for bad, message in cases.values():
        with pytest.raises(InputError, match=re.escape(message)):
            model(bad)
    with pytest.raises(InputError, match="stream= is for CUDA models"):
        model(cols, stream=0)
    with pytest.raises(InputError, match="stream= is for CUDA models"):
        model({k: v.numpy() for k, v in cols.items()}, stream=0)
    with pytest.raises(InputError, match="out= and reuse_outputs"):
        model(cols, out={})


def test_value_checks_raise_before_the_backend_runs(exported, gold, tile_golden) -> None:
    """On the CPU the device verdict is read at once: the call raises with the host's message
    (naming the column and row) and the backend never sees the inputs."""
    model = load(exported("deepsets"), "torchscript", verify_golden=False)
    coll = model.contract.jagged[0]
    cols = _tensors(tile_golden(gold, model.contract, 12))
    seen = _spy(model)
    offsets = cols[coll.offsets_name]
    field = coll.field_input_names[1]
    nan_field = cols[field].clone()
    nan_field[int(offsets[3])] = float("inf")
    decreasing = offsets.clone()
    decreasing[5] = decreasing[4] - 1
    past_end = offsets.clone()
    past_end[-1] += 3
    negative = offsets - offsets[1]  # starts below 0
    counts = torch.diff(offsets)
    counts[2] += 1
    cases = [
        ({**cols, field: nan_field}, f"{field!r}: 0 NaN and 1 Inf"),
        ({**cols, coll.offsets_name: decreasing}, "decreases at row 4"),
        ({**cols, coll.offsets_name: past_end}, "point past the end"),
        ({**cols, coll.offsets_name: negative}, "cannot be negative"),
        ({**cols, coll.counts_name: counts}, "disagree"),
    ]
    for bad, message in cases:
        with pytest.raises(InputError, match=message):
            model(bad)
    assert seen == []
    got = model.with_nan_policy("ignore")({**cols, field: nan_field})
    assert all(isinstance(v, torch.Tensor) for v in got.values())
    assert len(seen) == 1


def test_verdict_layout() -> None:
    """The verdict's values: the float64 sum of the features (finite iff all are) first, the
    count of offsets entries that break the rule last."""
    from project.contract import Feature, InputContract, JaggedCollection

    contract = InputContract(
        flat=(Feature("a"),),
        jagged=(JaggedCollection("p", 4, (Feature("x"),)),),
        classes=("c0", "c1"),
    )
    plan = TensorPlan(contract, torch.device("cpu"), screen=True)
    cols = {"a": torch.tensor([1.0, 2.0]), "p_offsets": torch.tensor([0, 2, 3])}
    cols["p_x"] = torch.tensor([1.0, float("nan"), 2.0])
    tensors, n_rows, verdict = plan.prepare(cols)
    assert n_rows == 2
    assert plan.problems(verdict.tolist()) == ["NaN or Inf in a feature"]
    cols.update({"p_x": torch.ones(3), "p_offsets": torch.tensor([1, 0, 5])})
    tensors, _, verdict = plan.prepare(cols)
    assert verdict.tolist() == [6.0, 2.0]
    assert plan.problems(verdict.tolist()) == [
        "2 offsets or counts entries that break the offsets rule"
    ]
    assert tensors[1].tolist() == [1, 1, 3]  # safe: in [0, 3] and never decreasing
    assert TensorPlan(contract, torch.device("cpu"), screen=False).prepare(cols)[2].tolist() == [
        2.0
    ]


def test_device_argument(exported) -> None:
    with pytest.raises(ValueError, match="runs on 'cpu' or 'cuda"):
        load(exported("mlp"), device="meta")
    with pytest.raises(ValueError, match="device 'gpu'"):
        load(exported("mlp"), device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device is usable here"):
            load(exported("mlp"), device="cuda")
