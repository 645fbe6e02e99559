"""The single-threaded deployment policy: the host framework owns the threads (DESIGN.md), one
event per thread, and a model with a pool of its own would oversubscribe the machine. PyTorch
runs one intra-op and one inter-op thread, set before any parallel work; ONNX Runtime one of
each, with sequential execution."""

from __future__ import annotations

import threading
from dataclasses import dataclass

import torch


class ThreadPolicyError(RuntimeError):
    """The requested threading policy cannot be applied in this process."""


@dataclass(frozen=True)
class ThreadPolicy:
    """Threads a loaded model may use, for PyTorch (process-wide) and each ONNX Runtime
    session; ``None`` leaves PyTorch's setting as it is."""

    intra_op: int | None = 1
    inter_op: int | None = 1

    @classmethod
    def single(cls) -> ThreadPolicy:
        """One thread for everything: the deployment default."""
        return cls(1, 1)

    @classmethod
    def unrestricted(cls) -> ThreadPolicy:
        """Leave PyTorch's thread pools alone (notebooks, offline batch jobs)."""
        return cls(None, None)

    @property
    def name(self) -> str:
        """``single``, ``unrestricted`` or ``intra=N,inter=M``."""
        names = {(1, 1): "single", (None, None): "unrestricted"}
        return names.get(
            (self.intra_op, self.inter_op), f"intra={self.intra_op},inter={self.inter_op}"
        )


_lock = threading.Lock()


def apply_torch_policy(policy: ThreadPolicy) -> dict[str, int]:
    """Set PyTorch's thread pools to ``policy``; returns the observed ``{"intra_op": n,
    "inter_op": m}``. The inter-op pool can only be sized before any inter-op work: later,
    this raises ``ThreadPolicyError`` rather than run with the wrong policy."""
    with _lock:
        if policy.intra_op is not None and torch.get_num_threads() != policy.intra_op:
            torch.set_num_threads(policy.intra_op)
        if policy.inter_op is not None and torch.get_num_interop_threads() != policy.inter_op:
            try:
                torch.set_num_interop_threads(policy.inter_op)
            except RuntimeError as err:
                raise ThreadPolicyError(
                    f"cannot set PyTorch inter-op threads to {policy.inter_op}: the pool already "
                    f"runs with {torch.get_num_interop_threads()} threads ({err}). Load the model "
                    "(or call apply_torch_policy) before any other PyTorch work in this process, "
                    "or choose ThreadPolicy.unrestricted() explicitly."
                ) from err
        intra, inter = torch.get_num_threads(), torch.get_num_interop_threads()
    observed = {"intra_op": intra, "inter_op": inter}
    for key, wanted in (("intra_op", policy.intra_op), ("inter_op", policy.inter_op)):
        if wanted is not None and observed[key] != wanted:
            raise ThreadPolicyError(
                f"PyTorch {key} threads are {observed[key]}, policy wants {wanted}"
            )
    return observed


def onnx_session_options(policy: ThreadPolicy, optimization: str = "all") -> object:
    """``onnxruntime.SessionOptions`` for ``policy``; ``optimization`` is ``all`` or ``none``."""
    import onnxruntime as ort

    level = ort.GraphOptimizationLevel
    levels = {"all": level.ORT_ENABLE_ALL, "none": level.ORT_DISABLE_ALL}
    if optimization not in levels:
        raise ValueError(
            f"unknown ONNX optimisation level {optimization!r}; use one of {list(levels)}"
        )
    options = ort.SessionOptions()
    options.intra_op_num_threads = policy.intra_op or 0
    options.inter_op_num_threads = policy.inter_op or 0
    options.graph_optimization_level = levels[optimization]
    if policy.inter_op == 1:
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    if policy.intra_op == 1:  # no worker threads to spin
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options
