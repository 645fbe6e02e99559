"""A Particle Flow Network (Deep Sets) over one jagged collection."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn
from torchvision.ops import MLP as TorchvisionMLP


class DeepSets(nn.Module):
    """Energy-flow style network: ``F(sum_i phi(p_i), flat)``, permutation invariant.

    Each object goes through ``phi``; the masked sum over objects (padding contributes exactly
    zero) is concatenated with the flat features and classified by ``F``.

    Parameters
    ----------
    n_flat, n_fields, max_lengths, n_outputs
        Sizes from ``InputContract.model_dims()``.
    collection
        Index of the jagged collection to use.
    phi_hidden, f_hidden
        Layer widths of the per-object and the event-level networks.
    use_flat
        Concatenate the flat features to the pooled latent space.
    dropout
        Dropout in the event-level network.
    """

    def __init__(
        self,
        n_flat: int,
        n_fields: Sequence[int],
        max_lengths: Sequence[int],
        n_outputs: int,
        collection: int = 0,
        phi_hidden: Sequence[int] = (64, 64, 64),
        f_hidden: Sequence[int] = (64, 64),
        use_flat: bool = True,
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if len(n_fields) <= collection:
            raise ValueError(
                f"DeepSets uses jagged collection {collection}, the contract has {len(n_fields)}"
            )
        self.collection = collection
        self.use_flat = use_flat and n_flat > 0
        self.phi = TorchvisionMLP(n_fields[collection], list(phi_hidden), activation_layer=nn.GELU)
        f_in = phi_hidden[-1] + (n_flat if self.use_flat else 0)
        self.f = TorchvisionMLP(f_in, list(f_hidden), activation_layer=nn.GELU, dropout=dropout)
        self.head = nn.Linear(f_hidden[-1], n_outputs)

    def forward(self, flat: Tensor, jagged: list[Tensor], masks: list[Tensor]) -> Tensor:
        """Logits ``(batch, n_outputs)``."""
        objects = jagged[self.collection]  # (batch, n_max, n_fields)
        mask = masks[self.collection].unsqueeze(-1).to(objects.dtype)
        pooled = (self.phi(objects) * mask).sum(dim=1)  # (batch, latent)
        if self.use_flat:
            pooled = torch.cat([pooled, flat], dim=-1)
        return self.head(self.f(pooled))
