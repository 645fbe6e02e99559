"""``load()`` and the loaded model: SoA columns in, SoA outputs out, on one thread per call."""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from project.contract import InputContract
from project.inference.backends import FORMATS, open_backend
from project.inference.columns import to_columns
from project.inference.errors import ArtifactError, InputError, ParityFailedError
from project.inference.export_dir import Artifact, ExportDir, choose_artifact, read_export
from project.inference.export_dir import verify_file as _verify
from project.inference.prepare import F32, InputPlan
from project.inference.runners import OnnxRunner, Runner, TorchRunner
from project.inference.threads import ThreadPolicy, apply_torch_policy
from project.inference.workspace import Workspace

DEFAULT_MAX_BATCH = 4096


class InferenceModel:
    """An exported model ready to run on SoA inputs; made by ``load``.

    Call it with a mapping of column name to 1-D numpy array (jagged collections as flat field
    arrays plus ``<collection>_offsets`` or ``<collection>_counts``), a ``pyarrow.Table`` or
    ``RecordBatch``, or an awkward record array. It returns ``{output name: (n_rows,) float32}``.

    Buffers: a column that is the same array object as in the calling thread's previous
    call keeps the tensor (or ONNX Runtime binding) made for it then, and the backend reads
    its current values: a host that refills the same buffers for every call pays no
    per-column set-up. The model therefore keeps a reference to each thread's last
    zero-copy columns until that thread's next call.

    Threads: one model may be shared by any number of threads. Each calling thread gets its own
    conversion buffers (and ONNX Runtime I/O binding) through ``threading.local``, and the
    backends' run calls are safe to call concurrently, so no lock is held around a call. (An
    AOTInductor model runs one call at a time internally; other threads wait for it.)

    Attributes
    ----------
    backend : str
        ``torchscript``, ``aoti`` or ``onnx``.
    artifact : Path
        The loaded file (its sha256 was verified against the manifest).
    policy : ThreadPolicy
        The threading policy applied at load (``single`` by default).
    threads : dict
        What was observed after applying it: PyTorch intra-/inter-op threads and, for ONNX,
        the session's intra-/inter-op threads and execution mode.
    max_batch : int
        Larger inputs are evaluated in chunks of at most this many rows.
    nan_policy : str
        ``raise`` (NaN or Inf in an input is an ``InputError``) or ``ignore``.
    reuse_outputs : bool
        Whether results are views of per-thread output buffers (see ``__call__``).
    selection : list[str]
        Why preferred backends were passed over (for ``backend=None``).
    """

    def __init__(
        self,
        export: ExportDir,
        artifact: Artifact,
        runner: Runner,
        policy: ThreadPolicy,
        threads: dict[str, Any],
        *,
        max_batch: int,
        nan_policy: str,
        reuse_outputs: bool,
        selection: list[str],
    ) -> None:
        if not isinstance(max_batch, (int, np.integer)) or isinstance(max_batch, bool):
            raise TypeError(f"max_batch must be an integer, got {max_batch!r}")
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        self.export = export
        self.contract: InputContract = export.contract
        self.output_names: tuple[str, ...] = export.output_names
        self.backend: str = artifact.format
        self.artifact: Path = export.path / artifact.file
        self.policy = policy
        self.threads = threads
        self.max_batch = int(max_batch)
        self.nan_policy = nan_policy
        self.reuse_outputs = reuse_outputs
        self.selection = selection
        self.runner = runner
        self._plan = InputPlan(self.contract, nan_policy)
        self._local = threading.local()

    def __repr__(self) -> str:
        return (
            f"InferenceModel({self.export.manifest.get('name')!r}, backend={self.backend!r}, "
            f"policy={self.policy.name!r}, max_batch={self.max_batch})"
        )

    def with_nan_policy(self, nan_policy: str) -> InferenceModel:
        """This model under another ``nan_policy``, sharing its loaded backend (the artifact
        is not loaded a second time); its buffers and thread state are its own."""
        other = copy.copy(self)
        other.nan_policy = nan_policy
        other._plan = InputPlan(self.contract, nan_policy)
        other._local = threading.local()
        return other

    @property
    def input_names(self) -> list[str]:
        """The graph's inputs, in order (the columns are matched by these names)."""
        return self.contract.input_names

    def workspace(self) -> Workspace:
        """The calling thread's reusable buffers (created on its first call)."""
        try:
            return self._local.ws
        except AttributeError:
            self._local.ws = Workspace()
            return self._local.ws

    def __call__(
        self, inputs: Any, *, out: Mapping[str, np.ndarray] | None = None
    ) -> dict[str, np.ndarray]:
        """Evaluate the model on SoA ``inputs``.

        Parameters
        ----------
        inputs
            Mapping of column name to 1-D array (extra columns are ignored), a pyarrow
            ``Table``/``RecordBatch`` or an awkward record array.
        out
            Optional preallocated outputs, ``{name: float32 array of >= n_rows}``, written in
            place (ONNX Runtime writes into them directly). After a first call of that size,
            a call then allocates no numpy memory at all (the backend's working memory aside).

        Returns
        -------
        ``{output name: (n_rows,) float32}``, one value per input row. Without ``out`` the
        arrays belong to the caller, unless the model was loaded with ``reuse_outputs=True``:
        then they are views of this thread's buffers, overwritten by its next call.
        """
        try:
            ws = self._local.ws
        except AttributeError:
            ws = self.workspace()
        columns = inputs if type(inputs) is dict else to_columns(inputs, self.contract)
        arrays, n_rows = self._plan.prepare(columns, ws)
        outs = None if out is None and not self.reuse_outputs else self._outputs(n_rows, out, ws)
        if n_rows == 0:
            results = outs or [np.empty(0, dtype=F32) for _ in self.output_names]
        elif n_rows <= self.max_batch:
            results = self.runner.run(arrays, n_rows, outs, ws)
        else:
            if outs is None:
                outs = [np.empty(n_rows, dtype=F32) for _ in self.output_names]
            for start in range(0, n_rows, self.max_batch):
                stop = min(start + self.max_batch, n_rows)
                chunk = self._plan.chunk(arrays, start, stop, ws)
                self.runner.run(chunk, stop - start, [o[start:stop] for o in outs], ws)
            results = outs
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
        arrays = []
        for name in self.output_names:
            arr = out.get(name)
            if (
                not isinstance(arr, np.ndarray)
                or arr.dtype != F32
                or arr.ndim != 1
                or arr.shape[0] < n_rows
                or not arr.flags.c_contiguous
                or not arr.flags.writeable
            ):
                raise InputError(
                    f"out[{name!r}] must be a writable, contiguous 1-D float32 array of at "
                    f"least {n_rows} values; got {getattr(arr, 'dtype', type(arr))} "
                    f"{getattr(arr, 'shape', '')}"
                )
            view = arr[:n_rows]
            for other, other_name in zip(arrays, self.output_names, strict=False):
                if np.may_share_memory(view, other):
                    raise InputError(
                        f"out[{name!r}] and out[{other_name!r}] share memory: each output "
                        "needs its own array, or one would overwrite the other"
                    )
            arrays.append(view)
        return arrays


def _policy(threads: ThreadPolicy | str) -> ThreadPolicy:
    if isinstance(threads, ThreadPolicy):
        return threads
    if threads == "single":
        return ThreadPolicy.single()
    if threads == "unrestricted":
        return ThreadPolicy.unrestricted()
    raise ValueError(f"threads must be a ThreadPolicy, 'single' or 'unrestricted', not {threads!r}")


def _observed_threads(policy: ThreadPolicy, torch_threads: dict, runner: Runner) -> dict:
    threads: dict[str, Any] = {"policy": policy.name}
    threads.update({f"torch_{k}": v for k, v in torch_threads.items()})
    if isinstance(runner, OnnxRunner):
        opts = runner.session.get_session_options()
        threads["onnx_intra_op"] = opts.intra_op_num_threads
        threads["onnx_inter_op"] = opts.inter_op_num_threads
        threads["onnx_execution_mode"] = str(opts.execution_mode).rsplit(".", 1)[-1]
    return threads


def check_golden(model: InferenceModel, artifact: Artifact) -> float:
    """Run the export's golden inputs and compare with its expected outputs.

    Uses the artifact's parity tolerance; returns the largest absolute difference. Raises
    ``ParityFailedError`` if the artifact does not reproduce them on this machine. The call
    also warms the backend up (TorchScript optimises on its first calls).
    """
    golden = model.export.manifest["golden"]
    _verify(model.export.golden_file, golden["sha256"], "golden file")
    with np.load(model.export.golden_file) as data:
        arrays = {k: data[k] for k in data.files}
    got = model(arrays)
    atol, rtol = artifact.tolerance
    worst = 0.0
    for name in model.output_names:
        expected = arrays[name]
        diff = float(np.max(np.abs(got[name] - expected), initial=0.0))
        worst = max(worst, diff)
        if not np.allclose(got[name], expected, atol=atol, rtol=rtol):
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
        A directory written by ``scripts/export.py`` (``manifest.json`` plus artifacts).
    backend
        ``"torchscript"``, ``"aoti"``, ``"onnx"``, or ``None``/``"auto"``: the first of
        ``export_dir.PREFERENCE`` (``aoti``, ``onnx``, ``torchscript``: fastest first, as
        measured by ``scripts/benchmark.py inference``) whose parity check passed and that can
        run here (AOTInductor code needs the exporting torch build and CPU instruction set).
    device
        Only ``"cpu"``: the deployment target of this runtime.
    threads
        ``"single"`` (default; PyTorch intra-/inter-op threads 1, ONNX Runtime one intra- and
        one inter-op thread, sequential execution), ``"unrestricted"`` or a ``ThreadPolicy``.
        Applied to PyTorch once per process and checked: ``ThreadPolicyError`` if it is too late.
    max_batch
        Rows evaluated per backend call; larger inputs are split. The results are those of
        one call up to rounding: TorchScript's and AOTInductor's kernels round differently
        for different batch sizes (about 1e-7 relative); ONNX Runtime's are bit-identical.
    nan_policy
        ``"raise"`` (default: NaN or Inf in an input is an ``InputError``) or ``"ignore"``.
    reuse_outputs
        Return views of per-thread output buffers (valid until that thread's next call).
    onnx_optimization
        ONNX Runtime graph optimisation, ``"all"`` or ``"none"`` (each has its parity verdict).
    verify_golden
        Run the export's golden rows and compare with their expected outputs before returning.

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
    policy = _policy(threads)
    # Before anything else touches PyTorch's pools: the inter-op size can only be set once.
    torch_threads = apply_torch_policy(policy)
    export = read_export(export_dir)
    artifact, selection = choose_artifact(export, backend, device, onnx_optimization)
    path = export.path / artifact.file
    _verify(path, artifact.sha256, f"{artifact.format} artifact")
    try:
        raw = open_backend(artifact.format, path, device, policy, onnx_optimization)
    except Exception as err:
        raise ArtifactError(f"cannot load {path}: {type(err).__name__}: {err}") from err
    runner = OnnxRunner(raw) if artifact.format == "onnx" else TorchRunner(raw, policy)
    model = InferenceModel(
        export,
        artifact,
        runner,
        policy,
        _observed_threads(policy, torch_threads, runner),
        max_batch=max_batch,
        nan_policy=nan_policy,
        reuse_outputs=reuse_outputs,
        selection=selection,
    )
    if verify_golden:
        check_golden(model, artifact)
    return model
