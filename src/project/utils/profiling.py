"""Named ranges for profilers: NVTX (Nsight Systems) and ``torch.profiler`` in one call.

``marked(name)`` marks a block of host code with an NVTX range (``torch.cuda.nvtx``, shown
by ``nsys``) and a ``torch.profiler.record_function`` range (shown in the torch profiler's
chrome trace, in TensorBoard or Perfetto). The template marks the batch gather
(``soa.gather``), the assembler (``soa.assemble``), the training forward, backward and
optimiser step (``train.forward``, ``train.backward``, ``train.optimizer_step``), a replay of
the captured training step (``train.step_graph``), validation and test (``eval.validation``,
``eval.test``), and the predict job marks its inference calls (``inference.call``).

Off by default, and then free: ``marked`` checks one module flag and hands back a shared
no-op context manager. It is on when the environment variable ``PROJECT_PROFILE`` is set to
anything but ``0`` or empty (``PROJECT_PROFILE=1 nsys profile ...``, see README), or after
``enable()`` (the training job calls it when a ``profiler`` is configured).

Ranges never enter a traced or exported graph: inside ``torch.jit.trace``, ``torch.export``,
``torch.compile`` or a CUDA graph capture, ``marked`` is a no-op as well (the ranges of a
captured block appear once, at capture; mark its replay from outside).

An inference call is marked the same way, by the code that makes it (``project.predict``,
a benchmark, an analysis), around the runtime's call::

    from project.utils.profiling import marked

    with marked("inference.call"):
        outputs = model(inputs)

The runtime itself (``project.inference``) imports nothing of the project but itself and the
contract, so it does not import this module; it need not: a range around its call covers
the checks, the backend's run and the copies, and the kernels it launches nest in it.
"""

from __future__ import annotations

import contextlib
import os
from contextlib import AbstractContextManager
from types import TracebackType

import torch

ENV_VAR = "PROJECT_PROFILE"

_enabled = os.environ.get(ENV_VAR, "") not in ("", "0")
_NOTHING = contextlib.nullcontext()


def enable(on: bool = True) -> None:
    """Switch the ranges on (or off) for this process."""
    global _enabled
    _enabled = bool(on)


def enabled() -> bool:
    """Whether ``marked`` emits ranges."""
    return _enabled


class _Range:
    """An NVTX range and a ``record_function`` range over the same block."""

    __slots__ = ("_nvtx", "_record", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        # NVTX exists in CUDA builds of torch only; a CPU build records the torch range alone.
        self._nvtx = torch.version.cuda is not None
        self._record: torch.profiler.record_function | None = None

    def __enter__(self) -> _Range:
        if self._nvtx:
            torch.cuda.nvtx.range_push(self.name)
        self._record = torch.profiler.record_function(self.name)
        self._record.__enter__()
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        if self._record is not None:
            self._record.__exit__(kind, value, traceback)
            self._record = None
        if self._nvtx:
            torch.cuda.nvtx.range_pop()


def _tracing() -> bool:
    """Inside a tracer, compiler or CUDA graph capture, where a range must not be recorded."""
    if torch.jit.is_tracing() or torch.compiler.is_compiling():
        return True
    return torch.cuda.is_initialized() and torch.cuda.is_current_stream_capturing()


def marked(name: str) -> AbstractContextManager:
    """A context manager marking its block as ``name`` for NVTX and ``torch.profiler``; a
    shared no-op when profiling is off (see the module docstring)."""
    if not _enabled or _tracing():
        return _NOTHING
    return _Range(name)
