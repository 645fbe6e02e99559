"""Data sources: storage read in chunks of stored columns, turned into the contract's table.

A source knows its files, each file's stored columns, how a file splits into chunks (ROOT
entry ranges, Parquet row groups, HDF5 chunks) and how to read one chunk's columns as numpy
or awkward arrays. What to build from those columns is the contract's business: ``load``
binds the contract's expressions to each file (``project.data.expressions``) and builds the
rows chunk by chunk, never per event in Python. The in-memory path reads every chunk; the
streaming path reads them lazily, and the predict job reads them file by file.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from project.contract import ContractError
from project.data.columnar import ColumnarData
from project.data.expressions import Binding, TableSpec, assemble, describe


class UnreadableChunkError(ContractError):
    """A file, or a chunk of it, that cannot be read (corrupt, truncated, not of its format)."""


@dataclass(frozen=True)
class Chunk:
    """Rows ``start:stop`` of one file, read at once.

    ``index`` is the format's own unit where it has one (a Parquet row group). ``where`` names
    the file (and tree) in messages.
    """

    file: str
    start: int
    stop: int
    where: str
    index: int = 0

    @property
    def n_rows(self) -> int:
        """Stored rows (events) in the chunk."""
        return self.stop - self.start

    def describe(self) -> str:
        """The chunk in messages: its file and entry range."""
        return f"{self.where} (entries {self.start}-{self.stop})"


class Source(Protocol):
    """What the data layer needs from a source; see the module docstring."""

    kind: str  # what a stored column is called in messages: "branch", "column", "field"

    def files(self) -> list[str]:
        """The files (or generator streams), in order."""
        ...

    def where(self, file: str) -> str:
        """A file as named in messages (``path:tree``)."""
        ...

    def schema(self, file: str) -> tuple[list[str], set[str]]:
        """A file's stored column names in stored order, and those holding a list per event."""
        ...

    def chunks(self, file: str, columns: Sequence[str]) -> list[Chunk]:
        """How ``file`` splits into chunks when ``columns`` are read."""
        ...

    def read(self, chunk: Chunk, columns: Sequence[str]) -> dict[str, Any]:
        """The arrays of ``columns`` for the events of ``chunk``."""
        ...


def bind(source: Source, file: str, spec: TableSpec) -> Binding:
    """The spec checked against one file's columns."""
    available, jagged = source.schema(file)
    return spec.bind(available, jagged, source.where(file), source.kind)


def read_arrays(source: Source, chunk: Chunk, columns: Sequence[str]) -> dict[str, Any]:
    """The stored arrays of ``columns`` for one chunk; an unreadable chunk is an
    ``UnreadableChunkError`` naming the file and the entry range (the contract's own errors
    pass through)."""
    try:
        return source.read(chunk, columns)
    except ContractError:
        raise
    except Exception as err:
        raise UnreadableChunkError(
            f"{chunk.describe()} cannot be read: {type(err).__name__}: {err}. The file is "
            "corrupt or truncated; replace it, or leave it out of the file list"
        ) from err


def read_chunk(source: Source, chunk: Chunk, binding: Binding) -> tuple[ColumnarData, int]:
    """Build one chunk's rows (see ``read_arrays`` for an unreadable chunk)."""
    return binding.build(read_arrays(source, chunk, binding.columns), start=chunk.start)


def iter_parts(source: Source, spec: TableSpec) -> Iterator[tuple[ColumnarData, int]]:
    """Every chunk of every file as a table part, in stored order."""
    for file in source.files():
        binding = bind(source, file, spec)
        for chunk in source.chunks(file, binding.columns):
            yield read_chunk(source, chunk, binding)


def load(source: Source, spec: TableSpec) -> ColumnarData:
    """The whole table of ``source`` in memory, validated."""
    files = source.files()
    return assemble(iter_parts(source, spec), spec, describe([source.where(f) for f in files]))


def entry_ranges(n_entries: int, step: int, file: str, where: str) -> list[Chunk]:
    """``[0, step), [step, 2 step), ...`` of a file with ``n_entries`` entries."""
    step = max(int(step), 1)
    return [
        Chunk(file, start, min(start + step, n_entries), where)
        for start in range(0, max(n_entries, 1), step)
    ]


__all__ = [
    "Chunk",
    "Source",
    "UnreadableChunkError",
    "bind",
    "entry_ranges",
    "iter_parts",
    "load",
    "read_arrays",
    "read_chunk",
]
