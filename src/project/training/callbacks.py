"""Training callbacks of the template."""

from __future__ import annotations

import json
import time
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from project.utils import atomic_write_text, sha256_file


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


class HashedModelCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` that records each saved file's sha256 in ``sha256.json`` beside it.

    The export verifies the checkpoint it reads against this record, so a checkpoint that was
    modified or replaced after training is refused rather than silently deployed.
    """

    def _save_checkpoint(self, trainer: L.Trainer, filepath: str) -> None:
        super()._save_checkpoint(trainer, filepath)
        if trainer.is_global_zero:
            record = Path(filepath).parent / "sha256.json"
            hashes = json.loads(record.read_text()) if record.is_file() else {}
            hashes = {k: v for k, v in hashes.items() if (record.parent / k).is_file()}
            hashes[Path(filepath).name] = sha256_file(filepath)
            atomic_write_text(record, json.dumps(hashes, indent=2, sort_keys=True) + "\n")
