"""Other input forms to a mapping of SoA columns: Arrow tables and awkward record arrays.

pyarrow and awkward are optional: each is imported only when such an input arrives, detected
by the type's module without importing anything. Buffers are taken as they are (zero-copy):
Arrow hands out read-only numpy views of its buffers, awkward its numpy-backed content.

Naming: a jagged collection ``part`` with field ``pt`` is the list column ``part_pt`` (Arrow,
awkward), or field ``pt`` of a list-of-records field ``part`` (awkward).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np

from project.contract import InputContract
from project.inference.errors import InputError


class Columns(dict):
    """Columns taken from a table or record array; ``available`` lists all of its column names
    (for error messages), not only those the contract asked for."""

    available: list[str]


def _columns(names: list[str]) -> Columns:
    out = Columns()
    out.available = sorted(names)
    return out


def kind_of(inputs: Any) -> str:
    """``"mapping"``, ``"arrow"`` or ``"awkward"``; ``InputError`` for anything else."""
    if isinstance(inputs, Mapping):
        return "mapping"
    module = type(inputs).__module__ or ""
    if module.startswith("pyarrow") and hasattr(inputs, "schema"):
        return "arrow"
    if module.startswith("awkward") and hasattr(inputs, "fields"):
        return "awkward"
    raise InputError(
        f"unsupported input type {type(inputs).__name__}: pass a mapping of column name to "
        "1-D numpy array, a pyarrow Table/RecordBatch, or an awkward record array"
    )


def from_arrow(table: Any, contract: InputContract) -> Columns:
    """Columns of a ``pyarrow.Table`` or ``RecordBatch``; list columns are jagged fields.

    Single-chunk columns (every ``RecordBatch``; tables read in one piece) are zero-copy;
    multi-chunk table columns are joined first (a copy).
    """
    names = Counter(table.schema.names)  # a name can occur more than once in a schema

    def column(name: str) -> Any:
        if name not in names:
            return None
        if names[name] > 1:
            raise InputError(
                f"the Arrow input has {names[name]} columns named {name!r}; rename or drop "
                "all but one"
            )
        col = table.column(name)
        if hasattr(col, "num_chunks"):  # a Table's ChunkedArray
            col = col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()
        if hasattr(col, "dictionary_decode"):  # its nulls can be in the dictionary too
            col = col.dictionary_decode()
        if col.null_count:
            raise InputError(f"Arrow column {name!r} has {col.null_count} null values")
        return col

    out = _columns(list(names))
    for name in contract.flat_names:
        col = column(name)
        if col is not None:
            out[name] = col.to_numpy(zero_copy_only=False)
    for coll in contract.jagged:
        reference = None
        for name in coll.field_input_names:
            col = column(name)
            if col is None:
                continue
            if not hasattr(col, "offsets") or not hasattr(col, "flatten"):
                raise InputError(
                    f"Arrow column {name!r} has type {col.type}; a jagged field of collection "
                    f"{coll.name!r} must be a list column (one list of values per row)"
                )
            values = col.flatten()
            if values.null_count:
                raise InputError(f"Arrow list column {name!r} has null values inside its lists")
            offsets = col.offsets.to_numpy()
            if offsets[0] != 0:  # a sliced array: rebase (small copy of the offsets only)
                offsets = offsets - offsets[0]
            if reference is None:
                reference = offsets
                out[coll.offsets_name] = offsets
            elif not np.array_equal(reference, offsets):
                raise InputError(
                    f"Arrow list columns of collection {coll.name!r} have different list "
                    f"lengths ({name!r} differs from the first field); they must describe the "
                    "same objects"
                )
            out[name] = values.to_numpy(zero_copy_only=False)
    return out


def _present(layout: Any, name: str) -> Any:
    """``layout`` without option types, which columnar files add for nullable columns (Parquet
    read by awkward gives ``?float32``), and without the index of a filtered or reordered
    array (``events[mask]``: its values gathered, a copy); actual missing values are an
    ``InputError``."""
    while True:
        kind = type(layout).__name__
        if kind == "IndexedArray":
            layout = layout.project()
        elif not layout.is_option:
            return layout
        elif kind == "UnmaskedArray":  # no mask at all: nothing to check
            layout = layout.content
        else:
            missing = int(np.count_nonzero(~np.asarray(layout.mask_as_bool(valid_when=True))))
            if missing:
                raise InputError(f"awkward field {name!r} has {missing} missing (None) values")
            layout = layout.project()


def _numbers(layout: Any, name: str, length: int | None = None) -> np.ndarray:
    layout = _present(layout, name)
    if type(layout).__name__ != "NumpyArray" or layout.data.ndim != 1:
        raise InputError(
            f"awkward field {name!r} has layout {type(layout).__name__}; expected one number "
            "per row (per object for a collection's field)"
        )
    data = np.asarray(layout.data)  # the layout's own buffer: no copy
    return data if length is None else data[:length]


def _lists(ak: Any, array: Any, name: str) -> tuple[np.ndarray, Any]:
    """``(offsets starting at 0, content layout)`` of a list-per-row field."""
    layout = _present(ak.to_layout(array), name)
    if not hasattr(layout, "to_ListOffsetArray64") or type(layout).__name__ == "RecordArray":
        raise InputError(
            f"awkward field {name!r} has type {array.type}; a jagged collection is a "
            "variable-length list per row"
        )
    layout = layout.to_ListOffsetArray64(True)
    return np.asarray(layout.offsets.data), _present(layout.content, name)


def from_awkward(array: Any, contract: InputContract) -> Columns:
    """Columns of an awkward record array (one record per row).

    Flat columns are its numeric fields; collection ``part`` is either a list-of-records
    field ``part`` (``var * {pt, eta, ...}``) or list fields ``part_pt``, ``part_eta``...
    Numbers are taken from awkward's buffers without a copy.
    """
    import awkward as ak

    fields = set(array.fields)
    if not fields:
        raise InputError(f"awkward input of type {array.type} is not a record array")
    out = _columns(list(fields))
    for name in contract.flat_names:
        if name in fields:
            out[name] = _numbers(ak.to_layout(array[name]), name)
    for coll in contract.jagged:
        if coll.name in fields:
            offsets, content = _lists(ak, array[coll.name], coll.name)
            for feat in coll.fields:
                if type(content).__name__ == "RecordArray" and feat.name in content.fields:
                    out[coll.field_input_name(feat.name)] = _numbers(
                        content.content(feat.name), f"{coll.name}.{feat.name}", int(offsets[-1])
                    )
            out[coll.offsets_name] = offsets
            continue
        for name in coll.field_input_names:
            if name in fields:
                offsets, content = _lists(ak, array[name], name)
                out.setdefault(coll.offsets_name, offsets)
                if not np.array_equal(out[coll.offsets_name], offsets):
                    raise InputError(
                        f"awkward list fields of collection {coll.name!r} have different list "
                        f"lengths ({name!r} differs); they must describe the same objects"
                    )
                out[name] = _numbers(content, name, int(offsets[-1]))
    return out


def to_columns(inputs: Any, contract: InputContract) -> Mapping[str, Any]:
    """Any supported input form as a mapping of column name to array."""
    kind = kind_of(inputs)
    if kind == "mapping":
        return inputs
    if kind == "arrow":
        return from_arrow(inputs, contract)
    return from_awkward(inputs, contract)


def tile_golden(
    golden: dict[str, np.ndarray], contract: InputContract, batch: int
) -> dict[str, np.ndarray]:
    """The golden rows repeated to ``batch`` rows, as contiguous SoA columns."""
    n = len(golden[contract.input_names[0]]) - (0 if contract.flat else 1)
    rows = np.arange(batch) % n
    cols = {name: np.ascontiguousarray(golden[name][rows]) for name in contract.flat_names}
    for coll in contract.jagged:
        offsets = golden[coll.offsets_name]
        counts = np.diff(offsets)[rows]
        new = np.zeros(batch + 1, dtype=np.int64)
        np.cumsum(counts, out=new[1:])
        # Object j of new row i comes from old object offsets[rows[i]] + (j - new[i]).
        objects = np.repeat(offsets[rows] - new[:-1], counts) + np.arange(new[-1])
        cols[coll.offsets_name] = new
        for name in coll.field_input_names:
            cols[name] = np.ascontiguousarray(golden[name][objects])
    return cols
