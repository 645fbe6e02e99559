"""SoA columns to the graph's inputs: matched by name, checked, converted only where needed.

The exported graphs take the SoA columns themselves (DESIGN.md), so preparing a call is
checking: a column that is 1-D, contiguous and of the contract's dtype is passed on as it is
(no copy). Conversions the contract allows (other float or integer dtypes to float32 features,
other integer dtypes or integral floats to int64 offsets, counts to offsets) write into the
calling thread's ``Workspace`` buffers, reused across calls. Anything else is an ``InputError``
that names the column: a wrong answer is never returned silently.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from operator import attrgetter, is_
from typing import Any

import numpy as np

from project.contract import InputContract
from project.inference.errors import InputError
from project.inference.workspace import Workspace, writable_alias

F32 = np.dtype(np.float32)
I64 = np.dtype(np.int64)
BOOL = np.dtype(np.bool_)
NAN_POLICIES = ("raise", "ignore")
# Finiteness checks by dot product on at most this many values, with a vector of
# ``_SCALE`` (see ``_finite``): 2**-14 < 1 / _DOT_LIMIT, so no sum of finite terms overflows.
_DOT_LIMIT = 8192
_SCALE = 2.0**-14
_SCALES = np.full(_DOT_LIMIT, _SCALE, dtype=np.float32)
_SCALES.flags.writeable = False
_I64_MAX = np.iinfo(np.int64).max
# What an array can have changed in place since a call took it without a copy: its dtype,
# shape and strides (numpy lets all three be set on an existing array; deprecated in 2.4 for
# strides and 2.5 for dtype and shape: once no supported numpy allows it, ``_layout`` and its
# check can go). Its memory cannot move while the workspace holds a reference to it
# (``ndarray.resize`` refuses), so its size in bytes is fixed, and with its dtype and strides
# unchanged (still one stride: 1-D) so is its shape: comparing those two covers all three.
_layout = attrgetter("dtype", "strides")
_item = np.ndarray.item


def _as_is(arr: np.ndarray) -> bool:
    """Whether the backend can take feature column ``arr`` without a copy: 1-D, float32 and
    contiguous. Asked of a new column, and again of a column handed over in this thread's last
    call: its memory cannot have moved since (see ``_layout``), but its dtype, shape or
    strides can have been set in place, and a column made strided that way would otherwise
    reach the backend as the contiguous memory it was, while the finiteness check read
    other values."""
    return arr.dtype is F32 and arr.ndim == 1 and arr.flags.c_contiguous


def _finite(values: np.ndarray) -> bool:
    """Whether all ``values`` (float32, 1-D, contiguous) are finite; allocates nothing.

    One dot product with a constant vector of ``_SCALE``: it is NaN or Inf exactly when a
    value is (Inf times the scale is Inf, and once the running sum is Inf or NaN it stays
    non-finite), and it cannot overflow for finite values: ``_DOT_LIMIT`` terms of at most
    float32's largest value times ``_SCALE`` sum to half of that largest value. So it is an
    exact test, with no warning for large values such as a float32-max placeholder. It reads
    the column's own memory once, without a copy: right after a backend run, when little of
    it is still in cache, that is what a screen costs (a concatenated copy of all columns
    first cost two to three times as much there). Longer columns are taken in slices of
    ``_DOT_LIMIT`` values, which also keeps BLAS on the calling thread (OpenBLAS splits a
    dot product over threads only for longer vectors). ``_check_finite`` does the one-slice
    case inline.
    """
    for start in range(0, len(values), _DOT_LIMIT):
        part = values[start : start + _DOT_LIMIT]
        if not math.isfinite(part.dot(_SCALES[: len(part)])):
            return False
    return True


def _as_array(value: Any, name: str) -> np.ndarray:
    """``value`` as a numpy array; what ``np.asarray`` would take wrongly is an ``InputError``:
    masked values (numpy masked arrays; ``asarray`` drops the mask), Arrow nulls (``asarray``
    makes them NaN, or anything, for an integer column) and scalars."""
    if type(value) is np.ndarray:
        return value
    if isinstance(value, np.ma.MaskedArray):
        masked = int(np.ma.count_masked(value))
        if masked:
            raise InputError(
                f"column {name!r} is a masked array with {masked} masked values; fill them "
                "(array.filled(value)) or drop those rows first"
            )
        value = value.data
    nulls = getattr(value, "null_count", 0)  # a pyarrow Array or ChunkedArray
    if type(nulls) is int and nulls:
        raise InputError(f"column {name!r} has {nulls} null values; fill or drop them first")
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise InputError(f"column {name!r} cannot be read as a 1-D array: {err}") from err
    if arr.ndim == 0:
        raise InputError(
            f"column {name!r} is a {type(value).__name__}, not an array: SoA columns are 1-D "
            "arrays (one value per row, or per object for jagged fields)"
        )
    return arr


def _field_mismatch(name: str, n_values: int, offsets_name: str, total: int) -> InputError:
    return InputError(
        f"jagged field {name!r} has {n_values} values but {offsets_name}[-1] is {total}: "
        "the offsets do not match the field"
    )


def _one_d(arr: np.ndarray, name: str) -> None:
    if arr.ndim != 1:
        raise InputError(
            f"column {name!r} has shape {arr.shape}; SoA columns are 1-D (one value per row, "
            "or per object for jagged fields)"
        )


class InputPlan:
    """How one contract's inputs are found, checked and converted.

    Parameters
    ----------
    contract
        The model's input contract (its ``input_names`` order is the graph's input order).
    nan_policy
        ``"raise"`` (default): NaN or Inf in a feature is an ``InputError``; ``"ignore"``:
        values are passed to the model as they are.
    """

    def __init__(self, contract: InputContract, nan_policy: str = "raise") -> None:
        if nan_policy not in NAN_POLICIES:
            raise ValueError(f"nan_policy must be one of {NAN_POLICIES}, not {nan_policy!r}")
        self.nan_policy = nan_policy
        self.flat = contract.flat_names
        self.collections = [
            (c.offsets_name, f"{c.name}_counts", c.field_input_names) for c in contract.jagged
        ]
        self.input_names = contract.input_names
        offsets = {c[0] for c in self.collections}
        self.feature_positions = [i for i, n in enumerate(self.input_names) if n not in offsets]
        self.n_inputs = len(self.input_names)
        self.n_flat = len(self.flat)

    # --- the call path ------------------------------------------------------------------
    def prepare(self, columns: Mapping[str, Any], ws: Workspace) -> tuple[list[np.ndarray], int]:
        """The graph's inputs in order, and the number of rows.

        Raises ``InputError`` for a missing column, an unsafe dtype, inconsistent lengths,
        bad offsets, or (with ``nan_policy="raise"``) NaN or Inf in a feature.
        """
        # A host that fills the same arrays for every call (a framework's per-event buffers,
        # the common case) passes the very column objects of this thread's last call. When
        # that call handed every one of them over without a copy, and none has since been
        # given another dtype or layout in place, the inputs are those of the last call
        # again: only what can have changed, the values, is checked (offsets, finiteness).
        same = ws.same_inputs
        if same is not None:
            try:
                again = all(map(is_, map(columns.__getitem__, self.input_names), same[0]))
            except (KeyError, TypeError):
                again = False
            if again and list(map(_layout, same[0])) == same[1]:
                return self._same_inputs(same[2], same[3], ws)
        arrays, n_rows = self._prepare(columns, ws)
        if all(x is not None for x in ws.inputs):  # every column went without a copy
            got = [x[0] for x in ws.inputs]
            ws.same_inputs = (got, list(map(_layout, got)), arrays, n_rows)
        else:
            ws.same_inputs = None
        return arrays, n_rows

    def _same_inputs(
        self, arrays: list[np.ndarray], n_rows: int, ws: Workspace
    ) -> tuple[list[np.ndarray], int]:
        """``prepare`` for the inputs of the last call again: offsets and values re-checked."""
        n_values = n_rows * self.n_flat
        pos = self.n_flat
        for offsets_name, _, fields in self.collections:
            offsets = arrays[pos]
            self._check_offsets(offsets, offsets_name, ws)
            total = int(offsets[-1])
            for i in range(pos + 1, pos + 1 + len(fields)):
                if len(arrays[i]) != total:
                    raise _field_mismatch(self.input_names[i], len(arrays[i]), offsets_name, total)
            n_values += total * len(fields)
            pos += 1 + len(fields)
        if self.nan_policy == "raise":
            self._check_finite(arrays, n_values)
        return arrays, n_rows

    def _prepare(self, columns: Mapping[str, Any], ws: Workspace) -> tuple[list[np.ndarray], int]:
        """``prepare`` column by column; ``ws.inputs`` then says which went without a copy."""
        # This loop runs once per column per call, so the common cases are tested inline. A
        # column that is the very array of this thread's last call, still 1-D float32, is
        # handed over as it was then (same memory, so its current values; the backend reuses
        # what it built on it, a tensor or a binding). Only columns that went over without a
        # copy are remembered this way: a converted column's values may have changed in the
        # caller's array since.
        arrays: list[np.ndarray] = []
        n_rows = -1
        n_values = 0
        last = ws.inputs
        if len(last) != self.n_inputs:
            last[:] = [None] * self.n_inputs
        try:
            for pos, name in enumerate(self.flat):
                arr = columns[name]
                seen = last[pos]
                if seen is not None and seen[0] is arr and _as_is(arr):
                    arr = seen[1]
                else:
                    arr = self._feature_input(arr, name, pos, ws)
                n = len(arr)
                if n != n_rows:
                    if n_rows >= 0:
                        raise InputError(
                            f"flat columns have different lengths: {self.flat[0]!r} has "
                            f"{n_rows} rows, {name!r} has {n}"
                        )
                    n_rows = n
                n_values += n
                arrays.append(arr)
            pos = len(self.flat)
            for offsets_name, counts_name, fields in self.collections:
                offsets, value = self._offsets(columns, offsets_name, counts_name, ws)
                last[pos] = None if value is None else (value, offsets)
                pos += 1
                rows = len(offsets) - 1
                if rows != n_rows:
                    if n_rows >= 0:
                        raise InputError(
                            f"{offsets_name!r} describes {rows} rows (length {rows + 1}), but "
                            f"the input has {n_rows} rows: offsets need one entry per row plus one"
                        )
                    n_rows = rows
                arrays.append(offsets)
                total = int(offsets[-1])
                for name in fields:
                    arr = columns[name]
                    seen = last[pos]
                    if seen is not None and seen[0] is arr and _as_is(arr):
                        arr = seen[1]
                    else:
                        arr = self._feature_input(arr, name, pos, ws)
                    pos += 1
                    if len(arr) != total:
                        raise _field_mismatch(name, len(arr), offsets_name, total)
                    n_values += total
                    arrays.append(arr)
        except KeyError as err:
            raise self._missing(str(err.args[0]), columns) from None
        if self.nan_policy == "raise":
            self._check_finite(arrays, n_values)
        return arrays, n_rows

    def chunk(self, arrays: list[np.ndarray], start: int, stop: int, ws: Workspace) -> list:
        """Rows ``start:stop`` of prepared inputs: views, offsets rebased to start at 0."""
        out = [a[start:stop] for a in arrays[: len(self.flat)]]
        pos = len(self.flat)
        for offsets_name, _, fields in self.collections:
            offsets = arrays[pos]
            first, last = int(offsets[start]), int(offsets[stop])
            view = offsets[start : stop + 1]
            if first:
                view = np.subtract(view, first, out=ws.get(f"chunk:{offsets_name}", I64, len(view)))
            out.append(view)
            out.extend(a[first:last] for a in arrays[pos + 1 : pos + 1 + len(fields)])
            pos += 1 + len(fields)
        return out

    # --- columns ------------------------------------------------------------------------
    def _missing(self, name: str, columns: Mapping[str, Any]) -> InputError:
        wanted = list(self.flat)
        for offsets_name, counts_name, fields in self.collections:
            wanted += [f"{offsets_name} (or {counts_name})", *fields]
        found = getattr(columns, "available", None) or sorted(map(str, columns.keys()))
        shown = ", ".join(found[:30]) + (f", ... ({len(found)} in all)" if len(found) > 30 else "")
        return InputError(
            f"the input has no column {name!r}. The model expects (by name, in any order; extra "
            f"columns are ignored): {', '.join(wanted)}. The input has: {shown or 'no columns'}"
        )

    def _feature_input(self, value: Any, name: str, pos: int, ws: Workspace) -> np.ndarray:
        """Graph input ``pos`` from feature column ``value``; remembered in ``ws.inputs`` when
        it is ``value``'s own memory (see ``prepare``)."""
        if type(value) is np.ndarray and _as_is(value):
            arr = value if value.flags.writeable else writable_alias(value)
            ws.inputs[pos] = (value, arr)
            return arr
        ws.inputs[pos] = None
        return self._feature(value, name, ws)

    @staticmethod
    def _feature(value: Any, name: str, ws: Workspace) -> np.ndarray:
        """A feature column that is not a contiguous float32 ndarray: pass it on if it only
        looked different (an equal dtype object), else convert it into ``ws``."""
        arr = _as_array(value, name)
        _one_d(arr, name)
        dtype = arr.dtype
        if dtype == F32 and arr.flags.c_contiguous:
            return arr if arr.flags.writeable else writable_alias(arr)
        if dtype.kind not in "fiub":
            raise InputError(
                f"column {name!r} has dtype {dtype}, which cannot be cast safely to the "
                f"contract's float32 (features are numbers)"
            )
        buf = ws.get(name, F32, arr.shape[0])
        # Values beyond float32's range become Inf here; the finiteness check reports them.
        with np.errstate(over="ignore", invalid="ignore"):
            np.copyto(buf, arr, casting="unsafe")
        return buf

    def _offsets(
        self, columns: Mapping[str, Any], name: str, counts_name: str, ws: Workspace
    ) -> tuple[np.ndarray, Any]:
        """The graph input for ``name``, checked; and the column itself when it is handed over
        without a copy (``None`` when the offsets were converted or made from counts)."""
        value = columns.get(name)
        if value is None:
            counts = columns.get(counts_name)
            if counts is not None:
                return self._from_counts(counts, name, counts_name, ws), None
            # With no field either (a table without the list columns) name a field: that is
            # what such an input lacks.
            first_field = self.input_names[self.input_names.index(name) + 1]
            raise KeyError(name if first_field in columns else first_field)
        arr = _as_array(value, name)
        _one_d(arr, name)
        if arr.shape[0] == 0:
            raise InputError(f"{name!r} is empty: offsets have one entry per row plus one (>= 1)")
        handed_over = type(value) is np.ndarray
        if not ((arr.dtype is I64 or arr.dtype == I64) and arr.flags.c_contiguous):
            arr = self._to_int64(arr, name, ws.get(name, I64, arr.shape[0]))
            handed_over = False
        elif not arr.flags.writeable:
            arr = writable_alias(arr)
        self._check_offsets(arr, name, ws)
        return arr, value if handed_over else None

    @staticmethod
    def _check_offsets(arr: np.ndarray, name: str, ws: Workspace) -> None:
        """Offsets start at 0 and never decrease (their values, re-read on every call)."""
        if arr[0] != 0:
            raise InputError(f"{name!r} must start at 0, found {int(arr[0])}")
        n_rows = arr.shape[0] - 1
        if n_rows == 1:
            bad = arr[1] < 0
        elif n_rows > 1:
            # Written into scratch, so the check allocates nothing per call.
            bad = np.less(arr[1:], arr[:-1], out=ws.get("scratch:bool", BOOL, n_rows)).any()
        else:
            bad = False
        if bad:
            row = int(np.flatnonzero(np.diff(arr) < 0)[0])
            raise InputError(
                f"{name!r} decreases at row {row} ({int(arr[row])} then {int(arr[row + 1])}): "
                "offsets must never decrease"
            )

    def _from_counts(
        self, value: Any, offsets_name: str, counts_name: str, ws: Workspace
    ) -> np.ndarray:
        counts = _as_array(value, counts_name)
        _one_d(counts, counts_name)
        if counts.dtype.kind not in "iuf":
            raise InputError(f"{counts_name!r} has dtype {counts.dtype}; counts are integers")
        if counts.shape[0] and counts.min() < 0:
            raise InputError(f"{counts_name!r} has negative counts (row {int(counts.argmin())})")
        if counts.dtype.kind == "f":
            counts = self._to_int64(counts, counts_name, ws.get(counts_name, I64, len(counts)))
        offsets = ws.get(offsets_name, I64, counts.shape[0] + 1)
        offsets[0] = 0
        # Cast first, then accumulate in place: a casting cumsum allocates a temporary.
        np.copyto(offsets[1:], counts, casting="unsafe")
        np.add.accumulate(offsets[1:], out=offsets[1:])
        return offsets

    @staticmethod
    def _to_int64(arr: np.ndarray, name: str, buf: np.ndarray) -> np.ndarray:
        kind = arr.dtype.kind
        if kind == "u" and arr.shape[0] and arr.max() > _I64_MAX:
            raise InputError(f"{name!r} has values beyond the int64 range")
        if kind == "f":
            if not np.isfinite(arr).all() or (arr.shape[0] and np.abs(arr).max() > 2.0**53):
                raise InputError(f"{name!r} has NaN, Inf or huge values; it must hold integers")
            np.copyto(buf, arr, casting="unsafe")
            if not np.array_equal(buf, arr):
                row = int(np.flatnonzero(buf != arr)[0])
                raise InputError(
                    f"{name!r} has dtype {arr.dtype} with a fraction at index {row} "
                    f"({arr[row]!r}); it must hold whole numbers"
                )
            return buf
        if kind not in "iu":
            raise InputError(
                f"{name!r} has dtype {arr.dtype}, which cannot be cast safely to int64"
            )
        np.copyto(buf, arr, casting="unsafe")
        return buf

    # --- finiteness ---------------------------------------------------------------------
    def _check_finite(self, arrays: list[np.ndarray], n_values: int) -> None:
        if n_values == self.n_flat and not self.collections:
            # One row of a flat model (a host evaluating event by event): the sum of its
            # values as Python floats is NaN or Inf exactly when one of them is (float32
            # values cannot overflow a float64 sum), and costs no numpy call per column.
            if not math.isfinite(sum(map(_item, arrays))):
                raise self._nonfinite(arrays)
            return
        scales = _SCALES[:0]
        for i in self.feature_positions:
            values = arrays[i]
            n = len(values)
            if n > _DOT_LIMIT:
                ok = _finite(values)
            else:  # ``_finite``'s one slice, inline: columns of one collection share a length
                if len(scales) != n:
                    scales = _SCALES[:n]
                ok = math.isfinite(values.dot(scales))
            if not ok:
                raise self._nonfinite(arrays)

    def _nonfinite(self, arrays: list[np.ndarray]) -> InputError:
        problems = []
        for i in self.feature_positions:
            bad = ~np.isfinite(arrays[i])
            if bad.any():
                name = self.input_names[i]
                first = int(np.flatnonzero(bad)[0])
                n_nan = int(np.isnan(arrays[i]).sum())
                problems.append(
                    f"{name!r}: {n_nan} NaN and {int(bad.sum()) - n_nan} Inf "
                    f"(first at index {first})"
                )
        return InputError(
            "non-finite input values: "
            + "; ".join(problems)
            + ". Clean the inputs, or load the model with nan_policy='ignore' to pass them on"
            + " (float64 values beyond the float32 range become Inf)."
        )
