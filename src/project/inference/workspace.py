"""Per-thread buffers that a loaded model reuses across calls.

Conversions the contract allows (float64 to float32, int32 to int64 offsets, counts to
offsets), scratch space for the input checks, and (optionally) outputs go into buffers owned
by the loaded model. A buffer grows only when a larger batch arrives; calls of equal or
smaller size reuse it, so after warm-up a call allocates nothing for its inputs.

Each calling thread has its own ``Workspace`` (``threading.local`` in the model), so one model
can be shared by many threads without a lock around the buffers.
"""

from __future__ import annotations

from typing import Any

import numpy as np


class Workspace:
    """Named, growable 1-D buffers of one thread, plus that thread's backend state.

    Attributes
    ----------
    buffers
        ``key -> ndarray``: the whole buffers (callers get views of the first ``n`` items).
    state
        Backend objects that must not be shared between threads (an ONNX Runtime I/O binding).
    """

    def __init__(self) -> None:
        self.buffers: dict[str, np.ndarray] = {}
        self.state: dict[str, Any] = {}
        # key -> the view handed out last: a call of the same size gets the same view object
        # back, so what is built on it (a tensor sharing its memory) can be reused too.
        self._views: dict[str, np.ndarray] = {}
        # Per graph input, ``(column, input)`` of the last call when the column went to the
        # backend without a copy (see ``InputPlan.prepare``), else ``None``.
        self.inputs: list[tuple[np.ndarray, np.ndarray] | None] = []
        # When every graph input of the last call was a column handed over without a copy:
        # ``(columns, their layouts, graph inputs, n_rows)`` (see ``InputPlan.prepare``).
        self.same_inputs: tuple[list, list, list[np.ndarray], int] | None = None

    def get(self, key: str, dtype: np.dtype, n: int) -> np.ndarray:
        """A view of ``n`` items of buffer ``key``, growing it if it holds fewer.

        Growth is by at least half the current size, so a slowly increasing batch size does
        not reallocate on every call. A key always has one dtype.
        """
        view = self._views.get(key)
        if view is not None and view.shape[0] == n:
            return view
        buf = self.buffers.get(key)
        if buf is None or buf.shape[0] < n:
            size = n if buf is None else max(n, buf.shape[0] + buf.shape[0] // 2)
            buf = np.empty(size, dtype=dtype)
            self.buffers[key] = buf
        view = self._views[key] = buf[:n]
        return view


class _WritableView:
    """``__array_interface__`` of a read-only array, marked writable (see ``writable_alias``)."""

    def __init__(self, arr: np.ndarray) -> None:
        self.base = arr  # keeps the memory alive as long as the alias
        interface = dict(arr.__array_interface__)
        interface["data"] = (interface["data"][0], False)
        self.__array_interface__ = interface


def writable_alias(arr: np.ndarray) -> np.ndarray:
    """The same memory as ``arr``, flagged writable, without a copy.

    ``torch.from_numpy`` warns on read-only arrays (Arrow hands out only those) because torch
    has no read-only tensors. The exported graphs never write to their inputs, so an alias of
    the same memory is safe, and unlike silencing the warning it is thread-safe.
    """
    return np.asarray(_WritableView(arr))
