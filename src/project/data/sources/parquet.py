"""Parquet files read by row group through pyarrow.

Primitive columns give per-event values, list columns give jagged values; expressions,
selection, label and ``per_object`` work as for ROOT (``project.data.expressions``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import awkward as ak
import pyarrow as pa
import pyarrow.parquet as pq

from project.contract import ContractError
from project.data.expressions import resolve_files
from project.data.sources import Chunk


class ParquetSource:
    """Rows of Parquet files, one per table row (or per list element with ``per_object``).

    Parameters
    ----------
    files
        A path, a glob pattern or a list of them; the files are concatenated in order.

    Notes
    -----
    A file's chunks are its row groups, read only for the columns the contract's expressions
    name. ``ParquetSource(files=cache)`` reads the Pythia jets cache (flat ``jet_*`` columns,
    list columns ``part_*`` and ``label``) with the jets contract.
    """

    kind = "column"

    def __init__(self, files: str | Sequence[str]) -> None:
        self.paths = files

    def files(self) -> list[str]:
        """The Parquet files, globs expanded."""
        return resolve_files(self.paths, "Parquet")

    def where(self, file: str) -> str:
        """The path."""
        return file

    def schema(self, file: str) -> tuple[list[str], set[str]]:
        """The file's column names, and the list columns."""
        schema = _schema(file)
        return list(schema.names), {f.name for f in schema if _is_list(f.type)}

    def chunks(self, file: str, columns: Sequence[str]) -> list[Chunk]:
        """One chunk per row group."""
        meta = _file(file).metadata
        out, start = [], 0
        for i in range(meta.num_row_groups):
            n = meta.row_group(i).num_rows
            out.append(Chunk(file, start, start + n, file, index=i))
            start += n
        return out or [Chunk(file, 0, 0, file)]

    def read(self, chunk: Chunk, columns: Sequence[str]) -> dict[str, Any]:
        """The row group's columns as awkward arrays."""
        pf = _file(chunk.file)
        if pf.metadata.num_row_groups == 0:
            table = pf.schema_arrow.empty_table().select(list(columns))
        else:
            table = pf.read_row_group(chunk.index, columns=list(columns))
        # ak.from_arrow handles chunked columns and sliced list offsets without per-row Python.
        return {name: ak.from_arrow(table.column(name)) for name in columns}

    def __repr__(self) -> str:
        return f"ParquetSource({self.paths!r})"


def _file(path: str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except Exception as err:
        raise ContractError(f"{path} is not a readable Parquet file: {err}") from err


def _schema(path: str) -> pa.Schema:
    return _file(path).schema_arrow


def _is_list(t: pa.DataType) -> bool:
    return pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)
