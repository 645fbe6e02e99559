"""Raw backends: one exported artifact, inputs in graph order, outputs in graph order.

These are the thinnest possible wrappers around ``torch.jit.load``,
``torch._inductor.aoti_load_package`` and ``onnxruntime.InferenceSession``. The export's parity
check runs them in a child process; ``project.inference`` builds the SoA interface on top.
Inputs and outputs are torch tensors (CPU or the artifact's device); tensors share memory
with numpy arrays through ``torch.from_numpy``, so nothing here copies a contiguous input.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from project.inference.threads import ThreadPolicy, onnx_session_options

FORMATS = ("torchscript", "aoti", "onnx")


class Backend:
    """An artifact ready to run. ``__call__(inputs) -> outputs``, both lists of tensors."""

    format: str = ""
    device: str = "cpu"

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        raise NotImplementedError

    @property
    def entry(self) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
        """The cheapest way to call the backend: a list of tensors in, a list out.

        The same computation as ``__call__``; a backend whose runtime takes the list directly
        returns that runtime's own function, so a call costs no Python frame of ours.
        """
        return self.__call__


class TorchScriptBackend(Backend):
    """A TorchScript module loaded with ``torch.jit.load`` onto ``device``."""

    format = "torchscript"

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        self.device = device
        self.module = torch.jit.load(str(path), map_location=device)
        self.module.eval()

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run with gradients off; outputs stay on the module's device."""
        with torch.inference_mode():
            return list(self.module(*inputs))


class AOTIBackend(Backend):
    """An AOTInductor package loaded with ``torch._inductor.aoti_load_package``.

    Loading compiled code can crash the process on some torch builds; callers that must
    survive that (the export's parity check) load it in a child process.
    """

    format = "aoti"

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        # ``torch._inductor.codecache`` too: torch 2.10's package loader reads it without
        # importing it, so a fresh process that has compiled nothing failed to load.
        import torch._inductor
        import torch._inductor.codecache

        self.device = device
        self.runner = torch._inductor.aoti_load_package(str(path))
        # The package's C++ loader takes the flat tensor list directly; the Python wrapper
        # around it rebuilds the call's pytree specs on every call (~20 us at batch 1). The
        # graph's inputs and outputs are flat tuples of tensors, so both give the same result.
        # No autograd state is needed around it: the compiled code records no graph, and its
        # outputs never require gradients (its weights are constants, its inputs come from
        # numpy), so the ``inference_mode`` guard TorchScript needs would only cost time here
        # (about 3 us a call).
        loader = getattr(self.runner, "loader", None)
        self._run = loader.run if hasattr(loader, "run") else None

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run the compiled graph."""
        if self._run is not None:
            return self._run(inputs if type(inputs) is list else list(inputs))
        with torch.inference_mode():
            return list(self.runner(*inputs))

    @property
    def entry(self) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
        """The C++ loader's ``run`` itself where this torch has it (see ``Backend.entry``)."""
        return self._run if self._run is not None else self.__call__


class OnnxBackend(Backend):
    """An ONNX Runtime session under a thread policy, on the CPU execution provider."""

    format = "onnx"

    def __init__(
        self,
        path: str | Path,
        device: str = "cpu",
        policy: ThreadPolicy | None = None,
        optimization: str = "all",
    ) -> None:
        import onnxruntime as ort

        if device != "cpu":
            raise ValueError(
                f"ONNX artifacts run on the CPU execution provider here, not {device!r}"
            )
        self.device = device
        self.optimization = optimization
        options = onnx_session_options(policy or ThreadPolicy.single(), optimization)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run the session; numpy views of the tensors are handed over without copies."""
        feed = {name: _numpy_view(t) for name, t in zip(self.input_names, inputs, strict=True)}
        return [torch.from_numpy(o) for o in self.session.run(self.output_names, feed)]


def _numpy_view(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def open_backend(
    fmt: str,
    path: str | Path,
    device: str = "cpu",
    policy: ThreadPolicy | None = None,
    onnx_optimization: str = "all",
) -> Backend:
    """Open an artifact of format ``fmt`` (``torchscript``, ``aoti`` or ``onnx``)."""
    if fmt == "torchscript":
        return TorchScriptBackend(path, device)
    if fmt == "aoti":
        return AOTIBackend(path, device)
    if fmt == "onnx":
        return OnnxBackend(path, device, policy, onnx_optimization)
    raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
