"""A multilayer perceptron on the flat (per-jet) features."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn
from torchvision.ops import MLP as TorchvisionMLP


class MLP(nn.Module):
    """Fully connected network on the flat features; jagged collections are ignored.

    Parameters
    ----------
    n_flat, n_fields, max_lengths, n_outputs
        Sizes from ``InputContract.model_dims()``.
    hidden
        Width of each hidden layer.
    dropout
        Dropout probability after each hidden layer.
    """

    def __init__(
        self,
        n_flat: int,
        n_fields: Sequence[int],
        max_lengths: Sequence[int],
        n_outputs: int,
        hidden: Sequence[int] = (128, 128, 64),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if n_flat < 1:
            raise ValueError("MLP needs flat features: the contract declares none")
        self.body = TorchvisionMLP(
            n_flat,
            list(hidden),
            norm_layer=nn.LayerNorm,
            activation_layer=nn.GELU,
            dropout=dropout,
        )
        self.head = nn.Linear(hidden[-1], n_outputs)

    def forward(self, flat: Tensor, jagged: list[Tensor], masks: list[Tensor]) -> Tensor:
        """Logits ``(batch, n_outputs)`` from ``flat`` ``(batch, n_flat)``."""
        return self.head(self.body(flat))
