"""Parquet files (for instance the jets cache of the Pythia source) into a ``ColumnarData`` table.

Primitive columns give flat columns, list columns give jagged fields; expressions, selection,
label and ``per_object`` work as for ``RootSource`` (the shared ``_expressions`` module).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import awkward as ak
import pyarrow as pa
import pyarrow.parquet as pq

from project.data.columnar import ColumnarData
from project.data.contract import ContractError
from project.data.sources._expressions import (
    Expression,
    TableSpec,
    assemble,
    describe,
    resolve_files,
)


class ParquetSource:
    """Rows of Parquet files, one per table row (or per object with ``per_object``).

    Parameters
    ----------
    files
        A path, a glob pattern or a list of them; the files are concatenated in order.
    flat
        ``{name: column or expression}``, or a list of column names. Default (``None``): every
        numeric or boolean non-list column except those the label reads (with ``per_object``,
        plus the list columns ``<prefix>_*`` of that collection). ``[]`` means none.
    jagged
        ``{collection: {field: list column or expression}}``; a list of field names
        ``{part: [pt, eta]}`` means the columns ``part_pt``, ``part_eta``. Default (``None``):
        every list column, grouped into collections by the text before its first ``_``
        (``part_pt`` is field ``pt`` of collection ``part``; a name without ``_`` is a
        collection with one field of the same name), except those the label reads and those of
        the ``per_object`` collection. ``{}`` means none.
    label
        Expression giving each row's class index (integers >= 0 or booleans). Default: the
        column ``label`` when the files have one.
    selection
        Boolean expression; rows where it is false are dropped.
    per_object
        Collection prefix: one row per element of the ``<prefix>_*`` list columns (see
        ``RootSource``).

    Notes
    -----
    With the defaults, ``ParquetSource(files=cache)`` reads the Pythia jets cache as flat
    ``jet_*`` columns, the ``part`` collection and the ``label`` column. Declaring ``flat`` and
    ``jagged`` reads only the columns they name.
    """

    def __init__(
        self,
        files: str | Sequence[str],
        flat: Mapping[str, str] | Sequence[str] | None = None,
        jagged: Mapping[str, Mapping[str, str] | Sequence[str]] | None = None,
        label: str | None = None,
        selection: str | None = None,
        per_object: str | None = None,
    ) -> None:
        self.files = files
        self.flat, self.jagged = flat, jagged
        self.label, self.selection, self.per_object = label, selection, per_object
        if flat is not None and jagged is not None:
            # Everything is declared: parse now so a bad declaration fails at instantiation.
            TableSpec(flat, jagged, label, selection, per_object)
        self._data: ColumnarData | None = None

    def load(self) -> ColumnarData:
        """Read every file into one validated table (cached)."""
        if self._data is None:
            files = resolve_files(self.files, "Parquet")
            spec = self._spec(_schema(files[0]))
            parts = (part for path in files for part in _read(path, spec))
            self._data = assemble(parts, spec, describe(files))
        return self._data

    def _spec(self, schema: pa.Schema) -> TableSpec:
        """The declarations, with the documented defaults filled in from ``schema``."""
        label = self.label
        if label is None and "label" in schema.names:
            label = "label"
        if self.flat is not None and self.jagged is not None:
            return TableSpec(self.flat, self.jagged, label, self.selection, self.per_object)
        names = set(schema.names)
        reserved = set()
        if label is not None:
            # A default feature must never be the label itself or what the label is made of.
            reserved = set(Expression(label, "label").columns(names, "the first file"))
        lists = [f.name for f in schema if _is_list(f.type) and f.name not in reserved]
        prefix = None if self.per_object is None else f"{str(self.per_object).rstrip('_')}_"
        own = [n for n in lists if prefix is not None and n.startswith(prefix)]
        flat = self.flat
        if flat is None:
            primitive = [f.name for f in schema if _is_number(f.type) and f.name not in reserved]
            flat = primitive + own
        jagged = self.jagged
        if jagged is None:
            jagged = {}
            for name in lists:
                if name not in own:
                    cname, _, fname = name.partition("_")
                    jagged.setdefault(cname, {})[fname or name] = name
        return TableSpec(flat, jagged, label, self.selection, self.per_object)


def _schema(path: str) -> pa.Schema:
    try:
        return pq.read_schema(path)
    except Exception as err:
        raise ContractError(f"{path} is not a readable Parquet file: {err}") from err


def _read(path: str, spec: TableSpec) -> Iterator[tuple[ColumnarData, int]]:
    schema = _schema(path)
    lists = {f.name for f in schema if _is_list(f.type)}
    binding = spec.bind(schema.names, lists, path, "column")
    table = pq.read_table(path, columns=binding.columns)
    # ak.from_arrow handles chunked columns and sliced list offsets without per-row Python.
    arrays: dict[str, Any] = {name: ak.from_arrow(table.column(name)) for name in binding.columns}
    yield binding.build(arrays)


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)


def _is_number(t: pa.DataType) -> bool:
    return pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_boolean(t)
