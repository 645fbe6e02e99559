"""Callbacks that interrupt a training run at a chosen point, for the reliability tests.

The CLI tests add them with ``+callbacks.<name>._target_=tests.run_control.<Class>`` and the
repository root on ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import lightning as L


class KillAtEpochStart(L.Callback):
    """SIGKILL the training process when epoch ``epoch`` (0-based) starts: the checkpoints of
    the epochs before it are on disk, nothing of this epoch is."""

    def __init__(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Kill this process at the chosen epoch."""
        if trainer.current_epoch == self.epoch:
            sys.stdout.flush()
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)


class HoldAtTrainStart(L.Callback):
    """At the start of training, create the file ``started`` and wait until the file
    ``release`` exists (at most ``timeout`` seconds): the run holds its run directory while a
    test starts another run."""

    def __init__(self, started: str, release: str, timeout: float = 180.0) -> None:
        self.started, self.release, self.timeout = Path(started), Path(release), float(timeout)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Signal, then wait for the release file."""
        self.started.touch()
        deadline = time.monotonic() + self.timeout
        while not self.release.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.release} did not appear within {self.timeout} s")
            time.sleep(0.05)
