"""The deployable model: SoA assembler, network and output heads, as one ``nn.Module``.

Training runs ``DeployableModel.forward`` on every batch (raw columns to the head's values)
and the deploy graph wraps the same module with ``outputs``, so the trained weights, the
preprocessing constants and the output transformation travel together in one ``state_dict``.
It lives here, below the training and deploy stages, so that exporting needs neither
Lightning nor the training code.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from project.contract import InputContract
from project.soa.assembler import SoAAssembler


class DeployableModel(nn.Module):
    """Raw SoA columns in; the network's head out, and the named outputs in physical units.

    The head has ``contract.n_outputs`` values per row: first one logit per class, then one
    standardised value per regression target. ``outputs`` turns it into what the deployed
    graph returns: the class probabilities (softmax over the logits) and each target in its
    physical units (``value * scale + mean``, the constants fitted on the training split).
    """

    def __init__(self, contract: InputContract, net: nn.Module) -> None:
        super().__init__()
        self.assembler = SoAAssembler(contract)
        self.net = net
        self.n_classes = contract.n_classes
        targets = contract.regression
        self.n_targets = len(targets)
        self.register_buffer(
            "target_mean", torch.tensor([t.mean or 0.0 for t in targets], dtype=torch.float32)
        )
        self.register_buffer(
            "target_scale", torch.tensor([t.scale or 1.0 for t in targets], dtype=torch.float32)
        )

    def forward(self, inputs: list[Tensor]) -> Tensor:
        """The head ``(batch, n_outputs)`` from inputs in ``contract.input_names`` order."""
        flat, jagged, masks = self.assembler(inputs)
        return self.net(flat, jagged, masks)

    def outputs(self, head: Tensor) -> list[Tensor]:
        """The named outputs, each ``(batch,)``: class probabilities, then targets in physical
        units, in ``contract.outputs`` order."""
        out: list[Tensor] = []
        if self.n_classes:
            probs = head[:, : self.n_classes].float().softmax(dim=-1)
            out += list(probs.unbind(1))
        if self.n_targets:
            values = head[:, self.n_classes :].float() * self.target_scale + self.target_mean
            out += list(values.unbind(1))
        return out


def build_model(
    contract: InputContract, net: Mapping[str, Any], allowed: frozenset[str] | None = None
) -> DeployableModel:
    """The deployable model with the network built from its ``_target_`` config and the
    contract's sizes (``InputContract.model_dims``); ``allowed`` limits the targets that may
    be built (see ``project.utils.importing``)."""
    from project.utils.importing import build_from_config

    return DeployableModel(
        contract, build_from_config(net, allowed=allowed, **contract.model_dims())
    )
