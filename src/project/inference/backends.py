"""Raw backends: thin wrappers around the documented loaders ``torch.jit.load``,
``torch._inductor.aoti_load_package`` and ``onnxruntime.InferenceSession``, inputs and outputs
in graph order: ``backend(tensors)`` (what the export's parity check runs) and
``backend.run(arrays, outs)`` on numpy columns (what ``InferenceModel`` runs), which copies no
contiguous input (``torch.from_numpy`` shares its memory; ONNX Runtime reads it in place)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from project.inference.threads import ThreadPolicy, onnx_session_options

FORMATS = ("torchscript", "aoti", "onnx")
F32 = np.dtype(np.float32)


class Backend:
    """An artifact ready to run: ``backend(tensors)`` runs ``call``, tensors to tensors."""

    def __call__(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        return self.call(inputs)

    def call(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run on tensors in graph order; returns the outputs as tensors."""
        raise NotImplementedError

    def run(self, arrays: list[np.ndarray], outs: list[np.ndarray] | None) -> list[np.ndarray]:
        """Run on 1-D numpy inputs (graph order, writable, contiguous, the graph's dtypes).
        With ``outs`` (one ``(n_rows,)`` float32 array per output) the results are written
        into them; without, the result tensors' memory is returned."""
        results = [t.numpy() for t in self.call([torch.from_numpy(a) for a in arrays])]
        for out, res in zip(outs or (), results, strict=False):
            np.copyto(out, res)
        return results if outs is None else outs


class TorchScriptBackend(Backend):
    """A TorchScript module loaded with ``torch.jit.load`` onto ``device``."""

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        self.module = torch.jit.load(str(path), map_location=device)
        self.module.eval()

    def call(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run with autograd off, on the current CUDA stream; outputs stay on the device."""
        with torch.inference_mode():
            return list(self.module(*inputs))


class AOTIBackend(Backend):
    """An AOTInductor package loaded with ``torch._inductor.aoti_load_package`` (compiled code,
    which can crash the process on some torch builds: the parity check loads it in a child)."""

    def __init__(self, path: str | Path, device: str = "cpu") -> None:
        # ``torch._inductor.codecache`` too: torch 2.10's package loader reads it without
        # importing it, so a fresh process that has compiled nothing failed to load.
        import torch._inductor
        import torch._inductor.codecache

        where = torch.device(device)
        index = {} if where.index is None else {"device_index": where.index}
        self.package = torch._inductor.aoti_load_package(str(path), **index)

    def call(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run the compiled graph (on the current CUDA stream for a CUDA package). No autograd
        guard is needed: compiled code records no graph, and its weights are constants."""
        return list(self.package(*inputs))


class OnnxBackend(Backend):
    """An ONNX Runtime session under a thread policy, on the CPU execution provider."""

    def __init__(
        self,
        path: str | Path,
        device: str = "cpu",
        policy: ThreadPolicy | None = None,
        optimization: str = "all",
    ) -> None:
        import onnxruntime as ort

        if device != "cpu":
            raise ValueError(f"ONNX artifacts run on the CPU execution provider, not {device!r}")
        options = onnx_session_options(policy or ThreadPolicy.single(), optimization)
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def call(self, inputs: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Run the session on numpy views of the tensors."""
        arrays = [t.detach().cpu().numpy() for t in inputs]
        return [torch.from_numpy(o) for o in self.run(arrays, None)]

    def run(self, arrays: list[np.ndarray], outs: list[np.ndarray] | None) -> list[np.ndarray]:
        """See ``Backend.run``. Without ``outs``: ``InferenceSession.run``, which returns new
        arrays. With ``outs``: an I/O binding made for this call (threads share nothing),
        which writes into them."""
        if outs is None:
            return self.session.run(
                self.output_names, dict(zip(self.input_names, arrays, strict=True))
            )
        binding = self.session.io_binding()
        for name, arr in zip(self.input_names, arrays, strict=True):
            binding.bind_cpu_input(name, arr)
        for name, out in zip(self.output_names, outs, strict=True):
            binding.bind_output(name, "cpu", 0, F32, out.shape, out.ctypes.data)
        self.session.run_with_iobinding(binding)
        return outs


def open_backend(
    fmt: str,
    path: str | Path,
    device: str = "cpu",
    policy: ThreadPolicy | None = None,
    onnx_optimization: str = "all",
) -> Backend:
    """Open an artifact of format ``fmt`` (``torchscript``, ``aoti`` or ``onnx``)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; choose one of {FORMATS}")
    if fmt == "onnx":
        return OnnxBackend(path, device, policy, onnx_optimization)
    return (TorchScriptBackend if fmt == "torchscript" else AOTIBackend)(path, device)
