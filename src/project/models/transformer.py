"""A Particle-Transformer-style encoder with masked attention and a class token."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class _Block(nn.Module):
    """Pre-norm transformer block; attention written with ``scaled_dot_product_attention`` so
    it exports cleanly (``nn.TransformerEncoderLayer``'s nested-tensor fast path does not)."""

    def __init__(self, dim: int, heads: int, expansion: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(
            nn.Linear(dim, expansion * dim), nn.GELU(), nn.Linear(expansion * dim, dim)
        )
        self.dropout = nn.Dropout(dropout)
        self.attn_dropout = dropout

    def forward(self, x: Tensor, key_mask: Tensor) -> Tensor:
        """``x`` ``(batch, seq, dim)``; ``key_mask`` ``(batch, seq)``, True where attendable."""
        b, s, d = x.shape
        qkv = self.qkv(self.norm1(x)).reshape(b, s, 3, self.heads, d // self.heads)
        # unbind, not tuple unpacking: iterating over a tensor is not traceable.
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        attn_mask = key_mask[:, None, None, :]  # broadcast over heads and queries
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=self.attn_dropout if self.training else 0.0
        )
        x = x + self.dropout(self.proj(out.transpose(1, 2).reshape(b, s, d)))
        return x + self.dropout(self.ff(self.norm2(x)))


class ParticleTransformer(nn.Module):
    """Transformer encoder over one jagged collection, read out through a class token.

    The class token is always attendable, so a row with no objects still has a valid
    attention target; padded objects are never attended to, so padding does not change
    the output.

    Parameters
    ----------
    n_flat, n_fields, max_lengths, n_outputs
        Sizes from ``InputContract.model_dims()``.
    collection
        Index of the jagged collection to use.
    dim, heads, layers, expansion
        Width, attention heads, number of blocks, feed-forward expansion factor.
    use_flat
        Concatenate the flat features to the class token before the head.
    dropout
        Dropout in the blocks.
    """

    def __init__(
        self,
        n_flat: int,
        n_fields: Sequence[int],
        max_lengths: Sequence[int],
        n_outputs: int,
        collection: int = 0,
        dim: int = 64,
        heads: int = 4,
        layers: int = 3,
        expansion: int = 2,
        use_flat: bool = True,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if len(n_fields) <= collection:
            raise ValueError(
                f"ParticleTransformer uses jagged collection {collection}, "
                f"the contract has {len(n_fields)}"
            )
        if dim % heads:
            raise ValueError(f"dim={dim} must be divisible by heads={heads}")
        self.collection = collection
        self.use_flat = use_flat and n_flat > 0
        self.embed = nn.Sequential(
            nn.Linear(n_fields[collection], dim), nn.GELU(), nn.Linear(dim, dim)
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.blocks = nn.ModuleList(_Block(dim, heads, expansion, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        head_in = dim + (n_flat if self.use_flat else 0)
        self.head = nn.Sequential(nn.Linear(head_in, dim), nn.GELU(), nn.Linear(dim, n_outputs))

    def forward(self, flat: Tensor, jagged: list[Tensor], masks: list[Tensor]) -> Tensor:
        """Logits ``(batch, n_outputs)``."""
        objects = jagged[self.collection]
        mask = masks[self.collection]
        x = self.embed(objects)
        cls = self.cls_token.expand(x.shape[0], 1, x.shape[2])
        x = torch.cat([cls, x], dim=1)
        key_mask = torch.cat([mask.new_ones(mask.shape[0], 1), mask], dim=1)
        for block in self.blocks:
            x = block(x, key_mask)
        token = self.norm(x[:, 0])
        if self.use_flat:
            token = torch.cat([token, flat], dim=-1)
        return self.head(token)
