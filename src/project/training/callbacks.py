"""Training callbacks of the template."""

from __future__ import annotations

import time

import lightning as L


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
