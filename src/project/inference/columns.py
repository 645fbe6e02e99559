"""Arrow tables and awkward record arrays as mappings of SoA columns (each library imported only
when its input arrives), their buffers taken without a copy where the layout allows. A jagged
collection ``part`` with field ``pt`` is the list column ``part_pt``, or (awkward) field ``pt``
of a list-of-records field ``part``."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np

from project.contract import InputContract
from project.inference.errors import InputError


class Columns(dict):
    """Columns of a table; ``available`` names all of its columns (for error messages)."""

    def __init__(self, names: list[str]) -> None:
        super().__init__()
        self.available = sorted(names)


def to_columns(inputs: Any, contract: InputContract) -> Mapping[str, Any]:
    """Any supported input form as a mapping of column name to array."""
    if isinstance(inputs, Mapping):
        return inputs
    module = type(inputs).__module__ or ""
    if module.startswith("pyarrow") and hasattr(inputs, "schema"):
        return from_arrow(inputs, contract)
    if module.startswith("awkward") and hasattr(inputs, "fields"):
        return from_awkward(inputs, contract)
    raise InputError(
        f"unsupported input type {type(inputs).__name__}: pass a mapping of column name to "
        "1-D numpy array, a pyarrow Table/RecordBatch, or an awkward record array"
    )


def from_arrow(table: Any, contract: InputContract) -> Columns:
    """Columns of a ``pyarrow.Table`` or ``RecordBatch``, list columns as jagged fields; a
    column of several chunks is joined first (a copy)."""
    names = Counter(table.schema.names)  # a name can occur more than once in a schema

    def column(name: str) -> Any:
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

    out = Columns(list(names))
    for name in contract.flat_names:
        if name in names:
            out[name] = column(name).to_numpy(zero_copy_only=False)
    for coll in contract.jagged:
        for name in (n for n in coll.field_input_names if n in names):
            col = column(name)
            if not hasattr(col, "offsets") or not hasattr(col, "flatten"):
                raise InputError(
                    f"Arrow column {name!r} has type {col.type}; a jagged field of collection "
                    f"{coll.name!r} must be a list column (one list of values per row)"
                )
            values = col.flatten()  # the values of the lists, from the first list's start
            if values.null_count:
                raise InputError(f"Arrow list column {name!r} has null values inside its lists")
            offsets = col.offsets.to_numpy()
            offsets = offsets - offsets[0] if offsets[0] else offsets
            if not np.array_equal(out.setdefault(coll.offsets_name, offsets), offsets):
                raise InputError(
                    f"Arrow list columns of collection {coll.name!r} have different list "
                    f"lengths ({name!r} differs from the first field); they must describe the "
                    "same objects"
                )
            out[name] = values.to_numpy(zero_copy_only=False)
    return out


def _numbers(ak: Any, array: Any, name: str) -> np.ndarray:
    """One number per entry of awkward ``array`` as numpy (its buffer where it can be)."""
    if array.ndim != 1 or array.fields:
        raise InputError(
            f"awkward field {name!r} has type {array.type}; expected one number per row (per "
            "object for a collection's field)"
        )
    values = ak.to_numpy(array, allow_missing=True)
    if isinstance(values, np.ma.MaskedArray):
        if missing := int(np.ma.count_masked(values)):
            raise InputError(f"awkward field {name!r} has {missing} missing (None) values")
        values = values.data
    return values


def from_awkward(array: Any, contract: InputContract) -> Columns:
    """Columns of an awkward record array (one record per row): numeric fields, and per
    collection its values and ``<collection>_counts``; filtered or reordered arrays
    (``events[mask]``) are gathered by awkward."""
    import awkward as ak

    fields = set(array.fields)
    if not fields:
        raise InputError(f"awkward input of type {array.type} is not a record array")
    out = Columns(list(fields))
    for name in contract.flat_names:
        if name in fields:
            out[name] = _numbers(ak, array[name], name)
    for coll in contract.jagged:
        if coll.name in fields:
            nested = array[coll.name]
            names = [f.name for f in coll.fields if f.name in nested.fields]
            lists = {coll.field_input_name(n): (nested[n], f"{coll.name}.{n}") for n in names}
        else:
            lists = {n: (array[n], n) for n in coll.field_input_names if n in fields}
        for input_name, (values, name) in lists.items():
            if values.ndim != 2:
                raise InputError(
                    f"awkward field {name!r} has type {values.type}; a jagged collection is a "
                    "variable-length list per row"
                )
            counts = _numbers(ak, ak.num(values, axis=1), f"{name} (its list lengths)")
            if not np.array_equal(out.setdefault(coll.counts_name, counts), counts):
                raise InputError(
                    f"awkward list fields of collection {coll.name!r} have different list "
                    f"lengths ({name!r} differs); they must describe the same objects"
                )
            out[input_name] = _numbers(ak, ak.flatten(values, axis=1), name)
    return out
