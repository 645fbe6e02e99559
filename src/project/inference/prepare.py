"""SoA columns to the graph's inputs, matched by name and checked: a 1-D contiguous column of
the contract's dtype is passed on as it is; allowed conversions (numbers to float32, booleans
where declared, integers to int64 offsets, counts to offsets) go into the thread's
``Workspace``; offsets that are a view of a larger collection are cut to the rows they
describe. Anything else is an ``InputError`` naming the column, never a wrong answer."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from functools import partial
from types import SimpleNamespace
from typing import Any

import numpy as np

from project.contract import Feature, InputContract, JaggedCollection
from project.inference.errors import InputError

F32, I64, BOOL = np.dtype(np.float32), np.dtype(np.int64), np.dtype(np.bool_)
NAN_POLICIES = ("raise", "ignore")
_I64_MAX = np.iinfo(np.int64).max


class Workspace:
    """One thread's growable 1-D buffers (``buffers``: key -> array): they grow by at least
    half for a larger batch, so after warm-up a call allocates nothing for its conversions."""

    def __init__(self) -> None:
        self.buffers: dict[str, np.ndarray] = {}

    def get(self, key: str, dtype: np.dtype, n: int) -> np.ndarray:
        """A view of the first ``n`` items of buffer ``key`` (one dtype per key)."""
        buf = self.buffers.get(key)
        if buf is None or buf.shape[0] < n:
            size = n if buf is None else max(n, buf.shape[0] + buf.shape[0] // 2)
            buf = self.buffers[key] = np.empty(size, dtype=dtype)
        return buf[:n]


def writable_alias(arr: np.ndarray) -> np.ndarray:
    """The same memory as ``arr``, flagged writable, without a copy. ``torch.from_numpy`` warns
    on read-only arrays (Arrow hands out only those); the exported graphs never write to their
    inputs, so an alias is safe, and unlike silencing the warning it is thread-safe."""
    interface = dict(arr.__array_interface__, data=(arr.__array_interface__["data"][0], False))
    return np.asarray(SimpleNamespace(__array_interface__=interface, base=arr))  # base: alive


def _as_array(value: Any, name: str) -> np.ndarray:
    """``value`` as a 1-D numpy array; what ``np.asarray`` would take wrongly is an
    ``InputError``: masked values (it drops the mask), Arrow nulls (it makes them NaN, or
    anything for integers), scalars and other shapes."""
    arr = value
    if type(value) is not np.ndarray:
        if isinstance(value, np.ma.MaskedArray):
            if masked := int(np.ma.count_masked(value)):
                raise InputError(
                    f"column {name!r} is a masked array with {masked} masked values; fill "
                    "them (array.filled(value)) or drop those rows first"
                )
            value = value.data
        nulls = getattr(value, "null_count", 0)  # a pyarrow Array or ChunkedArray
        if type(nulls) is int and nulls:
            raise InputError(f"column {name!r} has {nulls} null values; fill or drop them first")
        try:
            arr = np.asarray(value)
        except (TypeError, ValueError, RuntimeError) as err:
            raise InputError(f"column {name!r} cannot be read as a 1-D array: {err}") from err
    if arr.ndim != 1:
        kind = type(value).__name__
        what = f"has shape {arr.shape}" if arr.ndim else f"is a {kind}, not an array"
        raise InputError(
            f"column {name!r} {what}: SoA columns are 1-D arrays (one value per row, or per "
            "object for jagged fields)"
        )
    return arr


def _decreasing_at(arr: np.ndarray, ws: Workspace) -> int:
    """The first row where int64 ``arr`` decreases, or -1 (in scratch memory)."""
    bad = np.less(arr[1:], arr[:-1], out=ws.get("scratch:bool", BOOL, max(len(arr) - 1, 0)))
    return int(bad.argmax()) if bad.any() else -1


def _to_int64(arr: np.ndarray, name: str, buf: np.ndarray) -> np.ndarray:
    """``arr`` cast into int64 ``buf``; ``InputError`` for any value the cast would change."""
    kind = arr.dtype.kind
    if kind not in "iuf":
        raise InputError(f"{name!r} has dtype {arr.dtype}, which cannot be cast safely to int64")
    if kind == "u" and arr.shape[0] and arr.max() > _I64_MAX:
        raise InputError(
            f"{name!r} has values beyond the int64 range (largest {arr.max()}); a uint64 that "
            "wrapped around (-1 stored unsigned) is the usual cause"
        )
    if kind == "f" and not (np.isfinite(arr).all() and np.abs(arr).max(initial=0.0) <= 2.0**53):
        raise InputError(f"{name!r} has NaN, Inf or huge values; it must hold integers")
    np.copyto(buf, arr, casting="unsafe")
    if kind == "f" and not np.array_equal(buf, arr):
        row = int(np.flatnonzero(buf != arr)[0])
        raise InputError(
            f"{name!r} has dtype {arr.dtype} with a fraction at index {row} ({arr[row]!r}); "
            "it must hold whole numbers"
        )
    return buf


class InputPlan:
    """How one contract's inputs are found, checked and converted; with ``nan_policy="raise"``
    NaN or Inf in a value the model reads is an ``InputError``, ``"ignore"`` passes them on."""

    def __init__(self, contract: InputContract, nan_policy: str = "raise") -> None:
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, not {nan_policy!r}")
        self.nan_policy = nan_policy
        self.contract = contract
        offsets = {c.offsets_name for c in contract.jagged}
        self.features = [i for i, n in enumerate(contract.input_names) if n not in offsets]

    def prepare(self, columns: Mapping[str, Any], ws: Workspace) -> tuple[list[np.ndarray], int]:
        """The graph's inputs in order, and the number of rows; ``InputError`` for a missing
        column, an unsafe dtype, inconsistent lengths, bad offsets or counts, or NaN/Inf."""
        arrays, n_rows = match(
            self.contract, columns, partial(_feature, ws=ws), partial(_collection, ws=ws)
        )
        if self.nan_policy == "raise":
            for i in self.features:
                # One value (a flat column at batch 1) as a Python float: 0.8 us for the 9
                # columns of the jet MLP, against 14 us for the numpy screen (call: 37 us).
                values = arrays[i]
                if len(values) == 1:
                    ok = math.isfinite(values[0])
                else:
                    ok = np.isfinite(values, out=ws.get("scratch:bool", BOOL, len(values))).all()
                if not ok:
                    raise self._nonfinite(arrays)
        return arrays, n_rows

    def chunk(self, arrays: list[np.ndarray], start: int, stop: int, ws: Workspace) -> list:
        """Rows ``start:stop`` of prepared inputs: views, offsets rebased to start at 0."""
        pos = len(self.contract.flat)
        out = [a[start:stop] for a in arrays[:pos]]
        for coll in self.contract.jagged:
            offsets = arrays[pos]
            first, last = int(offsets[start]), int(offsets[stop])
            view = offsets[start : stop + 1]
            if first:
                view = np.subtract(view, first, out=ws.get(f"chunk:{pos}", I64, len(view)))
            out += [view, *(a[first:last] for a in arrays[pos + 1 : pos + 1 + len(coll.fields)])]
            pos += 1 + len(coll.fields)
        return out

    def _nonfinite(self, arrays: list[np.ndarray]) -> InputError:
        problems = []
        for i in self.features:
            if (bad := ~np.isfinite(arrays[i])).any():
                n_nan = int(np.isnan(arrays[i]).sum())
                problems.append(
                    f"{self.contract.input_names[i]!r}: {n_nan} NaN and {int(bad.sum()) - n_nan} "
                    f"Inf (first at index {int(np.flatnonzero(bad)[0])})"
                )
        return InputError(
            f"non-finite input values: {'; '.join(problems)}. Clean the inputs, or load the "
            "model with nan_policy='ignore' to pass them on (float64 values beyond the float32 "
            "range become Inf)."
        )


def match(
    contract: InputContract,
    columns: Mapping[str, Any],
    feature: Callable[[Any, Feature, str], Any],
    collection: Callable[[Mapping[str, Any], JaggedCollection, Any, Any, int], list],
) -> tuple[list, int]:
    """The graph's inputs found in ``columns`` by name, in order, and the number of rows (both
    input paths): ``feature(value, feat, name)`` takes a flat column; ``collection(columns,
    coll, offsets, counts, n_rows)`` a collection from its offsets and counts columns (one may
    be ``None``) and the rows so far (-1: none yet), returning its inputs, offsets first."""
    inputs: list = []
    n_rows, first = -1, ""
    try:
        for feat in contract.flat:
            inputs.append(arr := feature(columns[feat.name], feat, feat.name))
            if n_rows >= 0 and len(arr) != n_rows:
                raise InputError(
                    f"flat columns have different lengths: {first!r} has {n_rows} rows, "
                    f"{feat.name!r} has {len(arr)}"
                )
            n_rows, first = len(arr), first or feat.name
        for coll in contract.jagged:
            offsets, counts = columns.get(coll.offsets_name), columns.get(coll.counts_name)
            if offsets is None and counts is None:  # with no field either, it is what is missing
                field = coll.field_input_names[0]
                raise KeyError(coll.offsets_name if field in columns else field)
            inputs += (got := collection(columns, coll, offsets, counts, n_rows))
            n_rows = len(got[0]) - 1
    except KeyError as err:  # a missing column: name what is expected
        wanted = list(contract.flat_names)
        for coll in contract.jagged:
            wanted += [f"{coll.offsets_name} (or {coll.counts_name})", *coll.field_input_names]
        found = getattr(columns, "available", None) or sorted(map(str, columns.keys()))
        shown = ", ".join(found[:30]) + (f", ... ({len(found)} in all)" if len(found) > 30 else "")
        raise InputError(
            f"the input has no column {str(err.args[0])!r}. The model expects (by name, in any "
            f"order; extra columns are ignored): {', '.join(wanted)}. The input has: "
            f"{shown or 'no columns'}"
        ) from None
    return inputs, n_rows


def _feature(value: Any, feat: Feature, name: str, ws: Workspace) -> np.ndarray:
    """Feature column ``value`` as float32: itself when contiguous float32, else converted
    into buffer ``name``."""
    arr = _as_array(value, name)
    if arr.dtype == F32 and arr.flags.c_contiguous:
        return arr if arr.flags.writeable else writable_alias(arr)
    if arr.dtype.kind == "b" and not feat.boolean:
        raise InputError(
            f"column {name!r} holds booleans, but the contract's feature {feat.name!r} is not "
            "declared boolean (a flag fed where a number is meant is a silent error): pass "
            "numbers, or declare the feature with boolean: true and export again"
        )
    if arr.dtype.kind not in "fiub":
        raise InputError(
            f"column {name!r} has dtype {arr.dtype}, which cannot be cast safely to the "
            "contract's float32 (features are numbers)"
        )
    buf = ws.get(name, F32, arr.shape[0])
    with np.errstate(over="ignore", invalid="ignore"):  # out of float32's range: Inf, reported
        np.copyto(buf, arr, casting="unsafe")
    return buf


def _collection(
    columns: Mapping[str, Any],
    coll: JaggedCollection,
    value: Any,
    counts: Any,
    n_rows: int,
    ws: Workspace,
) -> list[np.ndarray]:
    """Offsets from 0 (``value``, or made from ``counts``), then the fields cut to what they
    index (see ``match``)."""
    name, counts_name = coll.offsets_name, coll.counts_name
    fields = {n: _as_array(columns[n], n) for n in coll.field_input_names}
    if value is None:
        offsets = _from_counts(counts, counts_name, ws)
    else:
        offsets = _offsets(value, name, ws)
        if counts is not None:
            made = _from_counts(counts, counts_name, ws)
            if len(made) != len(offsets) or not np.array_equal(made, offsets - offsets[0]):
                raise InputError(
                    f"both {name!r} and {counts_name!r} are given and they disagree: give one "
                    "of them, or make them describe the same rows"
                )
    first, last = int(offsets[0]), int(offsets[-1])
    for n, arr in fields.items():
        if len(arr) < last or (value is None and len(arr) > last):  # counts cover all values
            why = f"{counts_name!r} sums to {last}: the counts must cover the field exactly"
            if value is not None:
                why = f"{name}[-1] is {last}: the offsets point past the end of the field"
            raise InputError(f"jagged field {n!r} has {len(arr)} values but {why}")
    if first:  # a view of a larger collection: its rows cut out, the offsets from 0
        offsets = np.subtract(offsets, first, out=ws.get(name, I64, len(offsets)))
    feats = zip(coll.fields, fields.items(), strict=True)
    inputs = [offsets, *(_feature(arr[first:last], feat, n, ws) for feat, (n, arr) in feats)]
    if n_rows >= 0 and len(offsets) - 1 != n_rows:
        raise InputError(
            f"{name!r} describes {len(offsets) - 1} rows (length {len(offsets)}), but the "
            f"input has {n_rows} rows: offsets need one entry per row plus one"
        )
    return inputs


def _offsets(value: Any, name: str, ws: Workspace) -> np.ndarray:
    """Offsets column ``value`` as int64, checked: not empty, from >= 0, never decreasing."""
    arr = _as_array(value, name)
    if arr.shape[0] == 0:
        raise InputError(f"{name!r} is empty: offsets have one entry per row plus one (>= 1)")
    if not (arr.dtype == I64 and arr.flags.c_contiguous):
        arr = _to_int64(arr, name, ws.get(name, I64, arr.shape[0]))
    elif not arr.flags.writeable:
        arr = writable_alias(arr)
    if arr[0] < 0:
        raise InputError(
            f"{name!r} starts at {int(arr[0])}: offsets index the field arrays, so they cannot "
            "be negative"
        )
    if (row := _decreasing_at(arr, ws)) >= 0:
        raise InputError(
            f"{name!r} decreases at row {row} ({int(arr[row])} then {int(arr[row + 1])}): "
            "offsets must never decrease"
        )
    return arr


def _from_counts(value: Any, name: str, ws: Workspace) -> np.ndarray:
    """Offsets from 0 made from counts column ``value``: whole numbers in the int64 range,
    not negative, with a sum that does not overflow."""
    counts = _as_array(value, name)
    offsets = ws.get(f"counts:{name}", I64, counts.shape[0] + 1)
    offsets[0] = 0
    tail = _to_int64(counts, name, offsets[1:])
    if tail.shape[0] and tail.min() < 0:
        row = int(tail.argmin())
        raise InputError(f"{name!r} has negative counts (row {row}: {int(tail[row])})")
    np.add.accumulate(tail, out=tail)
    # Every count is below 2**63, so a sum that overflows int64 first shows as a decrease.
    if _decreasing_at(offsets, ws) >= 0:
        raise InputError(f"{name!r} sums beyond the int64 range: these cannot be counts")
    return offsets
