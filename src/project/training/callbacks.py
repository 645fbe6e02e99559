"""Training callbacks of the template."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from project.soa.checkpoint import HASH_RECORD
from project.utils import atomic_path, atomic_write_text, sha256_file


class EpochTimer(L.Callback):
    """Wall time of every training epoch (seconds), logged as ``time/epoch_s``; the list is
    kept in ``epoch_times`` for the run's ``metrics.json``."""

    def __init__(self) -> None:
        self.epoch_times: list[float] = []
        self._start = 0.0

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Start the clock."""
        self._start = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Stop the clock and log."""
        elapsed = time.perf_counter() - self._start
        self.epoch_times.append(elapsed)
        pl_module.log("time/epoch_s", elapsed, on_epoch=True, rank_zero_only=True)


class HashedCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, atomic, recording each file's sha256 in ``sha256.json``.

    Every checkpoint the trainer writes (the monitored best, ``last.ckpt``, SLURM's
    ``hpc_ckpt_<n>.ckpt``) goes through the trainer's ``CheckpointIO`` plugin, and only rank
    zero calls it. This one writes the file under a unique temporary name and renames it into
    place, so a killed run never leaves a half-written checkpoint, then records its hash;
    removing a checkpoint drops its entry. The export verifies the checkpoint it reads against
    this record, so a checkpoint modified or replaced after training is refused rather than
    silently deployed.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None
    ) -> None:
        """Write ``checkpoint`` to ``path`` atomically and record its hash."""
        path = Path(path)
        with atomic_path(path) as tmp:
            super().save_checkpoint(checkpoint, tmp, storage_options)
        self._update(path.parent, {path.name: sha256_file(path)})

    def remove_checkpoint(self, path: str | Path) -> None:
        """Remove the checkpoint and its hash entry."""
        super().remove_checkpoint(path)
        self._update(Path(path).parent, {})

    def _update(self, directory: Path, new: dict[str, str]) -> None:
        record = directory / HASH_RECORD
        hashes = json.loads(record.read_text()) if record.is_file() else {}
        hashes = {k: v for k, v in hashes.items() if (directory / k).is_file()} | new
        atomic_write_text(record, json.dumps(hashes, indent=2, sort_keys=True) + "\n")


class RandomState(L.Callback):
    """Saves the random generators' states in every checkpoint and restores them on resume.

    A resumed run then draws the same dropout masks (and anything else random) as an
    uninterrupted run of the same seed: its weights and metrics come out bitwise equal on the
    CPU. The epoch's row order needs nothing here, it is a function of seed and epoch
    (``project.data.batching.EpochSampler``). Lightning has no public API that saves these
    states with a checkpoint, hence this callback.

    The states are those of torch's CPU generator, the current CUDA device's generator (where
    CUDA is in use), numpy's global generator and Python's ``random``, taken when the
    checkpoint is written (after the epoch's validation) and set again when training starts,
    after the sanity check. Under DDP the checkpoint holds global rank zero's states, which
    every rank restores.
    """

    def __init__(self) -> None:
        self._restored: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """The current states, as tensors, lists and numbers (they load with
        ``torch.load(weights_only=True)``)."""
        # numpy's global generator (what seed_everything seeds and legacy code draws from).
        kind, keys, pos, has_gauss, cached = np.random.get_state()  # noqa: NPY002
        state: dict[str, Any] = {
            "torch": torch.get_rng_state(),
            "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
            "python": random.getstate(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Keep the checkpoint's states until training starts."""
        self._restored = dict(state_dict)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Set the checkpoint's states (nothing to do in a run that did not resume)."""
        state, self._restored = self._restored, None
        if state is None:
            if trainer.ckpt_path:
                rank_zero_warn(
                    f"{trainer.ckpt_path} holds no random generator states (written by an older "
                    "version): the resumed run will not repeat an uninterrupted one exactly"
                )
            return
        torch.set_rng_state(state["torch"])
        kind, keys, pos, has_gauss, cached = state["numpy"]
        numpy_state = (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached)
        np.random.set_state(numpy_state)  # noqa: NPY002
        random.setstate(state["python"])
        if "cuda" in state and pl_module.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda"], pl_module.device)
