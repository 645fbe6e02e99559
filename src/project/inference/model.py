"""``load()`` and the loaded model: SoA columns in, SoA outputs out, on one thread per call."""

from __future__ import annotations

import contextlib
import copy
import threading
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from project.contract import InputContract
from project.inference.backends import FORMATS, Backend, OnnxBackend, open_backend
from project.inference.columns import to_columns
from project.inference.errors import ArtifactError, InputError, ParityFailedError
from project.inference.export_dir import Artifact, ExportDir, choose_artifact, read_export
from project.inference.export_dir import verify_file as _verify
from project.inference.prepare import F32, InputPlan, Workspace
from project.inference.tensors import TensorPlan
from project.inference.threads import ThreadPolicy, ThreadPolicyError, apply_torch_policy

DEFAULT_MAX_BATCH = 4096
_NO_STREAM = contextlib.nullcontext()
_NO_LIMIT = 2**62  # max_batch on CUDA: one call for any batch


class InferenceModel:
    """An exported model ready to run on SoA inputs; made by ``load``.

    Call it with a mapping of column name to 1-D array (jagged collections as field arrays
    plus ``<collection>_offsets`` or ``_counts``), an Arrow table or batch, or an awkward
    record array; it returns ``{output name: (n_rows,) float32}``. Threads may share it: each
    has its own buffers (``threading.local``), and no lock is held around the backend.

    On CUDA (and on the CPU for torch tensor columns) the columns are tensors, DLPack arrays
    (CuPy) or ``__cuda_array_interface__`` arrays, taken without a copy on the caller's stream,
    and the outputs are tensors on the device. The checks that need values (NaN/Inf with
    ``nan_policy="raise"``, the offsets rule) run on the device without synchronising: a later
    call of the same thread, or ``synchronize()``, raises ``InputError`` for a call that failed
    them (see ``__call__`` and ``TensorPlan``).

    Attributes
    ----------
    backend : str
        ``torchscript``, ``aoti`` or ``onnx``; ``runner`` is the loaded ``Backend``.
    device : torch.device
        Where the artifact runs (``cpu``, or ``cuda:N``).
    artifact : Path
        The loaded file (its sha256 was verified against the manifest).
    policy, threads
        The ``ThreadPolicy`` applied at load, and what was observed after applying it.
    max_batch, nan_policy, reuse_outputs
        As given to ``load``; ``selection`` says why preferred backends were passed over.
    """

    def __init__(
        self,
        export: ExportDir,
        artifact: Artifact,
        runner: Backend,
        policy: ThreadPolicy,
        threads: dict[str, Any],
        selection: list[str],
        *,
        device: torch.device,
        max_batch: int,
        nan_policy: str,
        reuse_outputs: bool,
    ) -> None:
        if not isinstance(max_batch, (int, np.integer)) or isinstance(max_batch, bool):
            raise TypeError(f"max_batch must be an integer, got {max_batch!r}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.export, self.runner, self.policy, self.threads = export, runner, policy, threads
        self.contract: InputContract = export.contract
        self.output_names: tuple[str, ...] = export.output_names
        self.backend: str = artifact.format
        self.artifact: Path = export.path / artifact.file
        self.max_batch, self.selection, self.device = int(max_batch), selection, device
        self.reuse_outputs = reuse_outputs
        self._use_policy(nan_policy)
        contract = self.contract  # a column whose type says which path a call takes
        self._probe = (
            contract.flat[0].name if contract.flat else contract.jagged[0].field_input_names[0]
        )

    def _use_policy(self, nan_policy: str) -> None:
        """Plans for ``nan_policy`` and fresh per-thread state (buffers, pending checks)."""
        self._plan = InputPlan(self.contract, nan_policy)
        self._tensors = TensorPlan(self.contract, self.device, nan_policy == "raise")
        self.nan_policy, self._local = nan_policy, threading.local()

    def __repr__(self) -> str:
        return (
            f"InferenceModel({self.export.manifest['name']!r}, backend={self.backend!r}, "
            f"device={str(self.device)!r}, policy={self.policy.name!r}, max_batch={self.max_batch})"
        )

    def with_nan_policy(self, nan_policy: str) -> InferenceModel:
        """This model under another ``nan_policy``, sharing its loaded backend."""
        other = copy.copy(self)
        other._use_policy(nan_policy)
        return other

    @property
    def input_names(self) -> list[str]:
        """The graph's inputs, in order (the columns are matched by these names)."""
        return self.contract.input_names

    def workspace(self) -> Workspace:
        """The calling thread's reusable buffers (created on its first call)."""
        if not hasattr(self._local, "ws"):
            self._local.ws = Workspace()
        return self._local.ws

    def __call__(
        self,
        inputs: Any,
        *,
        out: Mapping[str, np.ndarray] | None = None,
        stream: Any = None,
        to_host: bool = False,
        validate: bool = False,
    ) -> dict[str, Any]:
        """``{output name: (n_rows,) float32}`` for SoA ``inputs`` (extra columns ignored).

        Numpy columns on the CPU: written into ``out`` (``{name: float32 array of >= n_rows}``)
        if given, else new arrays, or with ``reuse_outputs=True`` this thread's buffers (until
        its next call). Tensor columns (always on CUDA): tensors on the device, run on
        ``stream`` (a ``torch.cuda.Stream``, a ``cudaStream_t`` int, or an object with a ``ptr``
        such as a CuPy stream; default: the current one), numpy with ``to_host``; with
        ``validate=True`` this call waits for its value checks and raises naming the column."""
        cuda = self.device.type == "cuda"
        probe = inputs.get(self._probe) if isinstance(inputs, Mapping) else None
        tensors = cuda or isinstance(probe, torch.Tensor)
        if tensors and (out is not None or self.reuse_outputs):
            raise InputError(
                "out= and reuse_outputs take numpy outputs of numpy inputs on the CPU; "
                "tensor columns give new tensors (copy them where they are needed)"
            )
        if stream is not None and not cuda:
            raise InputError(f"stream= is for CUDA models; this one runs on {self.device}")
        if tensors:
            return self._call_tensors(inputs, stream, to_host, validate)
        ws = self.workspace()
        arrays, n_rows = self._plan.prepare(to_columns(inputs, self.contract), ws)
        outs = None if out is None and not self.reuse_outputs else self._outputs(n_rows, out, ws)
        self._check_threads()
        if 0 < n_rows <= self.max_batch:
            return dict(zip(self.output_names, self.runner.run(arrays, outs), strict=True))
        results = outs or [np.empty(n_rows, dtype=F32) for _ in self.output_names]
        for start in range(0, n_rows, self.max_batch):
            stop = min(start + self.max_batch, n_rows)
            chunk = self._plan.chunk(arrays, start, stop, ws)
            self.runner.run(chunk, [o[start:stop] for o in results])
        return dict(zip(self.output_names, results, strict=True))

    def _check_threads(self) -> None:
        # PyTorch's setting is process-wide: another library may have changed it since load.
        wanted = self.policy.intra_op
        if self.backend != "onnx" and wanted is not None and torch.get_num_threads() != wanted:
            raise ThreadPolicyError(
                f"PyTorch now runs {torch.get_num_threads()} intra-op threads, but this model "
                f"was loaded with the policy of {wanted}; something called "
                "torch.set_num_threads after load"
            )

    def _call_tensors(self, inputs: Any, stream: Any, to_host: bool, validate: bool) -> dict:
        if not isinstance(inputs, Mapping):
            raise InputError(
                f"a model on {self.device} takes a mapping of column name to tensor or device "
                f"array, not {type(inputs).__name__}"
            )
        if stream is not None and not isinstance(stream, torch.cuda.Stream):
            handle = stream if isinstance(stream, int) else getattr(stream, "ptr", None)
            if not isinstance(handle, int):
                raise InputError(
                    f"stream must be a torch.cuda.Stream, a cudaStream_t as an int or an object "
                    f"with an int ptr (a CuPy stream), not {type(stream).__name__}"
                )
            stream = torch.cuda.ExternalStream(handle, device=self.device)
        pending = self._pending()
        with torch.cuda.stream(stream) if stream is not None else _NO_STREAM:
            self._settle(pending, wait=False)
            tensors, n_rows, verdict = self._tensors.prepare(inputs)
            self._local.calls += 1
            if verdict is not None and (validate or self.device.type != "cuda"):
                if found := self._tensors.problems(verdict.tolist()):
                    self._raise_with_columns(inputs, found)
            elif verdict is not None:  # read at a later call, once the copy has arrived
                host = verdict.to("cpu", non_blocking=True)
                event = torch.cuda.Event()
                event.record()
                pending.append((self._local.calls, event, host))
            self._check_threads()
            if 0 < n_rows <= self.max_batch:
                results = self.runner.call(tensors)
            else:
                like = {"dtype": torch.float32, "device": self.device}
                results = [torch.empty(n_rows, **like) for _ in self.output_names]
                for start in range(0, n_rows, self.max_batch):
                    stop = min(start + self.max_batch, n_rows)
                    chunk = self.runner.call(self._tensors.chunk(tensors, start, stop))
                    for res, part in zip(results, chunk, strict=True):
                        res[start:stop].copy_(part)
            if to_host:
                results = [r.cpu().numpy() for r in results]
                self._settle(pending, wait=False)  # the copies waited for the stream
        return dict(zip(self.output_names, results, strict=True))

    def _pending(self) -> deque:
        if not hasattr(self._local, "pending"):
            self._local.pending, self._local.calls = deque(), 0
        return self._local.pending

    def _settle(self, pending: deque, wait: bool) -> None:
        """Read the verdicts of earlier calls that are ready (``wait``: all of them); an
        ``InputError`` names the first that failed (the next call reports the next)."""
        while pending and (wait or pending[0][1].query()):
            call, event, host = pending.popleft()
            event.synchronize()
            if found := self._tensors.problems(host.tolist()):
                raise InputError(
                    f"call {call} of this thread on {self.device} had {' and '.join(found)}, so "
                    "its outputs are not valid (the device checks inputs without waiting, and a "
                    "later call reports). Call with validate=True to have the column named, or "
                    "load with nan_policy='ignore' to pass NaN and Inf on."
                )

    def _raise_with_columns(self, inputs: Mapping[str, Any], found: list[str]) -> None:
        """``InputError`` for this call's failed ``inputs``: the host's message, which names the
        column, from a copy of the columns on the host (an error path), else ``found``."""
        names = {*self.input_names, *(c.counts_name for c in self.contract.jagged)}
        try:
            host = {
                k: self._tensors.tensor(v, k).cpu().numpy() for k, v in inputs.items() if k in names
            }
        except (TypeError, RuntimeError):  # a dtype numpy lacks (bfloat16)
            host = None
        if host is not None:
            self._plan.prepare(host, Workspace())
        raise InputError(
            f"invalid input values: {'; '.join(found)} (on {self.device} the whole field arrays "
            "given are screened, also objects of rows outside the offsets)"
        )

    def synchronize(self) -> None:
        """Wait for this thread's pending value checks on the device and raise ``InputError``
        for the first call that failed them (call it after a job's last call)."""
        self._settle(self._pending(), wait=True)

    predict = __call__

    def _outputs(
        self, n_rows: int, out: Mapping[str, np.ndarray] | None, ws: Workspace
    ) -> list[np.ndarray]:
        if out is None:
            return [ws.get(f"out:{name}", F32, n_rows) for name in self.output_names]
        if not isinstance(out, Mapping):
            raise InputError(
                f"out must be a mapping of output name to array ({', '.join(self.output_names)}), "
                f"not {type(out).__name__}"
            )
        arrays: list[np.ndarray] = []
        for name in self.output_names:
            arr = out.get(name)
            fits = isinstance(arr, np.ndarray) and arr.dtype == F32 and arr.ndim == 1
            if not (fits and len(arr) >= n_rows and arr.flags.c_contiguous and arr.flags.writeable):
                raise InputError(
                    f"out[{name!r}] must be a writable, contiguous 1-D float32 array of at "
                    f"least {n_rows} values; got {getattr(arr, 'dtype', type(arr))} "
                    f"{getattr(arr, 'shape', '')}"
                )
            arrays.append(view := arr[:n_rows])
            for other, other_name in zip(arrays[:-1], self.output_names, strict=False):
                if np.may_share_memory(view, other):
                    raise InputError(
                        f"out[{name!r}] and out[{other_name!r}] share memory: each output "
                        "needs its own array, or one would overwrite the other"
                    )
        return arrays


def check_golden(model: InferenceModel, artifact: Artifact) -> float:
    """Run the export's golden inputs and compare with its expected outputs, within the
    manifest's tolerance for the artifact's format; returns the largest absolute difference.
    ``ParityFailedError`` if the artifact does not reproduce them on this machine. The call
    also warms the backend up (TorchScript optimises on its first calls)."""
    arrays = model.export.golden()
    if model.device.type == "cuda":
        inputs = {n: torch.from_numpy(arrays[n]).to(model.device) for n in model.input_names}
        got = model(inputs, to_host=True, validate=True)
    else:
        got = model({n: arrays[n] for n in model.input_names})
    if (tolerance := model.export.manifest["tolerance"].get(artifact.format)) is None:
        raise ArtifactError(f"{model.export.path} states no tolerance for {artifact.format}")
    atol, rtol = tolerance["abs"], tolerance["rel"]
    worst = 0.0
    for name in model.output_names:
        diff = float(np.max(np.abs(got[name] - arrays[name]), initial=0.0))
        worst = max(worst, diff)
        if not np.allclose(got[name], arrays[name], atol=atol, rtol=rtol):
            raise ParityFailedError(
                f"{model.artifact} does not reproduce its golden output {name!r} on this "
                f"machine: max abs difference {diff:.3g} (tolerance abs {atol:g}, rel {rtol:g})"
            )
    return worst


def load(
    export_dir: str | Path,
    backend: str | None = None,
    *,
    device: str = "cpu",
    threads: ThreadPolicy | str = "single",
    max_batch: int | None = None,
    nan_policy: str = "raise",
    reuse_outputs: bool = False,
    onnx_optimization: str = "all",
    verify_golden: bool = True,
) -> InferenceModel:
    """Load an exported model for SoA inference.

    Parameters
    ----------
    export_dir
        A directory written by ``scripts/export.py``.
    backend
        ``"torchscript"``, ``"aoti"``, ``"onnx"``, or ``None``/``"auto"``: the first of
        ``PREFERENCE`` that passed parity and can run here (AOTInductor code needs the
        exporting torch build and CPU instruction set).
    device
        ``"cpu"``, or ``"cuda"`` / ``"cuda:N"``: the export's CUDA artifacts (TorchScript and
        AOTInductor; ONNX is exported for the CPU only), with inputs on that device.
    threads
        ``"single"`` (default: one PyTorch and ONNX Runtime thread each, sequential),
        ``"unrestricted"`` or a ``ThreadPolicy``; ``ThreadPolicyError`` if too late to apply.
    max_batch
        Rows per backend call; larger inputs are split (results equal up to rounding: about
        1e-7 relative for TorchScript and AOTInductor, bit-identical for ONNX Runtime).
        Default: ``DEFAULT_MAX_BATCH`` on the CPU, no limit on CUDA.
    nan_policy
        ``"raise"`` (NaN or Inf in an input is an ``InputError``; on CUDA reported by a later
        call, see ``InferenceModel``) or ``"ignore"``.
    reuse_outputs
        Return views of per-thread output buffers (valid until that thread's next call).
    onnx_optimization
        ONNX Runtime graph optimisation, ``"all"`` or ``"none"`` (each has its parity verdict).
    verify_golden
        Reproduce the export's golden outputs before returning.

    Raises
    ------
    MissingManifestError, IntegrityError, ParityFailedError, ArtifactError, ThreadPolicyError
    """
    where = _device(device)
    if backend not in (None, "auto", *FORMATS):
        raise ValueError(f"unknown backend {backend!r}; choose one of {FORMATS} or 'auto'")
    named = {"single": ThreadPolicy.single(), "unrestricted": ThreadPolicy.unrestricted()}
    policy = threads if isinstance(threads, ThreadPolicy) else named.get(threads)
    if policy is None:
        raise ValueError(f"threads must be a ThreadPolicy, 'single' or 'unrestricted': {threads!r}")
    # Before anything else touches PyTorch's pools: the inter-op size can only be set once.
    observed: dict[str, Any] = {"policy": policy.name}
    observed.update({f"torch_{k}": v for k, v in apply_torch_policy(policy).items()})
    export = read_export(export_dir)
    artifact, selection = choose_artifact(export, backend, where.type, onnx_optimization)
    path = export.file(artifact.file, f"{artifact.format} artifact")
    _verify(path, artifact.sha256, f"{artifact.format} artifact")
    try:
        runner = open_backend(artifact.format, path, str(where), policy, onnx_optimization)
    except Exception as err:
        raise ArtifactError(f"cannot load {path}: {type(err).__name__}: {err}") from err
    if isinstance(runner, OnnxBackend):
        opts = runner.session.get_session_options()
        observed["onnx_intra_op"] = opts.intra_op_num_threads
        observed["onnx_inter_op"] = opts.inter_op_num_threads
        observed["onnx_execution_mode"] = str(opts.execution_mode).rsplit(".", 1)[-1]
    if max_batch is None:
        max_batch = DEFAULT_MAX_BATCH if where.type == "cpu" else _NO_LIMIT
    options = {"max_batch": max_batch, "nan_policy": nan_policy, "reuse_outputs": reuse_outputs}
    options["device"] = where
    model = InferenceModel(export, artifact, runner, policy, observed, selection, **options)
    if verify_golden:
        check_golden(model, artifact)
        model._local = threading.local()  # the caller's first call is its call 1
    return model


def _device(device: str) -> torch.device:
    """``device`` as a ``torch.device`` with its index; ``ValueError`` for one that cannot run."""
    try:
        where = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r}: {err}") from err
    if where.type not in ("cpu", "cuda"):
        raise ValueError(f"device {device!r}: the runtime runs on 'cpu' or 'cuda[:N]'")
    if where.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r}: no CUDA device is usable here")
        index = torch.cuda.current_device() if where.index is None else where.index
        if index >= (count := torch.cuda.device_count()):
            raise ValueError(f"device {device!r}: this machine has {count} CUDA device(s)")
        where = torch.device("cuda", index)
    return where
