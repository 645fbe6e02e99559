"""The deploy graph: raw SoA columns in, class probabilities out, one tensor per output name."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from project.data.contract import InputContract
from project.training.module import DeployableClassifier, build_classifier
from project.utils import sha256_file


class DeployGraph(nn.Module):
    """Assembler, standardisation, network and softmax, with the contract's input signature.

    ``forward(*inputs)`` takes the inputs positionally in ``contract.input_names`` order (flat
    columns ``(batch,)``; per collection ``offsets`` ``(batch + 1,)`` int64 and fields
    ``(n_total,)``) and returns one ``(batch,)`` probability tensor per ``contract.outputs``.
    """

    def __init__(self, classifier: DeployableClassifier, contract: InputContract) -> None:
        super().__init__()
        self.classifier = classifier
        self.n_outputs = contract.n_classes

    def forward(self, *inputs: Tensor) -> tuple[Tensor, ...]:
        """Probabilities per class, each ``(batch,)``."""
        probs = self.classifier(list(inputs)).softmax(dim=-1)
        return tuple(probs[:, i] for i in range(self.n_outputs))


class CheckpointError(ValueError):
    """A checkpoint that cannot be exported (missing, tampered, of another model)."""


@dataclass
class LoadedCheckpoint:
    """A checkpoint's deploy graph and what describes it."""

    graph: DeployGraph
    contract: InputContract
    net_config: dict[str, Any]
    path: Path
    sha256: str


def load_checkpoint(path: str | Path, expected_sha256: str | None = None) -> LoadedCheckpoint:
    """Rebuild the deploy graph from a training checkpoint, loaded with ``weights_only=True``.

    Parameters
    ----------
    path
        A ``.ckpt`` written by the training run.
    expected_sha256
        The hash recorded when the checkpoint was saved; a mismatch means the file changed
        since and raises ``CheckpointError``.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    digest = sha256_file(path)
    if expected_sha256 is not None and digest != expected_sha256:
        raise CheckpointError(
            f"checkpoint {path} has sha256 {digest}, but the run recorded {expected_sha256} when "
            "it was saved: the file was modified or replaced. Export another checkpoint or retrain."
        )
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"cannot load checkpoint {path} with weights_only=True: {err}"
        ) from err
    hparams = ckpt.get("hyper_parameters") or {}
    if "contract" not in hparams or "net" not in hparams:
        raise CheckpointError(
            f"checkpoint {path} has no contract/net hyperparameters: it was not written by "
            "project.training.module.ClassifierModule"
        )
    contract = InputContract.from_dict(hparams["contract"])
    classifier = build_classifier(contract, hparams["net"])
    prefix = "model."
    state = {k[len(prefix) :]: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    missing, unexpected = classifier.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not match the network {hparams['net'].get('_target_')}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    graph = DeployGraph(classifier.eval(), contract).eval()
    return LoadedCheckpoint(graph, contract, dict(hparams["net"]), path, digest)
