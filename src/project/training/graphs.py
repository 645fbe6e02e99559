"""The whole training step in one CUDA graph: batch gather, forward, loss, backward, gradient
clipping and the optimiser step.

A small HEP model's training step on a GPU costs little more than its kernel launches: a few
hundred launches of a few microseconds of host time each, while the GPU waits. Captured once,
the step is one graph launch. ``GraphedStep`` captures a step function on the first batch and
replays it on every batch of the same shapes; the caller (``ClassifierModule``) copies the
batch in (for a batch of device-resident rows, only its row indices: the gather runs inside
the graph) and reads the loss out.

What the graph fixes at capture, and how it stays right:

- input shapes: a batch of other shapes (an epoch's short last batch) runs eagerly; when most
  batches differ (jagged batches formed on the host), the graph is released;
- the learning rate: captured from a device tensor that is refilled from the optimiser's
  ``param_groups`` before a replay whenever it changed, so schedulers work as they do eagerly;
  any other optimiser setting that changes (betas, weight decay) releases the graph;
- the optimiser: Adam or AdamW built with ``capturable=True`` (``fused`` where the config
  leaves the implementation open; ``ClassifierModule.configure_optimizers``);
- the warm-up steps before capture (on a side stream, as CUDA graphs need) are undone: the
  parameters, buffers, optimiser state and CUDA generator are put back as they were, so the
  graphed run takes the same steps as an eager one.

The step must be free of host synchronisation (``.item()``, data-dependent shapes) and of
Python control flow on tensor values, as the template's models are; ``torch.compile``'d code
inside it is captured too. A capture that fails falls back to eager steps with a warning.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.optim import Adam, AdamW, Optimizer

log = logging.getLogger(__name__)

# Lightning precisions whose step needs no gradient scaler (a GradScaler is not captured).
GRAPH_PRECISIONS = frozenset({"32-true", "bf16-mixed", "bf16-true"})
# Optimisers whose state warm-up can undo: a fresh state is all zeros (step count, moments).
GRAPH_OPTIMIZERS = (Adam, AdamW)


def graphs_unavailable(
    device: torch.device,
    world_size: int,
    accumulate_grad_batches: int,
    precision: str,
    optimizer: type,
) -> str | None:
    """Why the training step cannot run in a CUDA graph here, or None when it can."""
    if device.type != "cuda":
        return f"the training device is {device.type}, not cuda"
    if world_size != 1:
        return f"training runs on {world_size} processes (DDP's gradient hooks are not captured)"
    if accumulate_grad_batches != 1:
        return f"gradients are accumulated over {accumulate_grad_batches} batches"
    if str(precision) not in GRAPH_PRECISIONS:
        return f"precision {precision} needs a gradient scaler (graphs take {sorted(GRAPH_PRECISIONS)})"
    if not issubclass(optimizer, GRAPH_OPTIMIZERS):
        return f"the optimizer is {optimizer.__name__} (graphs take Adam and AdamW)"
    return None


def align_step_flags(optimizer: Optimizer) -> None:
    """Give every parameter group the implementation flags the optimiser was built with.

    Loading a checkpoint replaces them with those of the run that wrote it (a graphed GPU run
    writes ``capturable=True, fused=True``); the step counts are moved where the flags want
    them (on the parameter's device for capturable or fused steps, on the host otherwise).
    """
    flags = {
        k: optimizer.defaults[k]
        for k in ("capturable", "fused", "foreach")
        if k in optimizer.defaults
    }
    for group in optimizer.param_groups:
        group.update(flags)
        on_device = bool(group.get("capturable") or group.get("fused"))
        for p in group["params"]:
            state = optimizer.state.get(p)
            step = state.get("step") if state else None
            if isinstance(step, Tensor):
                where = p.device if on_device else torch.device("cpu")
                state["step"] = step.to(device=where, dtype=torch.float32)


class GraphedStep:
    """``step(inputs) -> loss`` replayed from one CUDA graph.

    Parameters
    ----------
    step
        One whole optimisation step on a dict of input tensors (zero the gradients, forward,
        loss, backward, clip, ``optimizer.step()``); returns the detached loss ``()``.
    optimizer
        The optimiser ``step`` steps (capturable), whose learning rates are tracked.
    module
        Holds every parameter and buffer ``step`` changes (restored after warm-up).
    warmup
        Eager steps on a side stream before capture (undone afterwards).
    """

    give_up_after = 8

    def __init__(
        self,
        step: Callable[[dict[str, Tensor]], Tensor],
        optimizer: Optimizer,
        module: nn.Module,
        warmup: int = 3,
    ) -> None:
        self.step, self.optimizer, self.module, self.warmup = step, optimizer, module, warmup
        self.signature: tuple | None = None
        self.failed: str | None = None
        self.replays = 0
        self.other_shapes = 0  # batches run eagerly because their shapes differ
        self._graph: torch.cuda.CUDAGraph | None = None
        self._inputs: dict[str, Tensor] = {}
        self._loss: Tensor | None = None
        self._lrs: list[Tensor] = []  # the captured learning rates, one per parameter group
        self._lr_values: list[float] = []
        self._settings: list[tuple] = []

    def __call__(self, inputs: dict[str, Tensor]) -> Tensor | None:
        """The loss of one step replayed from the graph, or None when this batch must be
        stepped eagerly by the caller."""
        if self.failed is not None:
            return None
        signature = tuple((k, v.shape, v.dtype) for k, v in inputs.items())
        if self._graph is None:
            self._capture(inputs, signature)
            if self._graph is None:
                return None
        elif signature != self.signature:
            self.other_shapes += 1
            if self.other_shapes >= self.give_up_after and self.other_shapes > self.replays:
                self.release("the input shapes vary from batch to batch")
            return None
        if not self._settings_unchanged():
            self.release("an optimizer setting other than the learning rate changed")
            return None
        for key, value in inputs.items():
            self._inputs[key].copy_(value)
        self._graph.replay()
        self.replays += 1
        return self._loss

    def release(self, reason: str) -> None:
        """Drop the graph and its memory; later steps run eagerly."""
        self.failed = reason
        self._graph, self._inputs, self._loss = None, {}, None
        log.info("CUDA graph of the training step released, training steps run eagerly: %s", reason)

    def _settings_unchanged(self) -> bool:
        groups = self.optimizer.param_groups
        for i, group in enumerate(groups):
            lr = group["lr"]
            if lr != self._lr_values[i]:  # a scheduler stepped: refill the captured tensor
                self._lrs[i].fill_(lr)
                self._lr_values[i] = lr
        return [_settings(g) for g in groups] == self._settings

    def _state(self) -> list[Tensor]:
        """Every tensor a step changes in place: parameters, buffers, optimiser state."""
        tensors = [*self.module.parameters(), *self.module.buffers()]
        for state in self.optimizer.state.values():
            tensors += [v for v in state.values() if isinstance(v, Tensor)]
        return tensors

    def _warm_up(self, inputs: dict[str, Tensor]) -> None:
        """Run ``warmup`` steps on ``inputs`` (what a capture needs first: compilation, the
        libraries' workspaces, the optimiser's state) and undo them: a state tensor that
        existed is put back, one they created (a fresh optimiser's) is zeroed, which is how
        Adam and AdamW start; the generator's state is put back too. On a CUDA device the
        steps run on a side stream, as a capture needs."""
        device = next(iter(inputs.values())).device
        cuda = device.type == "cuda"
        before = {id(t): t.detach().clone() for t in self._state()}
        rng = torch.cuda.get_rng_state(device) if cuda else torch.get_rng_state()
        try:
            if not cuda:
                for _ in range(self.warmup):
                    self.step(inputs)
                return
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(self.warmup):
                    self.step(inputs)
            torch.cuda.current_stream(device).wait_stream(side)
        finally:
            with torch.no_grad():
                for t in self._state():
                    saved = before.get(id(t))
                    t.copy_(saved) if saved is not None else t.zero_()
            if cuda:
                torch.cuda.set_rng_state(rng, device)
            else:
                torch.set_rng_state(rng)

    def _capture(self, inputs: dict[str, Tensor], signature: tuple) -> None:
        device = next(iter(inputs.values())).device
        static = {k: v.detach().clone() for k, v in inputs.items()}
        try:
            if device.type != "cuda":
                raise ValueError(f"the inputs are on {device}, a CUDA graph needs cuda")
            self._warm_up(static)
            groups = self.optimizer.param_groups
            self._lr_values = [g["lr"] for g in groups]
            self._lrs = [torch.tensor(float(lr), device=device) for lr in self._lr_values]
            graph = torch.cuda.CUDAGraph()
            for group, lr in zip(groups, self._lrs, strict=True):
                group["lr"] = lr
            try:
                # thread_local: a loader thread may pin host memory meanwhile (streamed
                # batches), which the default mode would refuse during the capture.
                with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                    loss = self.step(static)
            finally:
                for group, value in zip(groups, self._lr_values, strict=True):
                    group["lr"] = value
        except Exception as err:  # any capture failure means: step eagerly
            self.failed = f"{type(err).__name__}: {err}"
            warnings.warn(
                f"CUDA graph capture of the training step failed, training steps run eagerly "
                f"({self.failed}). Set model.cuda_graphs=false to skip the attempt.",
                stacklevel=3,
            )
            return
        self._graph, self._inputs, self._loss = graph, static, loss
        self._settings = [_settings(g) for g in self.optimizer.param_groups]
        self.signature = signature
        log.info(
            "training step (gather, forward, backward, optimizer) captured in a CUDA graph, "
            "inputs %s",
            {k: tuple(v.shape) for k, v in static.items()},
        )


def _settings(group: dict) -> list:
    """A parameter group's settings that a graph fixes at capture (all but lr and params)."""
    return [(k, v) for k, v in group.items() if k not in ("params", "lr")]
