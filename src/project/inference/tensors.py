"""SoA columns as tensors on the model's device: torch tensors, DLPack arrays (CuPy, JAX, numpy)
and arrays with ``__cuda_array_interface__`` (Numba), taken without a copy. What needs only
metadata (names, dtypes, devices, shapes, lengths) is checked on the host, in the call; what
needs values (NaN/Inf, the offsets rule) is computed on the device into a small verdict, which
the caller reads when it is ready (``InferenceModel`` on CUDA: without waiting, at a later call).
Offsets are the one input that is copied: clamped into the fields' range and made
non-decreasing, so that bad offsets cannot make the graph gather out of bounds (on CUDA a
device-side assert, which ends the process's use of the GPU). Valid offsets are unchanged."""

from __future__ import annotations

import math
from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from torch.nn.functional import pad

from project.contract import Feature, InputContract, JaggedCollection
from project.inference.errors import InputError
from project.inference.prepare import match

# Integer dtypes whose every value is an int64 value, so that a cast needs no check of values.
_INTEGERS = {torch.int8, torch.int16, torch.int32, torch.int64, torch.uint8, torch.uint16,
             torch.uint32}  # fmt: skip


class TensorPlan:
    """How one contract's inputs are taken as tensors on ``device`` and checked; with
    ``screen`` the verdict includes the NaN/Inf screen of the features."""

    def __init__(self, contract: InputContract, device: torch.device, screen: bool) -> None:
        self.contract, self.device, self.screen = contract, device, screen

    def tensor(self, value: Any, name: str) -> torch.Tensor:
        """Column ``value`` as a 1-D tensor on the plan's device, sharing its memory."""
        if not isinstance(value, torch.Tensor):
            value = self._take(value, name)
        if value.device != self.device:
            raise InputError(
                f"column {name!r} is on {value.device}, but this model runs on {self.device}: "
                f"pass arrays on {self.device} (torch.as_tensor(x, device={str(self.device)!r}) "
                "copies one there), or load the model for that device"
            )
        if value.dim() != 1:
            raise InputError(
                f"column {name!r} has shape {tuple(value.shape)}: SoA columns are 1-D (one value "
                "per row, or per object for jagged fields)"
            )
        return value

    def _take(self, value: Any, name: str) -> torch.Tensor:
        """A DLPack or CUDA-array-interface array as a tensor (DLPack first: its protocol
        orders the producer's stream before ours; the interface's ``stream`` is waited for)."""
        try:
            if hasattr(value, "__dlpack__"):
                return torch.from_dlpack(value)
            iface = getattr(value, "__cuda_array_interface__", None)
            if iface is not None:
                tensor = torch.as_tensor(value, device=self.device)
                producer = iface.get("stream")  # 1: the legacy default stream, ours when 0
                current = torch.cuda.current_stream(self.device)
                if producer is not None and producer != (current.cuda_stream or 1):
                    current.wait_stream(torch.cuda.ExternalStream(producer, device=self.device))
                return tensor
        except (TypeError, ValueError, RuntimeError, BufferError) as err:
            raise InputError(f"column {name!r} cannot be taken as a tensor: {err}") from err
        raise InputError(
            f"column {name!r} is a {type(value).__name__}: a model on {self.device} takes torch "
            "tensors, DLPack arrays (CuPy, JAX, numpy) or arrays with __cuda_array_interface__"
        )

    def feature(self, value: Any, feat: Feature, name: str) -> torch.Tensor:
        """Feature column ``value`` as a contiguous float32 tensor (itself where it is one)."""
        t = self.tensor(value, name)
        if t.dtype == torch.float32:
            return t if t.is_contiguous() else t.contiguous()
        if t.dtype == torch.bool and not feat.boolean:
            raise InputError(
                f"column {name!r} holds booleans, but the contract's feature {feat.name!r} is not "
                "declared boolean: pass numbers, or declare it with boolean: true and export again"
            )
        if t.dtype.is_complex:
            raise InputError(f"column {name!r} has dtype {t.dtype}; features are real numbers")
        return t.to(torch.float32).contiguous()

    def integers(self, value: Any, name: str) -> torch.Tensor:
        """Offsets or counts column ``value`` as contiguous int64."""
        t = self.tensor(value, name)
        if t.dtype not in _INTEGERS:
            raise InputError(
                f"{name!r} has dtype {t.dtype}: on {self.device} offsets and counts must be "
                "integers that int64 holds (int64, int32, uint32, ...); checking whether other "
                "values are whole numbers would need them on the host"
            )
        return t if t.dtype == torch.int64 and t.is_contiguous() else t.to(torch.int64)

    def collection(
        self,
        columns: Mapping[str, Any],
        coll: JaggedCollection,
        value: Any,
        counts: Any,
        n_rows: int,
        bad: list[torch.Tensor],
    ) -> list[torch.Tensor]:
        """Safe offsets, then the fields cut to a common length (see ``match``); appends to
        ``bad`` the number of offsets entries that break the offsets rule (a device scalar)."""
        name, counts_name = coll.offsets_name, coll.counts_name
        names = coll.field_input_names
        fields = [self.feature(columns[n], f, n) for f, n in zip(coll.fields, names, strict=True)]
        n_total = min(len(f) for f in fields)
        if any(len(f) != n_total for f in fields):
            fields = [f[:n_total] for f in fields]
        made = None
        if counts is not None:
            made = pad(torch.cumsum(self.integers(counts, counts_name), 0), (1, 0))
        offsets = made if value is None else self.integers(value, name)
        if len(offsets) == 0:
            raise InputError(f"{name!r} is empty: offsets have one entry per row plus one (>= 1)")
        # In [0, n_total] and never decreasing: equal to the offsets exactly where they are valid.
        safe = torch.cummax(offsets.clamp(0, n_total), 0).values
        wrong = torch.ne(safe, offsets).sum()
        if made is not None and value is None:
            wrong = wrong + (made[-1] != n_total)  # counts cover the fields exactly
        elif made is not None:
            if len(made) != len(offsets):
                raise InputError(
                    f"{name!r} describes {len(offsets) - 1} rows and {counts_name!r} "
                    f"{len(made) - 1}: give one of them, or make them describe the same rows"
                )
            wrong = wrong + torch.ne(made, offsets - offsets[:1]).sum()
        if n_rows >= 0 and len(safe) - 1 != n_rows:
            raise InputError(
                f"{name!r} (or {counts_name!r}) describes {len(safe) - 1} rows, but the input "
                f"has {n_rows} rows: offsets need one entry per row plus one"
            )
        bad.append(wrong)
        return [safe, *fields]

    def prepare(
        self, columns: Mapping[str, Any]
    ) -> tuple[list[torch.Tensor], int, torch.Tensor | None]:
        """The graph's inputs in order, the number of rows, and the verdict: ``None`` (nothing
        to check), or a float64 device vector read by ``problems``."""
        bad: list[torch.Tensor] = []
        tensors, n_rows = match(
            self.contract, columns, self.feature, partial(self.collection, bad=bad)
        )
        parts = []
        if self.screen and n_rows:
            n_flat = len(self.contract.flat)
            floats = tensors[:n_flat] + [t for t in tensors[n_flat:] if t.dtype == torch.float32]
            # A float64 sum of float32 values cannot overflow: it is finite iff every value is.
            parts.append(
                (floats[0] if len(floats) == 1 else torch.cat(floats)).sum(dtype=torch.float64)
            )
        if bad:
            parts.append(sum(bad[1:], bad[0]))
        verdict = torch.stack(parts).to(torch.float64) if parts and n_rows else None
        return tensors, n_rows, verdict

    def problems(self, values: list[float]) -> list[str]:
        """What a verdict's values (``verdict.tolist()``) say is wrong; empty if nothing."""
        found = []
        if self.screen and values and not math.isfinite(values[0]):
            found.append("NaN or Inf in a feature")
        if self.contract.jagged and values and values[-1]:
            found.append(f"{int(values[-1])} offsets or counts entries that break the offsets rule")
        return found

    def chunk(self, tensors: list[torch.Tensor], start: int, stop: int) -> list[torch.Tensor]:
        """Rows ``start:stop`` of prepared inputs as views: offsets index the whole fields."""
        pos = len(self.contract.flat)
        out = [t[start:stop] for t in tensors[:pos]]
        for coll in self.contract.jagged:
            out += [tensors[pos][start : stop + 1], *tensors[pos + 1 : pos + 1 + len(coll.fields)]]
            pos += 1 + len(coll.fields)
        return out
