"""CUDA graphs for the training forward and backward (SoA columns to logits).

A small HEP model's training step on a GPU costs little more than its kernel launches: a few
hundred launches of a few microseconds of host time each, while the GPU waits. Captured once
in a CUDA graph, the assembler and the network run forward as one replay and backward as
another (``torch.cuda.make_graphed_callables``); the loss, Lightning's loop and the optimiser
stay eager, so gradient clipping, schedulers, callbacks and logging work as they do without.

Graphs need inputs of fixed shapes: the device-resident data path gives them (its jagged
gather has ``batch * max_length`` slots, see ``project.data.batching``). A batch of another
shape (the last, short batch of an epoch) runs eagerly. The network must be free of host
synchronisation (``.item()``, data-dependent shapes) and of Python control flow on tensor
values, as the template's models are; a capture that fails falls back to eager with a warning.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)


class _ColumnsForward(nn.Module):
    """``model(list_of_columns)`` as a module of positional tensor arguments, the form
    ``make_graphed_callables`` takes. Kept out of the LightningModule's module tree (it
    holds the same parameters, and must not appear twice in a ``state_dict``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, *columns: Tensor) -> Tensor:
        return self.model(list(columns))


def graphs_unavailable(
    device: torch.device, world_size: int, accumulate_grad_batches: int, compiled: bool
) -> str | None:
    """Why the training forward cannot run in CUDA graphs here, or None when it can."""
    if device.type != "cuda":
        return f"the training device is {device.type}, not cuda"
    if world_size != 1:
        return f"training runs on {world_size} processes (DDP's gradient hooks are not captured)"
    if accumulate_grad_batches != 1:
        # The graphed backward writes its gradients into the same buffers on every replay,
        # which ``.grad`` may alias: accumulated gradients would be overwritten.
        return f"gradients are accumulated over {accumulate_grad_batches} batches"
    if compiled:
        return "the network is compiled with torch.compile"
    return None


class GraphedForward:
    """The training forward (and its backward) of ``model`` replayed from CUDA graphs.

    Captured on the first call, with that call's input shapes; later calls with the same
    shapes replay the graphs (the inputs are copied into the graph's input buffers), other
    shapes return None and the caller runs the model eagerly. When most batches differ in
    shape from the captured one (jagged batches formed on the host, whose object counts
    vary), the graphs are released after ``give_up_after`` such batches and training goes on
    eagerly.
    """

    give_up_after = 8

    def __init__(self, model: nn.Module, warmup: int = 3) -> None:
        self.model = model
        self.warmup = warmup
        self.shapes: tuple[torch.Size, ...] | None = None
        self.failed: str | None = None
        self.replays = 0
        self.other_shapes = 0  # batches run eagerly because their shapes differ
        self._graphed: Callable[..., Tensor] | None = None
        self._matrices: list[_Matrix] = []

    def __call__(self, inputs: list[Tensor]) -> Tensor | None:
        """Logits from the graphs, or None when this batch must run eagerly."""
        if self.failed is not None:
            return None
        if self._graphed is None:
            self._capture(inputs)
            if self._graphed is None:
                return None
        if tuple(t.shape for t in inputs) != self.shapes:
            self.other_shapes += 1
            if self.other_shapes >= self.give_up_after and self.other_shapes > self.replays:
                self.failed = "the input shapes vary from batch to batch"
                self._graphed, self._matrices = None, []  # release the graphs and buffers
                log.info("CUDA graphs released, training runs eagerly: %s", self.failed)
            return None
        for matrix in self._matrices:
            inputs = matrix.load(inputs)
        self.replays += 1
        return self._graphed(*inputs)

    def _capture(self, inputs: list[Tensor]) -> None:
        # The graphs keep their own input buffers (copies of this batch); each replay copies
        # the batch into them: a matrix whose columns the batch's inputs are (the resident
        # layout's gathers) in one copy, every other input on its own.
        samples = [t.detach().clone(memory_format=torch.contiguous_format) for t in inputs]
        self._matrices = _Matrix.find(inputs)
        for matrix in self._matrices:
            for i, view in matrix.views.items():
                samples[i] = view
        device_type = samples[0].device.type
        # Captured under the surrounding mixed precision (if any), without autocast's weight
        # cache, which graphs do not support.
        autocast = torch.autocast(
            device_type,
            dtype=torch.get_autocast_dtype(device_type),
            enabled=torch.is_autocast_enabled(device_type),
            cache_enabled=False,
        )
        try:
            with autocast:
                wrapper = torch.cuda.make_graphed_callables(
                    _ColumnsForward(self.model),
                    tuple(samples),
                    num_warmup_iters=self.warmup,
                    allow_unused_input=True,  # a network may ignore some of its inputs
                )
        except Exception as err:  # any capture failure means: run eagerly
            self.failed = f"{type(err).__name__}: {err}"
            warnings.warn(
                f"CUDA graph capture of the training forward failed, training runs eagerly "
                f"({self.failed}). Set model.cuda_graphs=false to skip the attempt.",
                stacklevel=2,
            )
            return
        self._graphed = wrapper
        self.shapes = tuple(s.shape for s in samples)
        log.info("training forward and backward captured in CUDA graphs, shapes %s", self.shapes)


class _Matrix:
    """Graph input buffers for inputs that are columns of one contiguous 2-D tensor.

    ``load`` hands the graph the buffer's column views in place of the batch's columns after
    copying the batch's matrix into the buffer once (the graph skips inputs that are already
    its buffers). A batch whose columns are not laid out the same way is left as it is.
    """

    def __init__(self, base: Tensor, positions: dict[int, int]) -> None:
        self.buffer = base.detach().clone()
        self.positions = positions  # input index -> element offset of its column in the matrix
        self.views = {i: self.buffer[:, offset] for i, offset in positions.items()}

    @staticmethod
    def find(inputs: list[Tensor]) -> list[_Matrix]:
        """Matrices of which two or more of ``inputs`` are columns."""
        groups: dict[int, tuple[Tensor, dict[int, int]]] = {}
        for i, t in enumerate(inputs):
            base = t._base
            if (
                base is not None
                and base.dim() == 2
                and t.dim() == 1
                and base.is_contiguous()
                and t.stride() == (base.stride(0),)
            ):
                offset = t.storage_offset() - base.storage_offset()
                groups.setdefault(id(base), (base, {}))[1][i] = offset
        return [_Matrix(base, pos) for base, pos in groups.values() if len(pos) > 1]

    def load(self, inputs: list[Tensor]) -> list[Tensor]:
        """``inputs`` with this matrix's columns replaced by the buffer's (filled by one copy)."""
        first = next(iter(self.positions))
        base = inputs[first]._base
        if base is None or base.shape != self.buffer.shape or not base.is_contiguous():
            return inputs
        start = base.storage_offset()
        for i, offset in self.positions.items():
            t = inputs[i]
            if t._base is not base or t.storage_offset() - start != offset:
                return inputs
        self.buffer.copy_(base)
        inputs = list(inputs)
        for i, view in self.views.items():
            inputs[i] = view
        return inputs
