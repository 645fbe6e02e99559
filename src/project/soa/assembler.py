"""The SoA assembler: columns and offsets in, padded and standardised tensors out.

The same module is the first step of every training batch (on the training device) and the
front of the exported deploy graph, so training and deployment share one code path from raw
columns to model inputs. It uses gathers only: no Python control flow that depends on the
data, no ``.item()``, no host synchronisation; it exports to TorchScript, ``torch.export``
(AOTInductor) and ONNX alike.

Inputs, per DESIGN.md:
- one ``(batch,)`` float32 tensor per flat column;
- per jagged collection, ``offsets`` ``(batch + 1,)`` int64 and one ``(n_total,)`` float32 tensor
  per field. Row ``i`` owns the field elements ``offsets[i]:offsets[i+1]``: offsets index the
  field arrays, so they may start at any ``k >= 0`` and the fields may be longer than
  ``offsets[-1]`` (a framework's view of a sub-range of its collection gives the same answer
  as the rows cut out).

Outputs:
- ``flat``: ``(batch, n_flat)`` standardised features;
- per collection ``(batch, max_length, n_fields)`` standardised features, zero where masked,
  and a ``(batch, max_length)`` boolean mask; the first ``max_length`` objects of each row in
  stored order are kept.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from project.contract import LOG_FLOOR, Feature, InputContract
from project.utils.profiling import marked


class Standardize(nn.Module):
    """``(transform(x) - mean) / scale`` on the last dimension, constants as buffers.

    Unfitted features (no constants yet) pass through with mean 0 and scale 1; the
    DataModule fits the constants on the training split before a model is built.
    """

    def __init__(self, features: tuple[Feature, ...]) -> None:
        super().__init__()
        self.register_buffer(
            "mean", torch.tensor([f.mean if f.mean is not None else 0.0 for f in features])
        )
        self.register_buffer(
            "scale", torch.tensor([f.scale if f.scale is not None else 1.0 for f in features])
        )
        self.register_buffer(
            "log_mask", torch.tensor([f.transform == "log" for f in features], dtype=torch.bool)
        )

    def forward(self, x: Tensor) -> Tensor:
        """Standardise ``(..., n_features)``."""
        x = torch.where(self.log_mask, torch.log(x.clamp_min(LOG_FLOOR)), x)
        return (x - self.mean) / self.scale


def pad_jagged(offsets: Tensor, fields: list[Tensor], max_length: int) -> tuple[Tensor, Tensor]:
    """Pad one jagged collection by gathers.

    Parameters
    ----------
    offsets
        ``(batch + 1,)`` int64, non-decreasing; row ``i`` owns elements
        ``offsets[i]:offsets[i+1]`` of ``fields`` (a slice of a larger offsets array, with the
        whole field arrays, works as it is).
    fields
        ``n_fields`` tensors of shape ``(n_total,)``, ``n_total >= offsets[-1]``.
    max_length
        Objects kept per row (the first ones in stored order).

    Returns
    -------
    ``(batch, max_length, n_fields)`` values (zero where masked) and ``(batch, max_length)`` mask.
    """
    stacked = torch.stack(fields, dim=-1)  # (n_total, n_fields)
    # A zero row in front: masked positions point at it (index 0), and a batch with no
    # objects at all (n_total == 0) still has something to gather from.
    stacked = torch.cat([stacked.new_zeros(1, stacked.shape[-1]), stacked], dim=0)
    starts = offsets[:-1] + 1
    counts = offsets[1:] - offsets[:-1]
    positions = torch.arange(max_length, device=offsets.device, dtype=offsets.dtype)
    mask = positions.unsqueeze(0) < counts.unsqueeze(1)  # (batch, max_length)
    index = torch.where(mask, starts.unsqueeze(1) + positions.unsqueeze(0), 0)
    padded = stacked.index_select(0, index.reshape(-1)).reshape(
        index.shape[0], max_length, stacked.shape[-1]
    )
    return padded, mask


class SoAAssembler(nn.Module):
    """Raw SoA columns to standardised model inputs, as described in the module docstring.

    ``forward`` takes the inputs positionally in ``contract.input_names`` order, which is also
    the order of the exported graph's inputs.
    """

    def __init__(self, contract: InputContract) -> None:
        super().__init__()
        self.n_flat = len(contract.flat)
        self.n_fields = [len(c.fields) for c in contract.jagged]
        self.max_lengths = [int(c.max_length) for c in contract.jagged]
        self.flat_norm = Standardize(contract.flat) if contract.flat else None
        self.jagged_norm = nn.ModuleList(Standardize(c.fields) for c in contract.jagged)

    def forward(self, inputs: list[Tensor]) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        """Assemble ``(flat, [padded per collection], [mask per collection])``.

        ``flat`` has shape ``(batch, n_flat)`` (``(batch, 0)`` when the contract has no flat
        columns).
        """
        with marked("soa.assemble"):  # for profilers; nothing inside a trace or an export
            return self._assemble(inputs)

    def _assemble(self, inputs: list[Tensor]) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        pos = self.n_flat
        batch_ref = inputs[0] if self.n_flat else inputs[0][:-1]
        if self.flat_norm is not None:
            flat = self.flat_norm(torch.stack(inputs[: self.n_flat], dim=-1))
        else:
            flat = batch_ref.new_zeros(batch_ref.shape[0], 0, dtype=torch.float32)
        padded: list[Tensor] = []
        masks: list[Tensor] = []
        for i, norm in enumerate(self.jagged_norm):
            offsets = inputs[pos]
            fields = inputs[pos + 1 : pos + 1 + self.n_fields[i]]
            pos += 1 + self.n_fields[i]
            values, mask = pad_jagged(offsets, fields, self.max_lengths[i])
            # Normalise after the gather (cost scales with the batch, not the source), and
            # zero the padding with where(): log(0) of a padded slot must not leak as NaN.
            values = torch.where(mask.unsqueeze(-1), norm(values), 0.0)
            padded.append(values)
            masks.append(mask)
        return flat, padded, masks
