"""``load()`` and the loaded model: SoA columns in, SoA outputs out, on one thread per call."""

from __future__ import annotations

import copy
import threading
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
from project.inference.threads import ThreadPolicy, ThreadPolicyError, apply_torch_policy

DEFAULT_MAX_BATCH = 4096


class InferenceModel:
    """An exported model ready to run on SoA inputs; made by ``load``.

    Call it with a mapping of column name to 1-D array (jagged collections as field arrays
    plus ``<collection>_offsets`` or ``_counts``), an Arrow table or batch, or an awkward
    record array; it returns ``{output name: (n_rows,) float32}``. Threads may share it: each
    has its own buffers (``threading.local``), and no lock is held around the backend.

    Attributes
    ----------
    backend : str
        ``torchscript``, ``aoti`` or ``onnx``; ``runner`` is the loaded ``Backend``.
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
        self.max_batch, self.selection = int(max_batch), selection
        self.nan_policy, self.reuse_outputs = nan_policy, reuse_outputs
        self._plan = InputPlan(self.contract, nan_policy)
        self._local = threading.local()

    def __repr__(self) -> str:
        return (
            f"InferenceModel({self.export.manifest['name']!r}, backend={self.backend!r}, "
            f"policy={self.policy.name!r}, max_batch={self.max_batch})"
        )

    def with_nan_policy(self, nan_policy: str) -> InferenceModel:
        """This model under another ``nan_policy``, sharing its loaded backend."""
        other = copy.copy(self)
        other.nan_policy, other._plan = nan_policy, InputPlan(self.contract, nan_policy)
        other._local = threading.local()
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
        self, inputs: Any, *, out: Mapping[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """``{output name: (n_rows,) float32}`` for SoA ``inputs`` (extra columns ignored):
        written into ``out`` (``{name: float32 array of >= n_rows}``) if given, else new
        arrays, or with ``reuse_outputs=True`` this thread's buffers (until its next call)."""
        ws = self.workspace()
        arrays, n_rows = self._plan.prepare(to_columns(inputs, self.contract), ws)
        outs = None if out is None and not self.reuse_outputs else self._outputs(n_rows, out, ws)
        # PyTorch's setting is process-wide: another library may have changed it since load.
        wanted = self.policy.intra_op
        if self.backend != "onnx" and wanted is not None and torch.get_num_threads() != wanted:
            raise ThreadPolicyError(
                f"PyTorch now runs {torch.get_num_threads()} intra-op threads, but this model "
                f"was loaded with the policy of {wanted}; something called "
                "torch.set_num_threads after load"
            )
        if 0 < n_rows <= self.max_batch:
            return dict(zip(self.output_names, self.runner.run(arrays, outs), strict=True))
        results = outs or [np.empty(n_rows, dtype=F32) for _ in self.output_names]
        for start in range(0, n_rows, self.max_batch):
            stop = min(start + self.max_batch, n_rows)
            chunk = self._plan.chunk(arrays, start, stop, ws)
            self.runner.run(chunk, [o[start:stop] for o in results])
        return dict(zip(self.output_names, results, strict=True))

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
    max_batch: int = DEFAULT_MAX_BATCH,
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
        Only ``"cpu"``.
    threads
        ``"single"`` (default: one PyTorch and ONNX Runtime thread each, sequential),
        ``"unrestricted"`` or a ``ThreadPolicy``; ``ThreadPolicyError`` if too late to apply.
    max_batch
        Rows per backend call; larger inputs are split (results equal up to rounding: about
        1e-7 relative for TorchScript and AOTInductor, bit-identical for ONNX Runtime).
    nan_policy
        ``"raise"`` (NaN or Inf in an input is an ``InputError``) or ``"ignore"``.
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
    if device != "cpu":
        raise ValueError(
            f"device {device!r}: this runtime runs CPU artifacts (SoA columns in host memory); "
            "use project.inference.backends.open_backend for a GPU artifact"
        )
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
    artifact, selection = choose_artifact(export, backend, device, onnx_optimization)
    path = export.file(artifact.file, f"{artifact.format} artifact")
    _verify(path, artifact.sha256, f"{artifact.format} artifact")
    try:
        runner = open_backend(artifact.format, path, device, policy, onnx_optimization)
    except Exception as err:
        raise ArtifactError(f"cannot load {path}: {type(err).__name__}: {err}") from err
    if isinstance(runner, OnnxBackend):
        opts = runner.session.get_session_options()
        observed["onnx_intra_op"] = opts.intra_op_num_threads
        observed["onnx_inter_op"] = opts.inter_op_num_threads
        observed["onnx_execution_mode"] = str(opts.execution_mode).rsplit(".", 1)[-1]
    options = {"max_batch": max_batch, "nan_policy": nan_policy, "reuse_outputs": reuse_outputs}
    model = InferenceModel(export, artifact, runner, policy, observed, selection, **options)
    if verify_golden:
        check_golden(model, artifact)
    return model
