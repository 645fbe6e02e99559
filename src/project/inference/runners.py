"""Run a raw backend on prepared numpy columns without copying them.

``TorchRunner`` (TorchScript, AOTInductor) wraps each column with ``torch.from_numpy``, which
shares its memory. ``OnnxRunner`` binds each column's buffer to an ONNX Runtime I/O binding
and binds the outputs to preallocated numpy arrays, so ONNX Runtime reads the caller's memory
and writes straight into the result.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from project.inference.backends import Backend, OnnxBackend
from project.inference.threads import ThreadPolicy, ThreadPolicyError
from project.inference.workspace import Workspace

F32 = np.dtype(np.float32)
# Bound once: these run per column per call.
_from_numpy = torch.from_numpy
_get_num_threads = torch.get_num_threads
_to_numpy = torch.Tensor.numpy


class Runner:
    """Runs prepared inputs (graph order, numpy) and returns the outputs (graph order, numpy)."""

    format: str
    backend: Backend

    def run(
        self, arrays: list[np.ndarray], n_rows: int, outs: list[np.ndarray] | None, ws: Workspace
    ) -> list[np.ndarray]:
        """Evaluate one batch; write into ``outs`` (``(n_rows,)`` float32 each) if given."""
        raise NotImplementedError


class TorchRunner(Runner):
    """TorchScript or AOTInductor: zero-copy tensors in, the backend's own tensors out.

    ``call`` is the function that runs the backend on a list of tensors (``Backend.entry``);
    a test or a benchmark may replace it to watch or skip the computation.
    """

    def __init__(self, backend: Backend, policy: ThreadPolicy) -> None:
        self.backend = backend
        self.format = backend.format
        self.intra_op = policy.intra_op
        self.call = backend.entry

    def run(
        self, arrays: list[np.ndarray], n_rows: int, outs: list[np.ndarray] | None, ws: Workspace
    ) -> list[np.ndarray]:
        """See ``Runner.run``; outputs without ``outs`` are views of the result tensors."""
        # Another library may have changed the process-wide setting since load.
        if self.intra_op is not None and _get_num_threads() != self.intra_op:
            raise ThreadPolicyError(
                f"PyTorch now runs {torch.get_num_threads()} intra-op threads, but this model "
                f"was loaded with the policy of {self.intra_op}; something called "
                "torch.set_num_threads after load"
            )
        # Inputs are writable (read-only ones were aliased by InputPlan.prepare). The list
        # of this thread's last call again (``InputPlan.prepare`` hands it back when the
        # columns are the same arrays), or an input that is the same array object as then,
        # keeps its tensor: same memory, so the current values. Kept until the next call.
        last = ws.state.get("torch")
        if last is not None and last[0] is arrays:
            tensors = last[1]
        else:
            if last is None:
                tensors = [_from_numpy(a) for a in arrays]
            else:
                tensors = [
                    t if a is b else _from_numpy(a)
                    for a, b, t in zip(arrays, last[0], last[1], strict=True)
                ]
            ws.state["torch"] = (arrays, tensors)
        results = list(map(_to_numpy, self.call(tensors)))
        if outs is None:
            return results
        for out, res in zip(outs, results, strict=True):
            np.copyto(out, res)
        return outs


class OnnxRunner(Runner):
    """ONNX Runtime through an I/O binding per thread: inputs and outputs by pointer."""

    format = "onnx"

    def __init__(self, backend: OnnxBackend) -> None:
        self.backend = backend
        self.session = backend.session
        self.input_names = list(backend.input_names)
        self.output_names = list(backend.output_names)
        # The binding's low-level handles skip a Python wrapper per bound buffer (a few
        # microseconds per call at batch 1). A binding points at the memory of the arrays
        # bound to it without holding them, so the thread's workspace keeps the last call's
        # input arrays alive, and an input that is the same array object in the next call
        # is not bound again (same memory and shape; its current values are read). The
        # public API is the fallback should the handles move in another onnxruntime version.
        self._fast = hasattr(self.session, "_sess") and hasattr(
            self.session.io_binding(), "_iobinding"
        )

    def _binding(self, ws: Workspace) -> tuple[Any, Any]:
        state = ws.state.get("onnx")
        if state is None:
            binding = self.session.io_binding()
            if self._fast:
                from onnxruntime.capi import _pybind_state as C

                device = C.OrtDevice(C.OrtDevice.cpu(), C.OrtDevice.default_memory(), 0)
                state = (binding._iobinding, device)
            else:
                state = (binding, None)
            ws.state["onnx"] = state
        return state

    def run(
        self, arrays: list[np.ndarray], n_rows: int, outs: list[np.ndarray] | None, ws: Workspace
    ) -> list[np.ndarray]:
        """See ``Runner.run``; without ``outs``, new arrays are allocated and bound."""
        if outs is None:
            outs = [np.empty(n_rows, dtype=F32) for _ in self.output_names]
        binding, device = self._binding(ws)
        bound = ws.state.get("onnx_inputs")
        if bound is None or bound[0] is not binding:
            bound = (binding, [None] * len(arrays))
        ws.state["onnx_inputs"] = (binding, arrays)
        if device is not None:
            for name, arr, last in zip(self.input_names, arrays, bound[1], strict=True):
                if arr is not last:
                    binding.bind_input(name, arr)
            for name, out in zip(self.output_names, outs, strict=True):
                binding.bind_output(name, device, F32, out.shape, out.ctypes.data)
            self.session._sess.run_with_iobinding(binding, None)
        else:
            for name, arr, last in zip(self.input_names, arrays, bound[1], strict=True):
                if arr is not last:
                    binding.bind_cpu_input(name, arr)
            for name, out in zip(self.output_names, outs, strict=True):
                binding.bind_output(name, "cpu", 0, F32, out.shape, out.ctypes.data)
            self.session.run_with_iobinding(binding)
        return outs
