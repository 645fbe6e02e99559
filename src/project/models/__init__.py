"""Plain ``torch.nn.Module`` networks: tensors in, logits out; no Lightning, no I/O.

Every network has the signature ``forward(flat, jagged, masks) -> logits`` with
``flat`` ``(batch, n_flat)``, ``jagged`` a list of ``(batch, max_length, n_fields)`` tensors and
``masks`` the matching ``(batch, max_length)`` booleans, and logits ``(batch, n_outputs)``. They
are built with the sizes from ``InputContract.model_dims()`` and contain no data-dependent
Python control flow, so they export to TorchScript, AOTInductor and ONNX.
"""

from project.models.deepsets import DeepSets
from project.models.mlp import MLP
from project.models.transformer import ParticleTransformer

__all__ = ["MLP", "DeepSets", "ParticleTransformer"]
