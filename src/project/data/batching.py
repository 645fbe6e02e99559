"""SoA batches without per-sample ``__getitem__`` or collate.

A batch is a dict of tensors keyed by the deployed graph's input names (see
``InputContract.input_names``) plus ``"label"``: flat columns sliced with one index per batch,
and per jagged collection its batch-local ``offsets`` and the batch's objects gathered from the
flat field arrays with one vectorised index (only the first ``max_length`` objects of each row,
the ones the assembler keeps). The training step therefore sees exactly what a deployed model
sees, and moving a batch to a GPU moves only the batch.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from project.data.columnar import ColumnarData
from project.data.contract import InputContract


class SoATensors:
    """One split as torch tensors, sharing memory with the numpy arrays it came from."""

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

    def batch(self, rows: Tensor) -> dict[str, Tensor]:
        """The SoA batch of ``rows`` (an int64 index tensor)."""
        out = {name: col[rows] for name, col in self.flat.items()}
        for coll in self.contract.jagged:
            offsets = self.offsets[coll.name]
            starts = offsets[:-1][rows]
            counts = (offsets[1:][rows] - starts).clamp_max(coll.max_length)
            local = torch.zeros(len(rows) + 1, dtype=torch.int64)
            torch.cumsum(counts, 0, out=local[1:])
            objects = torch.repeat_interleave(starts - local[:-1], counts) + torch.arange(
                int(local[-1]), dtype=torch.int64
            )
            out[coll.offsets_name] = local
            for feat, values in zip(coll.fields, self.fields[coll.name], strict=True):
                out[coll.field_input_name(feat.name)] = values[objects]
        if self.labels is not None:
            out["label"] = self.labels[rows]
        return out


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


class SoABatchLoader:
    """An iterable of SoA batches for Lightning (``len`` and ``sampler.set_epoch`` supported)."""

    def __init__(
        self,
        tensors: SoATensors,
        batch_size: int,
        sampler: EpochSampler,
        drop_last: bool = False,
        pin_memory: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tensors, self.batch_size, self.sampler = tensors, batch_size, sampler
        self.drop_last, self.pin_memory = drop_last, pin_memory
        # Lightning inspects DataLoader-like attributes; batches are formed here, not by a
        # torch batch sampler.
        self.batch_sampler = None

    def __len__(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[dict[str, Tensor]]:
        rows = self.sampler.rows()
        for i in range(len(self)):
            batch = self.tensors.batch(rows[i * self.batch_size : (i + 1) * self.batch_size])
            if self.pin_memory:
                batch = {k: v.pin_memory() for k, v in batch.items()}
            yield batch
