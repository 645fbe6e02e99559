"""When the training data streams, and how much memory streaming may take.

``data.stream`` is ``auto`` (stream when the table would not fit ``data.memory_budget``),
``true`` or ``false``. The decision is made before anything is loaded, from the files'
metadata (the number of entries per chunk) and one chunk read in full (its table's bytes per
entry); the log says which path was taken and why.

Streaming holds, per DataLoader worker, one chunk in flight and its share of the shuffle
buffer, plus the batches queued for the training step; ``memory_need`` adds them up, and a
budget too small for them is refused before the data is indexed, with what it needs.

The indexing pass is ``project.data.stream_index``, the batches ``project.data.stream_loader``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any

import psutil

from project.contract import ContractError
from project.data.expressions import TableSpec
from project.data.reading import FileReader, check_on_bad_file, first_readable
from project.data.sources import Source
from project.data.splitting import Splitting

log = logging.getLogger(__name__)

# data.memory_budget=null: this share of the machine's RAM.
DEFAULT_BUDGET_FRACTION = 0.5
# The in-memory path holds the parts read and the joined table at once, then the table and
# its splits: about twice the table.
IN_MEMORY_COPIES = 2.0
# A shuffle buffer is copied when a chunk joins it and when the rows not yet sent are kept.
BUFFER_COPIES = 2.0
_UNITS = {
    "": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
    "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
}  # fmt: skip


def parse_bytes(value: Any, what: str) -> int:
    """A size in bytes from a number (``8e9``) or text with a unit (``"8 GB"``, ``"6GiB"``)."""
    if isinstance(value, bool):
        raise ContractError(
            f"{what} must be a number of bytes or a size like '8 GB', got {value!r}"
        )
    if isinstance(value, (int, float)):
        number = float(value)
    else:
        match = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(value))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _UNITS:
            raise ContractError(
                f"{what} must be a number of bytes or a size like '8 GB' or '6 GiB', got {value!r}"
            )
        try:
            number = float(match.group(1)) * _UNITS[unit]
        except ValueError:
            raise ContractError(f"{what}: {value!r} is not a number") from None
    if not number > 0:
        raise ContractError(f"{what} must be > 0, got {value!r}")
    return int(number)


def format_bytes(n: float) -> str:
    """``n`` bytes for messages: ``1.23 GB``."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3g} {unit}"
    return f"{int(n)} B"


def _whole(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ContractError(f"{what} must be a whole number >= {minimum}, got {value!r}")
    return value


@dataclass(frozen=True)
class StreamSettings:
    """The streaming options of the data config.

    Parameters
    ----------
    stream
        ``"auto"``, ``True`` or ``False``.
    memory_budget
        Bytes the data may take (a number or text such as ``"8 GB"``); ``None``:
        ``DEFAULT_BUDGET_FRACTION`` of the machine's RAM. Under DDP each rank holds its own
        data: give the budget of one rank.
    shuffle_buffer
        Rows of the training split mixed at once, shared among the DataLoader workers.
    fit_rows
        Training rows the constants are fitted on (``None``: all).
    workers
        DataLoader worker processes that read and batch (0: in the training process).
    on_bad_file
        ``raise`` or ``skip`` (see ``project.data.reading``).
    cache_dir
        Where the indexing pass keeps its result (the run directory); ``None``: nowhere.
    """

    stream: bool | str = "auto"
    memory_budget: int | float | str | None = None
    shuffle_buffer: int = 100_000
    fit_rows: int | None = None
    workers: int = 0
    on_bad_file: str = "raise"
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.stream, bool) or self.stream == "auto"):
            raise ContractError(f"data.stream must be auto, true or false, got {self.stream!r}")
        if self.memory_budget is not None:
            parse_bytes(self.memory_budget, "data.memory_budget")
        _whole(self.shuffle_buffer, "data.shuffle_buffer", 1)
        if self.fit_rows is not None:
            _whole(self.fit_rows, "data.fit_rows", 1)
        _whole(self.workers, "data.workers", 0)
        check_on_bad_file(self.on_bad_file)

    def budget(self) -> tuple[int, str]:
        """The memory budget in bytes, and where it comes from (for the log)."""
        if self.memory_budget is not None:
            return parse_bytes(self.memory_budget, "data.memory_budget"), "data.memory_budget"
        total = psutil.virtual_memory().total
        return int(DEFAULT_BUDGET_FRACTION * total), (
            f"{DEFAULT_BUDGET_FRACTION:.0%} of this machine's {format_bytes(total)} of RAM"
        )


@dataclass(frozen=True)
class SizeEstimate:
    """The table's size, from the files' metadata and one chunk read in full.

    ``entries`` and ``max_chunk_entries`` count stored entries (events); the bytes per entry
    are those of the chunk ``measured``: its table (``table_bytes_per_entry``) and the
    stored arrays read for it (``read_bytes_per_entry``).
    """

    files: int
    entries: int
    max_chunk_entries: int
    rows_per_entry: float
    table_bytes_per_entry: float
    read_bytes_per_entry: float
    measured: str

    @property
    def table_bytes(self) -> float:
        """The whole table in memory."""
        return self.entries * self.table_bytes_per_entry

    @property
    def bytes_per_row(self) -> float:
        """One row of the table."""
        return self.table_bytes_per_entry / max(self.rows_per_entry, 1e-12)

    @property
    def chunk_bytes(self) -> float:
        """The largest chunk in flight: its stored arrays and its table."""
        return self.max_chunk_entries * (self.table_bytes_per_entry + self.read_bytes_per_entry)

    @property
    def max_chunk_rows(self) -> int:
        """Rows of the largest chunk (estimated)."""
        return int(self.max_chunk_entries * self.rows_per_entry) + 1


def estimate_size(source: Source, spec: TableSpec, on_bad_file: str) -> SizeEstimate:
    """Read every file's metadata and the first chunk with entries in full (files in sorted
    order). Unreadable files are skipped or raised as ``on_bad_file`` says."""
    reader = FileReader(source, spec)
    files = sorted(source.files())
    skipped: dict[str, str] = {}
    found = first_readable(reader, files, on_bad_file, skipped)
    if found is None:
        raise ContractError(
            f"no entries to read in {len(files)} files"
            + (f" ({len(skipped)} unreadable: {sorted(skipped)})" if skipped else "")
        )
    first, chunks = found
    chunk = next(c for c in chunks if c.n_rows)
    part, _, read_bytes = reader.read(chunk)
    entries, largest = 0, 0
    for file in files:
        if file in skipped:
            continue
        try:
            file_chunks = chunks if file == first else reader.open(file)
        except Exception as err:  # counted out here; the indexing pass applies the policy
            log.debug(f"{file} left out of the size estimate: {err}")
            continue
        entries += sum(c.n_rows for c in file_chunks)
        largest = max([largest, *(c.n_rows for c in file_chunks)])
    return SizeEstimate(
        files=len(files),
        entries=entries,
        max_chunk_entries=largest,
        rows_per_entry=len(part) / chunk.n_rows,
        table_bytes_per_entry=part.nbytes() / chunk.n_rows,
        read_bytes_per_entry=read_bytes / chunk.n_rows,
        measured=chunk.describe(),
    )


@dataclass(frozen=True)
class MemoryNeed:
    """What streaming holds at most, in bytes, and the rows each worker may hold."""

    chunks: float
    buffers: float
    batches: float
    worker_rows: int

    @property
    def total(self) -> float:
        """Everything together."""
        return self.chunks + self.buffers + self.batches


def memory_need(
    estimate: SizeEstimate,
    settings: StreamSettings,
    batch_size: int,
    eval_batch_size: int,
    prefetch: int,
) -> MemoryNeed:
    """The most streaming holds: per worker (at least one reader) one chunk in flight and its
    share of the shuffle buffer plus one batch of rows (``buffer_rows``), both copied once
    while joined; the batches queued by the workers (``prefetch`` each); and the evaluation
    loaders' chunk and batch, which Lightning runs while the training workers are alive."""
    readers = max(settings.workers, 1)
    row = estimate.bytes_per_row
    buffer = buffer_rows(settings, batch_size)
    chunks = 2 * readers * estimate.chunk_bytes
    buffers = BUFFER_COPIES * readers * (buffer + eval_batch_size) * row
    batches = readers * max(prefetch, 1) * (batch_size + eval_batch_size) * row
    return MemoryNeed(chunks, buffers, batches, buffer + estimate.max_chunk_rows)


def buffer_rows(settings: StreamSettings, batch_size: int) -> int:
    """Rows one worker's shuffle buffer holds at most: its share of ``shuffle_buffer`` and
    one batch (the buffer is emptied down to half before it sends a batch)."""
    return settings.shuffle_buffer // max(settings.workers, 1) + batch_size


def decide(
    source: Source,
    spec: TableSpec,
    splitting: Splitting,
    settings: StreamSettings,
    batch_size: int,
    eval_batch_size: int,
    prefetch: int,
) -> bool:
    """Whether to stream, logged with the reason; a streaming setup that cannot work is an
    error before anything is loaded (``split_by=rows``, a budget too small)."""
    if settings.stream is False:
        log.info("data: in memory (data.stream=false)")
        return False
    estimate = estimate_size(source, spec, settings.on_bad_file)
    budget, budget_from = settings.budget()
    in_memory = IN_MEMORY_COPIES * estimate.table_bytes
    measured = (
        f"{estimate.entries:,} entries in {estimate.files} files at "
        f"{format_bytes(estimate.table_bytes_per_entry)} per entry, measured on "
        f"{estimate.measured}"
    )
    if settings.stream == "auto" and in_memory <= budget:
        log.info(
            f"data: in memory (data.stream=auto): the table takes about "
            f"{format_bytes(estimate.table_bytes)} ({measured}), held up to {IN_MEMORY_COPIES:g} "
            f"times while it is split: {format_bytes(in_memory)}, within the memory budget of "
            f"{format_bytes(budget)} ({budget_from})"
        )
        return False
    why = (
        "data.stream=true"
        if settings.stream is True
        else f"data.stream=auto: the table would take about {format_bytes(in_memory)} in memory "
        f"({measured}, held {IN_MEMORY_COPIES:g} times while it is split), over the memory "
        f"budget of {format_bytes(budget)} ({budget_from})"
    )
    if splitting.by == "rows":
        raise ContractError(
            f"data: streaming ({why}) needs data.split_by=hash or file: split_by=rows places "
            "rows by their position in the table loaded in memory. Set data.split_by=hash "
            "(rows by a hash of data.split_ids, [entry] by default; the split then differs "
            "from split_by=rows), or data.stream=false with a memory budget that fits"
        )
    need = memory_need(estimate, settings, batch_size, eval_batch_size, prefetch)
    if need.total > budget:
        raise ContractError(
            f"data.memory_budget: streaming needs about {format_bytes(need.total)} and the "
            f"budget is {format_bytes(budget)} ({budget_from}): per reader "
            f"({max(settings.workers, 1)}, data.workers) one chunk in flight of up to "
            f"{estimate.max_chunk_entries:,} entries ({format_bytes(2 * estimate.chunk_bytes)} "
            f"with its copies), a shuffle buffer of {buffer_rows(settings, batch_size):,} rows "
            f"at {format_bytes(estimate.bytes_per_row)} per row "
            f"({format_bytes(need.buffers)} for all, with their copies) and the batches queued "
            f"({format_bytes(need.batches)}). Give data.memory_budget={int(need.total * 1.1)}, "
            "or lower data.shuffle_buffer or data.workers, or write smaller chunks (Parquet row "
            "groups, the ROOT source's step_size)"
        )
    log.info(
        f"data: streaming ({why}); the data in flight takes about {format_bytes(need.total)}: "
        f"{max(settings.workers, 1)} readers with a chunk of up to "
        f"{estimate.max_chunk_entries:,} entries and {buffer_rows(settings, batch_size):,} "
        "buffered rows each"
    )
    return True
