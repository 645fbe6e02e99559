"""SoA batches without per-sample ``__getitem__`` or collate.

A batch is a dict of tensors keyed by the deployed graph's input names (see
``InputContract.input_names``) plus what the loss needs (``TRUTH_KEYS``): flat columns sliced
with one index per batch,
and per jagged collection its batch-local ``offsets`` and the batch's objects gathered from the
flat field arrays with one vectorised index (only the first ``max_length`` objects of each row,
the ones the assembler keeps). The training step therefore sees exactly what a deployed model
sees, and moving a batch to a GPU moves only the batch.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator, Mapping
from queue import Empty, Queue
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from project.contract import InputContract
from project.data.columnar import ColumnarData
from project.utils.profiling import marked

# Batch keys beside the graph's inputs: class indices ``(batch,)`` int64, event weights
# ``(batch,)`` float32 (absent when unweighted) and regression targets ``(batch, n_targets)``
# float32 in physical units, in contract order.
LABEL, WEIGHT, TARGETS = "label", "weight", "targets"
TRUTH_KEYS = (LABEL, WEIGHT, TARGETS)
T = TypeVar("T")


class SoATensors:
    """One split as torch tensors, sharing memory with the numpy arrays it came from.

    On the CPU a batch's objects are gathered compactly (``n_total`` objects, exactly the
    deployed graph's input). When the split lives on a GPU (``to(device)``) the gather has a
    fixed size of ``batch * max_length`` slots per field, so forming a batch needs no host
    synchronisation; the slots past ``offsets[-1]`` belong to no row, and the assembler never
    reads them. Both forms assemble to identical padded tensors.
    """

    def __init__(self, data: ColumnarData, contract: InputContract) -> None:
        self.contract = contract
        self.n_rows = len(data)
        self.flat = {k: torch.from_numpy(data.flat[k]) for k in contract.flat_names}
        self.offsets = {
            c.name: torch.from_numpy(data.jagged[c.name].offsets) for c in contract.jagged
        }
        self.fields = {
            c.name: [torch.from_numpy(data.jagged[c.name].fields[f.name]) for f in c.fields]
            for c in contract.jagged
        }
        self.labels = None if data.labels is None else torch.from_numpy(data.labels)
        self.weights = None if data.weights is None else torch.from_numpy(data.weights)
        self.targets = None
        if contract.regression:
            columns = [data.targets[t.name] for t in contract.regression]
            self.targets = torch.from_numpy(np.stack(columns, axis=1).astype(np.float32))
        # Set by ``to(..., resident=True)``: the flat columns as one (n_rows, n_flat) matrix
        # and each collection's fields as one (n_objects, n_fields) matrix.
        self.resident = False
        self._flat_matrix: Tensor | None = None
        self._field_matrices: dict[str, Tensor] = {}

    @property
    def device(self) -> torch.device:
        """Where the columns live."""
        return next(iter(self.flat.values() or self.offsets.values())).device

    def nbytes(self) -> int:
        """Memory the columns occupy."""
        tensors = [*self.flat.values(), *self.offsets.values()]
        tensors += [t for fields in self.fields.values() for t in fields]
        tensors += [t for t in (self.labels, self.weights, self.targets) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def to(self, device: torch.device | str, resident: bool | None = None) -> SoATensors:
        """Move every column to ``device`` (in place) and return ``self``.

        ``resident`` (default: on accelerators) selects the device-resident layout: the flat
        columns stored as one matrix and each collection's fields as another, the columns
        becoming views of them, so that forming a batch takes one gather per matrix instead
        of one per column (on a GPU, where a small model's step costs little more than its
        kernel launches, a dozen launches fewer per step), and the fixed-size gather of
        ``batch``. The assembled batches are the same either way.
        """
        device = torch.device(device)
        stack = self.resident = device.type != "cpu" if resident is None else bool(resident)
        self.flat, self._flat_matrix = _placed(self.flat, device, stack)
        self.offsets = {k: v.to(device) for k, v in self.offsets.items()}
        self._field_matrices = {}
        for name, fields in self.fields.items():
            named = dict(enumerate(fields))
            placed, matrix = _placed(named, device, stack)
            self.fields[name] = list(placed.values())
            if matrix is not None:
                self._field_matrices[name] = matrix
        self.labels = None if self.labels is None else self.labels.to(device)
        self.weights = None if self.weights is None else self.weights.to(device)
        self.targets = None if self.targets is None else self.targets.to(device)
        return self

    def batch(self, rows: Tensor, fixed_size: bool | None = None) -> dict[str, Tensor]:
        """The SoA batch of ``rows`` (an int64 index tensor on the columns' device).

        ``fixed_size`` selects the synchronisation-free gather described in the class
        docstring; by default it is used in the device-resident layout (see ``to``).
        """
        with marked("soa.gather"):
            return self._gather(rows, fixed_size)

    def _gather(self, rows: Tensor, fixed_size: bool | None) -> dict[str, Tensor]:
        rows = rows.to(self.device)
        if fixed_size is None:
            fixed_size = self.resident
        if self._flat_matrix is not None:
            out = dict(zip(self.flat, self._flat_matrix[rows].unbind(1), strict=True))
        else:
            out = {name: col[rows] for name, col in self.flat.items()}
        for coll in self.contract.jagged:
            offsets = self.offsets[coll.name]
            starts = offsets[:-1][rows]
            counts = (offsets[1:][rows] - starts).clamp_max(coll.max_length)
            local = torch.zeros(len(rows) + 1, dtype=torch.int64, device=rows.device)
            torch.cumsum(counts, 0, out=local[1:])
            if fixed_size:
                objects = _fixed_size_objects(starts, local, coll.max_length)
            else:
                objects = torch.repeat_interleave(starts - local[:-1], counts) + torch.arange(
                    int(local[-1]), dtype=torch.int64
                )
            out[coll.offsets_name] = local
            matrix = self._field_matrices.get(coll.name)
            if matrix is not None and matrix.shape[0]:
                taken = matrix[objects.clamp_max(matrix.shape[0] - 1)].unbind(1)
                for feat, column in zip(coll.fields, taken, strict=True):
                    out[coll.field_input_name(feat.name)] = column
                continue
            for feat, values in zip(coll.fields, self.fields[coll.name], strict=True):
                if values.numel() == 0:  # no objects anywhere: nothing to gather from
                    out[coll.field_input_name(feat.name)] = values.new_zeros(objects.shape)
                else:
                    out[coll.field_input_name(feat.name)] = values[
                        objects.clamp_max(values.numel() - 1)
                    ]
        if self.labels is not None:
            out[LABEL] = self.labels[rows]
        if self.weights is not None:
            out[WEIGHT] = self.weights[rows]
        if self.targets is not None:
            out[TARGETS] = self.targets[rows]
        return out


def _placed(columns: dict, device: torch.device, stack: bool) -> tuple[dict, Tensor | None]:
    """``columns`` on ``device``; with ``stack`` (and one dtype among them) as views of one
    ``(n, n_columns)`` matrix, which is returned too."""
    tensors = list(columns.values())
    if not stack or len(tensors) < 2 or len({t.dtype for t in tensors}) != 1:
        return {k: v.to(device) for k, v in columns.items()}, None
    # Stacked where the columns are (host memory, usually), then moved: the device holds
    # the matrix only, never the columns beside it.
    matrix = torch.stack(tensors, dim=1).to(device)
    return {k: matrix[:, i] for i, k in enumerate(columns)}, matrix


def _fixed_size_objects(starts: Tensor, local: Tensor, max_length: int) -> Tensor:
    """Source object index for each of ``batch * max_length`` slots, by searchsorted (no
    host sync). Slot ``j`` belongs to the row whose local range contains it."""
    slots = torch.arange(len(starts) * max_length, device=starts.device, dtype=torch.int64)
    row = torch.searchsorted(local[1:], slots, right=True).clamp_max(len(starts) - 1)
    return starts[row] + (slots - local[row])


class EpochSampler:
    """Row order for one rank in one epoch: shuffled by ``seed + epoch`` or sequential.

    Training shards take the same number of rows on every rank (the permutation is cut to a
    multiple of ``world_size``), so all ranks run the same number of steps and no row appears
    twice in an epoch. Evaluation shards split all rows contiguously (sizes differ by at most one).
    Lightning calls ``set_epoch`` at the start of every epoch.
    """

    def __init__(
        self, n_rows: int, shuffle: bool, seed: int, rank: int = 0, world_size: int = 1
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        self.n_rows, self.shuffle, self.seed = n_rows, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of ``epoch``."""
        self.epoch = epoch

    def _eval_bounds(self) -> tuple[int, int]:
        bounds = np.linspace(0, self.n_rows, self.world_size + 1).astype(np.int64)
        return int(bounds[self.rank]), int(bounds[self.rank + 1])

    def __len__(self) -> int:
        if self.shuffle:
            return self.n_rows // self.world_size
        lo, hi = self._eval_bounds()
        return hi - lo

    def rows(self) -> Tensor:
        """This rank's rows for the current epoch, int64."""
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.n_rows, generator=gen)
            per_rank = len(self)
            return order[self.rank * per_rank : (self.rank + 1) * per_rank]
        return torch.arange(*self._eval_bounds(), dtype=torch.int64)


class ResidentBatch(Mapping[str, Tensor]):
    """The SoA batch of ``rows`` of a split on the training device, gathered when first read.

    It reads as the dict ``tensors.batch(rows)``. A consumer that captures the training step
    in a CUDA graph (``project.training``) takes ``tensors`` and ``rows`` instead, and runs
    the gather inside the graph: the batch's only input is then its row indices.
    """

    __slots__ = ("_batch", "rows", "tensors")

    def __init__(self, tensors: SoATensors, rows: Tensor) -> None:
        self.tensors, self.rows = tensors, rows
        self._batch: dict[str, Tensor] | None = None

    def gather(self) -> dict[str, Tensor]:
        """The batch's tensors (gathered once)."""
        if self._batch is None:
            self._batch = self.tensors.batch(self.rows)
        return self._batch

    def __getitem__(self, key: str) -> Tensor:
        return self.gather()[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.gather())

    def __len__(self) -> int:
        return len(self.gather())


class SoABatchLoader:
    """An iterable of SoA batches for Lightning (``len`` and ``sampler.set_epoch`` supported).

    With the columns on the training device, an epoch's row order is copied there once and
    every batch is sliced on the device (a ``ResidentBatch``). With host columns, ``prefetch``
    batches are formed ahead in a background thread (torch releases the GIL in the gathers)
    and pinned when ``pin_memory`` is set, so the copy to a GPU can overlap the previous step.
    """

    def __init__(
        self,
        tensors: SoATensors,
        batch_size: int,
        sampler: EpochSampler,
        drop_last: bool = False,
        pin_memory: bool = False,
        prefetch: int = 0,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tensors, self.batch_size, self.sampler = tensors, batch_size, sampler
        self.drop_last, self.pin_memory, self.prefetch = drop_last, pin_memory, prefetch
        # Lightning inspects DataLoader-like attributes; batches are formed here, not by a
        # torch batch sampler.
        self.batch_sampler = None

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _batches(self) -> Iterator[Mapping[str, Tensor]]:
        rows = self.sampler.rows().to(self.tensors.device)
        on_host = self.tensors.device.type == "cpu"
        for i in range(len(self)):
            chosen = rows[i * self.batch_size : (i + 1) * self.batch_size]
            if not on_host:
                yield ResidentBatch(self.tensors, chosen)
                continue
            batch = self.tensors.batch(chosen)
            if self.pin_memory:
                batch = {k: v.pin_memory() for k, v in batch.items()}
            yield batch

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        if self.prefetch <= 0 or self.tensors.device.type != "cpu":
            yield from self._batches()
            return
        yield from prefetched(self._batches(), self.prefetch)


class GroupedBatches:
    """The batches of ``loader`` handed over ``steps`` at a time, as lists (the epoch's last
    list may be shorter), for a training step that takes several optimiser steps.

    ``len`` counts lists; the wrapped loader's ``sampler`` (and its ``set_epoch``) is exposed
    as Lightning expects of a loader.
    """

    def __init__(self, loader: Any, steps: int) -> None:
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        self.loader, self.steps = loader, steps
        self.sampler = getattr(loader, "sampler", None)
        self.batch_sampler = None

    def __len__(self) -> int:
        return -(-len(self.loader) // self.steps)

    def __iter__(self) -> Iterator[list[Any]]:
        batches = iter(self.loader)
        while group := list(itertools.islice(batches, self.steps)):
            yield group


def prefetched(batches: Iterator[T], depth: int) -> Iterator[T]:
    """Run ``batches`` in a daemon thread, ``depth`` items ahead; errors are re-raised here."""
    done = object()
    queue: Queue = Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for batch in batches:
                if stop.is_set():
                    return
                queue.put(batch)
            queue.put(done)
        except BaseException as err:  # handed to the consumer
            queue.put(err)

    thread = threading.Thread(target=produce, daemon=True, name="soa-prefetch")
    thread.start()
    try:
        while (item := queue.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                queue.get_nowait()
            except Empty:
                thread.join(timeout=0.01)
