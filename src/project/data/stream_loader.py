"""Streamed SoA batches: chunks read lazily, mixed in a shuffle buffer, one gather per batch.

An epoch of a split is planned from the indexing pass's row counts
(``project.data.stream_index``), identically on every rank:

1. the chunks holding rows of the split are put in an order shuffled by ``(seed, epoch)``
   (training; evaluation keeps the stored order), and their rows are seen as one sequence;
2. each rank takes a consecutive range of that sequence: for training ``n // world_size``
   rows each (the last ``n % world_size`` rows of the epoch's order are left out, as in
   ``EpochSampler``), so every rank runs the same number of batches and no row is seen twice;
   for evaluation all rows, in ranges that differ by at most one row;
3. the rank's range is cut into batches, and its DataLoader workers take consecutive runs of
   them; only the last batch of the last worker can be short.

A chunk at the boundary between two ranges is read by both, each keeping its own rows. Each
worker reads its chunks in turn and adds their rows of the split to a shuffle buffer; when
the buffer holds its share of ``data.shuffle_buffer`` rows, it is permuted (by
``(seed, epoch, rank, worker)``) and batches are taken from it until half of it is left. A
batch is formed by ``SoATensors.batch``, the in-memory path's gather: one index per batch,
nothing per row in Python. A worker therefore holds at most its share of the buffer plus one
batch plus one chunk.

Resuming mid-epoch starts the epoch again from its beginning (the rows of the interrupted
epoch seen before the interruption are seen again).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from project.contract import ContractError, InputContract
from project.data.batching import SoATensors, prefetched
from project.data.columnar import ColumnarData
from project.data.expressions import TableSpec
from project.data.reading import BadFileError, FileReader
from project.data.reweighting import Reweighting
from project.data.sources import Source
from project.data.splitting import SPLITS, Splitting
from project.data.stream_index import StreamIndex

_EPOCH_ORDER = 0xE90C  # SeedSequence key of the epochs' chunk order


@dataclass(frozen=True)
class Piece:
    """Rows ``lo:hi`` of one chunk's rows of a split (in stored order)."""

    chunk: int
    lo: int
    hi: int


def rank_range(n_rows: int, rank: int, world_size: int, shuffle: bool) -> tuple[int, int]:
    """The rows ``[lo, hi)`` of the epoch's sequence that ``rank`` takes (see the module
    docstring, step 2)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if shuffle:
        per_rank = n_rows // world_size
        return rank * per_rank, (rank + 1) * per_rank
    bounds = np.linspace(0, n_rows, world_size + 1).astype(np.int64)
    return int(bounds[rank]), int(bounds[rank + 1])


def pieces_of(counts: np.ndarray, order: np.ndarray, lo: int, hi: int) -> list[Piece]:
    """The pieces of chunks (taken in ``order``, ``counts[k]`` rows each) that make up rows
    ``[lo, hi)`` of their sequence."""
    ends = np.cumsum(counts[order])
    starts = ends - counts[order]
    out = []
    for k in np.flatnonzero((ends > lo) & (starts < hi)):
        out.append(
            Piece(
                int(order[k]),
                int(max(lo, starts[k]) - starts[k]),
                int(min(hi, ends[k]) - starts[k]),
            )
        )
    return out


class StreamDataset(IterableDataset):
    """The batches of one split for one rank, streamed (see the module docstring).

    Parameters
    ----------
    source, spec
        What to read, and the table spec the index was made with.
    index
        The indexing pass's result.
    split
        ``train``, ``val`` or ``test``.
    splitting
        The split assignment (the rows of ``split`` in each chunk).
    batch_size
        Rows per batch.
    shuffle
        Shuffle the chunk order per epoch and mix rows in the buffer (training).
    buffer_rows
        Each worker's share of the shuffle buffer (ignored without ``shuffle``).
    drop_last
        Leave out a short last batch.
    seed, rank, world_size, workers
        Seed of the orders, this rank, the number of ranks, DataLoader workers (0: none).
    reweighting
        The fitted reweighting, applied to the rows of the splits it names.
    fixed_size
        Form batches with the fixed-size gather of ``SoATensors.batch`` (``batch *
        max_length`` slots per field): every full batch has the same shapes, so that the
        training forward replays from CUDA graphs (``project.training.graphs``). For a GPU.
    """

    def __init__(
        self,
        source: Source,
        spec: TableSpec,
        index: StreamIndex,
        split: str,
        splitting: Splitting,
        batch_size: int,
        shuffle: bool,
        buffer_rows: int,
        drop_last: bool = False,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        workers: int = 0,
        reweighting: Reweighting | None = None,
        fixed_size: bool = False,
    ) -> None:
        super().__init__()
        self.fixed_size = fixed_size
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.source, self.spec, self.index = source, spec, index
        self.split, self.split_index, self.splitting = split, SPLITS.index(split), splitting
        self.contract: InputContract = index.contract
        self.batch_size, self.shuffle, self.drop_last = batch_size, shuffle, drop_last
        self.buffer_rows = max(int(buffer_rows), 1) if shuffle else 0
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.readers = max(workers, 1)
        applies = reweighting is not None and split in reweighting.config.splits
        self.reweighting = reweighting if applies else None
        self.counts = index.split_rows(split)
        self.n_rows = int(self.counts.sum())
        self.lo, self.hi = rank_range(self.n_rows, rank, world_size, shuffle)
        rows = self.hi - self.lo
        self.n_batches = rows // batch_size if drop_last else -(-rows // batch_size)
        if self.n_batches == 0 and shuffle:
            raise ContractError(
                f"{index.source}: the {split} split has {self.n_rows} rows, too few for "
                f"{world_size} ranks with batches of {batch_size}"
                + (" and drop_last" if drop_last else "")
            )
        self.epoch = 0
        # The most rows this process held at once (shuffle buffer and chunk), for the
        # memory test; with DataLoader workers it is counted in each worker's copy.
        self.peak_rows = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the order of ``epoch`` (Lightning calls this at every epoch's start)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n_batches

    def order(self) -> np.ndarray:
        """The chunks with rows of the split, in this epoch's order."""
        chunks = np.flatnonzero(self.counts > 0)
        if not self.shuffle:
            return chunks
        rng = np.random.default_rng([self.seed, _EPOCH_ORDER, self.epoch])
        return chunks[rng.permutation(len(chunks))]

    def plan(self, worker: int) -> tuple[list[Piece], list[int]]:
        """The pieces ``worker`` reads this epoch and the sizes of the batches it sends."""
        first = worker * self.n_batches // self.readers
        last = (worker + 1) * self.n_batches // self.readers
        rank_rows = self.hi - self.lo
        lo = self.lo + first * self.batch_size
        hi = self.lo + min(last * self.batch_size, rank_rows)
        sizes = [self.batch_size] * (last - first)
        if sizes and not self.drop_last:
            sizes[-1] = hi - lo - self.batch_size * (len(sizes) - 1)
        return pieces_of(self.counts, self.order(), lo, hi), sizes

    def __iter__(self) -> Iterator[dict[str, Tensor]] | Iterator[Packed]:
        info = get_worker_info()
        if info is None:
            return self._batches(0)
        if info.num_workers != self.readers:
            raise RuntimeError(f"planned for {self.readers} workers, running in {info.num_workers}")
        return map(pack, self._batches(info.id))

    def _read(self, reader: FileReader, piece: Piece) -> tuple[ColumnarData, int]:
        """The piece's rows, and the rows of its chunk that were read for them."""
        chunk = self.index.chunks[piece.chunk]
        try:
            part, _, _ = reader.read(chunk)
        except BadFileError as err:
            raise BadFileError(
                f"{err} (met while streaming the {self.split} split: the file read when the "
                "data was indexed has changed since; data.on_bad_file=skip leaves out only "
                "files found unreadable before training)",
                chunk.file,
            ) from err
        split = self.splitting.row_splits(part, self.index.file_splits.get(chunk.file))
        rows = np.flatnonzero(split == self.split_index)
        if len(rows) != self.counts[piece.chunk]:
            raise ContractError(
                f"{chunk.describe()} now has {len(rows)} rows of the {self.split} split, but "
                f"{self.counts[piece.chunk]} when the data was indexed: the file changed. "
                "Start a new run (or delete the run's stream_index.json)"
            )
        piece_rows = part.take(rows[piece.lo : piece.hi])
        if self.reweighting is not None:
            piece_rows = self.reweighting.apply(piece_rows)
        return piece_rows, len(part)

    def _batches(self, worker: int) -> Iterator[dict[str, Tensor]]:
        pieces, sizes = self.plan(worker)
        pending = deque(sizes)
        rng = np.random.default_rng([self.seed, _EPOCH_ORDER, self.epoch, self.rank, worker])
        reader = FileReader(self.source, self.spec)
        buffer: ColumnarData | None = None

        def emit(keep: int) -> Iterator[dict[str, Tensor]]:
            """Batches from the buffer until fewer than ``keep`` rows (plus a batch) are left."""
            nonlocal buffer
            if buffer is None or not pending or len(buffer) - pending[0] < keep:
                return
            n = len(buffer)
            order = rng.permutation(n) if self.shuffle else np.arange(n)
            tensors = SoATensors(buffer, self.contract)
            taken = 0
            while pending and n - taken - pending[0] >= keep:
                size = pending.popleft()
                rows = torch.from_numpy(order[taken : taken + size])
                yield tensors.batch(rows, fixed_size=self.fixed_size)
                taken += size
            buffer = buffer.take(order[taken:])

        for piece in pieces:
            part, read_rows = self._read(reader, piece)
            held = (0 if buffer is None else len(buffer)) + read_rows
            self.peak_rows = max(self.peak_rows, held)
            buffer = part if buffer is None else ColumnarData.concatenate([buffer, part])
            if self.shuffle and len(buffer) >= self.buffer_rows:
                yield from emit(keep=self.buffer_rows // 2)
            elif not self.shuffle:
                yield from emit(keep=0)
        yield from emit(keep=0)
        if pending:
            raise ContractError(
                f"{self.index.source}: the {self.split} split ran out of rows with "
                f"{len(pending)} batches still planned: the files changed since the data was "
                "indexed; start a new run (or delete the run's stream_index.json)"
            )


# A batch as a DataLoader worker sends it: one flat buffer per dtype, and each tensor's name,
# buffer, offset and shape in it.
Packed = tuple[dict[str, Tensor], list[tuple[str, str, int, tuple[int, ...]]]]


def pack(batch: dict[str, Tensor]) -> Packed:
    """``batch`` as one buffer per dtype (see ``unpack``).

    A worker hands each tensor to the training process through shared memory of its own, at
    a cost per tensor: measured with 24 tensors of a 256-row toy-jets batch, 25 ms per batch
    through one worker against 3 ms formed in the process (2.9 ms for 2 tensors), on the
    2-core development machine under load. Packed, a batch is two tensors.
    """
    groups: dict[str, list[Tensor]] = {}
    sizes: dict[str, int] = {}
    layout = []
    for name, tensor in batch.items():
        key = str(tensor.dtype)
        layout.append((name, key, sizes.get(key, 0), tuple(tensor.shape)))
        groups.setdefault(key, []).append(tensor.reshape(-1))
        sizes[key] = sizes.get(key, 0) + tensor.numel()
    return {k: torch.cat(v) for k, v in groups.items()}, layout


def unpack(packed: Packed) -> dict[str, Tensor]:
    """The batch of ``pack``: views of its buffers, no copy."""
    buffers, layout = packed
    out = {}
    for name, key, offset, shape in layout:
        n = int(np.prod(shape, dtype=np.int64))
        out[name] = buffers[key][offset : offset + n].view(shape)
    return out


class StreamLoader:
    """An iterable of streamed SoA batches for Lightning (``len`` and ``sampler.set_epoch``,
    as ``SoABatchLoader``).

    With ``workers`` > 0 the batches are formed in that many DataLoader worker processes
    (started for each epoch, so that each sees the epoch's plan), ``prefetch`` batches ahead
    each. With 0 they are formed in the training process: ``prefetch`` batches ahead in a
    background thread, as the in-memory path does for a GPU, or (``prefetch=0``) when the
    training step asks. ``pin_memory`` pins each batch before it is handed over.
    """

    def __init__(
        self, dataset: StreamDataset, workers: int, pin_memory: bool = False, prefetch: int = 2
    ) -> None:
        self.stream, self.workers = dataset, workers
        self.pin_memory, self.prefetch = pin_memory, prefetch
        # Lightning calls ``sampler.set_epoch``; batches are formed here, not by a sampler.
        self.sampler = dataset
        self.batch_sampler = None

    def __len__(self) -> int:
        return len(self.stream)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        # Pinned here, in the training thread between steps: pinning calls into CUDA, and from
        # another thread (DataLoader's pin thread) it broke the capture of the CUDA graphs
        # (cudaErrorStreamCaptureInvalidated, the mlp on an H200 with 2 workers).
        if self.workers == 0 and not self.pin_memory:
            batches = iter(self.stream)
            yield from prefetched(batches, self.prefetch) if self.prefetch > 0 else batches
            return
        # Packed, a batch is two pins, not one per tensor (24 for the toy jets): the transformer
        # on an H200 streamed at 0.76 of its resident rows/s with a pin per tensor.
        if self.workers == 0:
            packed = map(pack, self.stream)
            packed = prefetched(packed, self.prefetch) if self.prefetch > 0 else packed
        else:
            packed = DataLoader(
                self.stream,
                batch_size=None,
                num_workers=self.workers,
                prefetch_factor=max(self.prefetch, 1),
            )
        for buffers, layout in packed:
            if self.pin_memory:
                buffers = {k: v.pin_memory() for k, v in buffers.items()}
            yield unpack((buffers, layout))


def read_head(
    source: Source,
    spec: TableSpec,
    index: StreamIndex,
    splitting: Splitting,
    split: str,
    n: int,
    reweighting: Reweighting | None = None,
) -> ColumnarData:
    """The first ``n`` rows of ``split`` in stored order (the chunks in the index's order),
    reweighted where ``reweighting`` applies to ``split``."""
    dataset = StreamDataset(
        source,
        spec,
        index,
        split,
        splitting,
        max(n, 1),
        shuffle=False,
        buffer_rows=0,
        reweighting=reweighting,
    )
    reader = FileReader(source, spec)
    parts, total = [], 0
    for k in np.flatnonzero(dataset.counts > 0):
        if total >= n:
            break
        part, _ = dataset._read(reader, Piece(int(k), 0, int(min(dataset.counts[k], n - total))))
        parts.append(part)
        total += len(part)
    data = ColumnarData.concatenate(parts)
    data.source = index.source
    return data
