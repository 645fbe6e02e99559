"""Training checkpoints as files that are handed around: their hash record and a safe read.

A training run records each checkpoint's sha256 in ``sha256.json`` beside it as it writes it
(``project.training.callbacks.HashedCheckpointIO``). The export and a resumed run both read a
checkpoint through ``read_checkpoint``: the hash checked against that record, the file loaded
with ``torch.load(weights_only=True)`` (no pickled code runs), and its model hyperparameters
checked for shape. What may then be built from them is ``project.utils.importing``'s rule.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from project.utils import sha256_file

HASH_RECORD = "sha256.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, changed since it was saved, unreadable, or
    not written by a training run of this project)."""


def recorded_sha256(path: str | Path) -> str | None:
    """The hash the training run recorded for the checkpoint at ``path``, or ``None``."""
    path = Path(path)
    record = path.parent / HASH_RECORD
    return json.loads(record.read_text()).get(path.name) if record.is_file() else None


def read_checkpoint(path: str | Path, expected_sha256: str | None = None) -> tuple[dict, str]:
    """The checkpoint at ``path`` and its sha256, after the checks of the module docstring.

    Parameters
    ----------
    path
        A ``.ckpt`` written by a training run.
    expected_sha256
        The hash recorded when it was saved (``recorded_sha256``); a mismatch means the file
        changed since.

    Raises
    ------
    CheckpointError
        Naming the file and what is wrong with it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    digest = sha256_file(path)
    if expected_sha256 is not None and digest != expected_sha256:
        raise CheckpointError(
            f"checkpoint {path} has sha256 {digest}, but its run recorded {expected_sha256} "
            "when it was saved: the file was modified or replaced"
        )
    try:
        checkpoint: Any = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"cannot load checkpoint {path} with weights_only=True: {err}"
        ) from err
    hparams = checkpoint.get("hyper_parameters") if isinstance(checkpoint, dict) else None
    if not isinstance(hparams, dict) or not all(
        isinstance(hparams.get(k), dict) for k in ("net", "contract")
    ):
        raise CheckpointError(
            f"checkpoint {path} has no model hyperparameters (net, contract): it was not "
            "written by a training run of this project"
        )
    return checkpoint, digest
