"""The one pass over the data before streaming: count every chunk's rows, fit the constants.

A streamed epoch is planned from the number of rows each chunk holds in each split (after
the selection and the NaN policy), so that every DDP rank gets the same number of rows and
batches (``project.data.stream_loader``). Those numbers are known only once the chunks are
read, so the pass reads every chunk once, as one epoch would, holding one chunk at a time. It
also

- fits the standardisation (and every other fit handed to it, ``fits``) on the first
  ``data.fit_rows`` training rows met, the chunks taken in an order shuffled by the seed, so
  that the sample spans the files (all training rows by default);
- checks the labels, and that every file's stored columns have the same types;
- finds the files that cannot be read: an error naming the file and the entry range, or,
  with ``data.on_bad_file=skip``, the pass starts again without that file (a file that broke
  half-way must not leave its rows in the counts and the fit) and lists it.

The result is kept in ``stream_index.json`` in the run directory, keyed by the files (path,
size, modification time) and every setting it depends on: a resumed run reads it instead of
redoing the pass. Only rank zero writes it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from project.contract import ContractError, InputContract
from project.data.columnar import ColumnarData
from project.data.expressions import TableSpec, check_kept, describe
from project.data.fitting import LabelCheck, StandardizerFit
from project.data.reading import BadFileError, FileReader, all_skipped, skip_or_raise
from project.data.sources import Chunk, Source
from project.data.splitting import SPLITS, Splitting
from project.data.streaming import StreamSettings
from project.utils import atomic_write_text

log = logging.getLogger(__name__)

INDEX_FILE = "stream_index.json"
INDEX_VERSION = 1
_FIT_ORDER = 0x51F7  # SeedSequence key of the pass's chunk order, apart from the epochs'
_LOG_EVERY_S = 30.0


class Fit(Protocol):
    """Something fitted on training rows, part by part (``project.data.fitting``)."""

    def update(self, part: ColumnarData) -> None:
        """Add the rows of ``part``."""
        ...

    def result(self) -> Any:
        """What was fitted: an object with ``to_dict()`` (plain JSON-ready data)."""
        ...


@dataclass
class StreamIndex:
    """What the pass found.

    Attributes
    ----------
    chunks
        Every chunk of the files read, files in sorted order, then by entry.
    rows
        ``(n_chunks, 3)`` int64: each chunk's rows in the train, val and test splits.
    file_splits
        With ``split_by=file``, each file's split index.
    contract
        The contract with the constants fitted.
    fitted
        The results of the other fits, by name, in their plain-dict form.
    skipped
        Files left out (``on_bad_file=skip``) and why.
    fit_rows, dropped
        Training rows the fit saw; rows dropped for NaN or Inf values (``nan_policy=drop``).
    bytes_per_row, max_chunk_rows
        The table's bytes per row, and the most rows one chunk holds (all splits).
    source
        The files in messages.
    """

    chunks: list[Chunk]
    rows: np.ndarray
    file_splits: dict[str, int]
    contract: InputContract
    fitted: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    fit_rows: int = 0
    dropped: int = 0
    bytes_per_row: float = 0.0
    max_chunk_rows: int = 0
    source: str = ""

    def split_rows(self, split: str) -> np.ndarray:
        """Rows of ``split`` in each chunk, ``(n_chunks,)``."""
        return self.rows[:, SPLITS.index(split)]

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form for ``stream_index.json``."""
        return {
            "chunks": [asdict(c) for c in self.chunks],
            "rows": self.rows.tolist(),
            "file_splits": self.file_splits,
            "contract": self.contract.to_dict(),
            "fitted": self.fitted,
            "skipped": self.skipped,
            "fit_rows": self.fit_rows,
            "dropped": self.dropped,
            "bytes_per_row": self.bytes_per_row,
            "max_chunk_rows": self.max_chunk_rows,
            "source": self.source,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> StreamIndex:
        """Read the plain-dict form back."""
        return cls(
            chunks=[Chunk(**c) for c in d["chunks"]],
            rows=np.asarray(d["rows"], dtype=np.int64).reshape(-1, len(SPLITS)),
            file_splits={k: int(v) for k, v in d["file_splits"].items()},
            contract=InputContract.from_dict(d["contract"]),
            fitted=dict(d["fitted"]),
            skipped=dict(d["skipped"]),
            fit_rows=int(d["fit_rows"]),
            dropped=int(d["dropped"]),
            bytes_per_row=float(d["bytes_per_row"]),
            max_chunk_rows=int(d["max_chunk_rows"]),
            source=str(d["source"]),
        )


def index_key(
    source: Source, spec: TableSpec, splitting: Splitting, settings: StreamSettings
) -> str:
    """A digest of everything the pass's result depends on: the files (path, size and
    modification time, where they are local files), the source, the table spec, the split and
    the fit's settings."""
    files = []
    for f in sorted(source.files()):
        try:
            stat = os.stat(f)
            files.append([f, stat.st_size, stat.st_mtime_ns])
        except OSError:  # a stream or a remote URL: its name stands for it
            files.append([f])
    what = {
        "version": INDEX_VERSION,
        "files": files,
        "source": repr(source),
        "contract": spec.contract.to_dict(),
        "weight": None if spec.weight is None else spec.weight.text,
        "nan_policy": spec.nan_policy,
        "ids": spec.ids,
        "splitting": asdict(splitting),
        "fit_rows": settings.fit_rows,
        "on_bad_file": settings.on_bad_file,
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def index_stream(
    source: Source,
    spec: TableSpec,
    contract: InputContract,
    splitting: Splitting,
    settings: StreamSettings,
    fits: Mapping[str, Fit] | None = None,
    is_rank_zero: bool = True,
) -> StreamIndex:
    """The pass's result: read from ``settings.cache_dir`` if it holds one for these files and
    settings, else computed (and written there by rank zero).

    ``fits`` are fitted on the training sample beside the standardisation; their results are
    ``StreamIndex.fitted[name]``. (A fit added here changes nothing else: its name is part of
    the cache key.)
    """
    fits = dict(fits or {})
    key = index_key(source, spec, splitting, settings) + ":" + ",".join(sorted(fits))
    path = Path(settings.cache_dir) / INDEX_FILE if settings.cache_dir else None
    if path is not None and path.is_file():
        try:
            cached = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            log.warning(f"{path} is unreadable ({err}); indexing the data again")
            cached = {}
        if cached.get("key") == key:
            log.info(f"data: the indexing pass's result is read from {path}")
            return StreamIndex.from_dict(cached["index"])
        log.info(f"data: {path} belongs to other files or settings; indexing the data again")
    skipped: dict[str, str] = {}
    while True:
        try:
            index = _index_once(source, spec, contract, splitting, settings, fits, skipped)
            break
        except BadFileError as err:
            skip_or_raise(err, settings.on_bad_file, skipped)
            log.warning("data: indexing again without that file")
    if path is not None and is_rank_zero:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps({"key": key, "index": index.to_dict()}) + "\n")
    return index


def _index_once(
    source: Source,
    spec: TableSpec,
    contract: InputContract,
    splitting: Splitting,
    settings: StreamSettings,
    fits: Mapping[str, Fit],
    skipped: dict[str, str],
) -> StreamIndex:
    """One pass over the files not in ``skipped``; a ``BadFileError`` stops it."""
    reader = FileReader(source, spec)
    files = [f for f in sorted(source.files()) if f not in skipped]
    chunks: list[Chunk] = []
    for file in files:
        try:
            chunks += reader.open(file)
        except BadFileError as err:
            skip_or_raise(err, settings.on_bad_file, skipped)
    files = [f for f in files if f not in skipped]
    if not files:
        raise all_skipped(skipped)
    name = describe([source.where(f) for f in files])
    file_splits = splitting.file_splits(files) if splitting.by == "file" else {}
    standardizer, labels = StandardizerFit(contract), LabelCheck(contract)
    # Labels of the validation and test rows are checked too; the class totals of training.
    other_labels = LabelCheck(contract)
    limit = settings.fit_rows
    fitted = 0
    rows = np.zeros((len(chunks), len(SPLITS)), dtype=np.int64)
    before = kept = dropped = table_bytes = largest = 0
    started = last_log = time.perf_counter()
    order = np.random.default_rng([splitting.seed, _FIT_ORDER]).permutation(len(chunks))
    for done, i in enumerate(order):
        chunk = chunks[i]
        part, n_before, _ = reader.read(chunk)
        split = splitting.row_splits(part, file_splits.get(chunk.file))
        rows[i] = np.bincount(split, minlength=len(SPLITS))
        before, kept, dropped = before + n_before, kept + len(part), dropped + part.dropped
        table_bytes += part.nbytes()
        largest = max(largest, len(part))
        train = part.take(np.flatnonzero(split == 0))
        labels.update(train)
        other_labels.update(part.take(np.flatnonzero(split != 0)))
        if limit is None or fitted < limit:
            sample = (
                train if limit is None else train.take(np.arange(min(len(train), limit - fitted)))
            )
            standardizer.update(sample)
            for fit in fits.values():
                fit.update(sample)
            fitted += len(sample)
        now = time.perf_counter()
        if now - last_log > _LOG_EVERY_S:
            last_log = now
            log.info(
                f"data: indexing, {done + 1} of {len(chunks)} chunks read, {kept:,} rows, "
                f"{now - started:.0f} s"
            )
    check_kept(before, kept, spec, name)
    labels.check(name)
    totals = rows.sum(axis=0)
    for k, split_name in enumerate(SPLITS):
        if totals[k] == 0:
            raise ContractError(
                f"{name}: the {split_name} split is empty ({kept} rows, split "
                f"{list(splitting.fractions)} by {splitting.describe()}); use more data or "
                "other fractions"
            )
    if dropped:
        log.warning(f"{name}: {dropped} rows with NaN or Inf values dropped (data.nan_policy=drop)")
    log.info(
        f"data: indexed {len(chunks)} chunks of {len(files)} files in "
        f"{time.perf_counter() - started:.0f} s: {totals[0]:,} training, {totals[1]:,} "
        f"validation and {totals[2]:,} test rows; constants fitted on {fitted:,} training rows"
        + (f"; {len(skipped)} files left out: {sorted(skipped)}" if skipped else "")
    )
    return StreamIndex(
        chunks=chunks,
        rows=rows,
        file_splits=file_splits,
        contract=standardizer.result(),
        fitted={k: fit.result().to_dict() for k, fit in fits.items()},
        skipped=dict(skipped),
        fit_rows=fitted,
        dropped=dropped,
        bytes_per_row=table_bytes / max(kept, 1),
        max_chunk_rows=largest,
        source=name,
    )
