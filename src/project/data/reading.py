"""A source's files read chunk by chunk, with the bad-file policy and one schema for all.

Both paths read through ``FileReader``: the in-memory path (``load_splits``) reads every
chunk of every file and joins each split's rows; the streaming path reads chunks lazily
(``project.data.streaming``) after one indexing pass (``project.data.stream_index``).

- A file whose metadata or one of whose chunks cannot be read (corrupt, truncated, not of
  its format) is a ``BadFileError`` naming the file and, for a chunk, the entry range. With
  ``data.on_bad_file=skip`` the readers leave such a file out, say so in the log, and list it
  in the run's ``metrics.json``.
- A file whose stored columns hold other types than in the files read before it (``float64``
  where the others hold ``float32``, ``int32`` labels beside ``int64``) is a
  ``ContractError`` naming both files: it comes from another production or writer.
- The contract's own errors (a missing column, a bad expression) pass through as they are.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import awkward as ak
import numpy as np

from project.contract import ContractError, InputContract
from project.data.columnar import ColumnarData
from project.data.expressions import Binding, TableSpec, check_kept, describe
from project.data.fitting import LabelCheck
from project.data.sources import Chunk, Source, UnreadableChunkError, read_arrays
from project.data.splitting import SPLITS, Splitting, split_rows

log = logging.getLogger(__name__)

ON_BAD_FILE = ("raise", "skip")


class BadFileError(UnreadableChunkError):
    """A file that cannot be read: its metadata, or one of its chunks (``file`` names it)."""

    def __init__(self, message: str, file: str | None = None) -> None:
        super().__init__(message)
        self.file = file


def _stored_type(array: Any) -> str:
    """A stored column's value type, ``float32`` or ``var * float32``, without nullability
    (Parquet columns are nullable by default, the values are what matters)."""
    if isinstance(array, ak.Array):
        text = str(ak.type(array).content)
        return re.sub(r"option\[(.*)\]", r"\1", text).replace("?", "")
    return str(np.asarray(array).dtype)


def _nbytes(array: Any) -> int:
    return int(array.nbytes) if hasattr(array, "nbytes") else 0


class FileReader:
    """Reads the chunks of one source's files for one ``TableSpec``.

    Each file is bound to the spec once (``open``); ``read`` builds one chunk's rows and
    checks its stored columns' types against the files read before it.
    """

    def __init__(self, source: Source, spec: TableSpec) -> None:
        self.source, self.spec = source, spec
        self.bindings: dict[str, Binding] = {}
        # Stored column -> (its type, the file where it was first read).
        self.types: dict[str, tuple[str, str]] = {}

    def open(self, file: str) -> list[Chunk]:
        """Bind ``file`` to the spec and list its chunks.

        Raises ``BadFileError`` when its metadata cannot be read, ``ContractError`` when its
        columns do not satisfy the contract.
        """
        where = self.source.where(file)
        try:
            available, jagged = self.source.schema(file)
        except Exception as err:
            raise BadFileError(f"{where} cannot be read: {_reason(err)}", file) from err
        binding = self.spec.bind(available, jagged, where, self.source.kind)
        try:
            chunks = self.source.chunks(file, binding.columns)
        except Exception as err:
            raise BadFileError(f"{where} cannot be read: {_reason(err)}", file) from err
        self.bindings[file] = binding
        return chunks

    def binding(self, file: str) -> Binding:
        """The file's binding (opening the file if needed)."""
        if file not in self.bindings:
            self.open(file)
        return self.bindings[file]

    def read(self, chunk: Chunk) -> tuple[ColumnarData, int, int]:
        """One chunk's table part, its rows before the selection, and the bytes of the stored
        arrays read for it."""
        binding = self.binding(chunk.file)
        try:
            arrays = read_arrays(self.source, chunk, binding.columns)
        except UnreadableChunkError as err:
            raise BadFileError(str(err), chunk.file) from err
        except ContractError as err:  # a source's own "not a readable file"
            raise BadFileError(f"{chunk.describe()} cannot be read: {err}", chunk.file) from err
        self._check_types(chunk, arrays)
        part, before = binding.build(arrays, start=chunk.start)
        return part, before, sum(_nbytes(a) for a in arrays.values())

    def _check_types(self, chunk: Chunk, arrays: dict[str, Any]) -> None:
        for name, array in arrays.items():
            found = _stored_type(array)
            seen = self.types.setdefault(name, (found, self.source.where(chunk.file)))
            if seen[0] != found:
                raise ContractError(
                    f"{chunk.describe()}: {self.source.kind} {name!r} holds {found}, but "
                    f"{seen[1]} holds {seen[0]}: the files come from different productions or "
                    "writers. Write them with one schema, or leave one of them out of the file "
                    "list"
                )


def _reason(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def check_on_bad_file(value: str) -> str:
    """``value`` if it is a known ``data.on_bad_file`` policy."""
    if value not in ON_BAD_FILE:
        raise ContractError(f"data.on_bad_file must be one of {list(ON_BAD_FILE)}, got {value!r}")
    return value


def skip_or_raise(err: BadFileError, on_bad_file: str, skipped: dict[str, str]) -> None:
    """Record ``err``'s file in ``skipped`` (``on_bad_file="skip"``, logged) or raise it."""
    if on_bad_file != "skip":
        raise err
    skipped[err.file] = str(err)
    log.warning(f"data.on_bad_file=skip: leaving out {err.file}: {err}")


def all_skipped(skipped: dict[str, str]) -> ContractError:
    """The error when no file could be read."""
    reasons = "; ".join(f"{f}: {r}" for f, r in skipped.items())
    return ContractError(f"none of the {len(skipped)} files can be read: {reasons}")


@dataclass
class LoadedSplits:
    """The splits read into memory, the files left out (file -> reason), and the rows dropped
    for NaN or Inf values."""

    splits: dict[str, ColumnarData]
    skipped: dict[str, str] = field(default_factory=dict)
    dropped: int = 0
    source: str = ""


def load_splits(
    source: Source,
    spec: TableSpec,
    contract: InputContract,
    splitting: Splitting,
    on_bad_file: str = "raise",
) -> LoadedSplits:
    """Read every chunk of ``source`` and split the rows as ``splitting`` says.

    The files are read in the source's order (``split_by=rows`` depends on it, the other
    assignments do not). The labels are checked over all rows (``LabelCheck``), and an empty
    split is an error.
    """
    reader = FileReader(source, spec)
    skipped: dict[str, str] = {}
    files: list[str] = []
    parts: list[tuple[ColumnarData, int, int | None]] = []
    file_splits = splitting.file_splits(source.files()) if splitting.by == "file" else {}
    for file in source.files():
        try:
            read = [reader.read(chunk)[:2] for chunk in reader.open(file)]
        except BadFileError as err:
            skip_or_raise(err, on_bad_file, skipped)
            continue
        files.append(file)
        parts += [(part, before, file_splits.get(file)) for part, before in read]
    if not files:
        raise all_skipped(skipped)
    name = describe([source.where(f) for f in files])
    check_kept(sum(b for _, b, _ in parts), sum(len(p) for p, _, _ in parts), spec, name)
    labels = LabelCheck(contract)
    for part, _, _ in parts:
        labels.update(part)
    labels.check(name)
    dropped = sum(p.dropped for p, _, _ in parts)
    if dropped:
        log.warning(f"{name}: {dropped} rows with NaN or Inf values dropped (data.nan_policy=drop)")
    if splitting.by == "rows":
        data = ColumnarData.concatenate([p for p, _, _ in parts])
        data.source = name
        data.validate()
        rows = split_rows(len(data), splitting.fractions, splitting.seed)
        splits = {s: data.take(r) for s, r in zip(SPLITS, rows, strict=True)}
    else:
        pieces: dict[str, list[ColumnarData]] = {s: [] for s in SPLITS}
        for part, _, file_split in parts:
            index = splitting.row_splits(part, file_split)
            for k, s in enumerate(SPLITS):
                pieces[s].append(part.take(np.flatnonzero(index == k)))
        splits = {s: ColumnarData.concatenate(p) for s, p in pieces.items()}
    for s, data in splits.items():
        data.source = name
        data.validate()
        if len(data) == 0:
            total = sum(len(d) for d in splits.values())
            raise ContractError(
                f"{name}: the {s} split is empty ({total} rows, split "
                f"{list(splitting.fractions)} by {splitting.describe()}); use more data or "
                "other fractions"
            )
    return LoadedSplits(splits, skipped, dropped, name)


def first_readable(
    reader: FileReader, files: Sequence[str], on_bad_file: str, skipped: dict[str, str]
) -> tuple[str, list[Chunk]] | None:
    """The first file of ``files`` whose metadata reads and that has a chunk with entries,
    with its chunks; unreadable files go to ``skip_or_raise``."""
    for file in files:
        try:
            chunks = reader.open(file)
        except BadFileError as err:
            skip_or_raise(err, on_bad_file, skipped)
            continue
        if any(c.n_rows for c in chunks):
            return file, chunks
    return None
