"""The predict job: score many input files with an export, one output per input.

``python scripts/predict.py export=exported/<name> 'files=[ntuples/*.root]' out=scores/``
(``configs/predict.yaml``). The job

1. checks, before any work, that the output directory is writable, that every input exists
   and has a format (``.root``, ``.parquet``), that no two inputs write one output, and loads
   the export once (its hashes verified, its golden rows replayed);
2. skips inputs whose output exists and was made by the same export and settings (outputs
   are published atomically, so an existing one is complete and an interrupted job resumes);
   ``overwrite=true`` redoes them;
3. plans each remaining file (its columns checked against the export's contract, its chunks)
   and scores it chunk by chunk (``project.predict.tasks``), in this process or on a Dask
   cluster; the same functions run in both, on the same chunks, so the results are the same;
4. writes each file's output (``project.predict.outputs``) when all its chunks are scored; a
   file that fails is reported and gets no output, and the other files go on.

The export alone says how to read an input: the contract in its manifest carries every
feature's expression, the jagged collections and ``per_object``. The training selection is
not applied unless ``apply_selection=true`` (rows outside it then get NaN scores).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from project.contract import ContractError
from project.data.expressions import resolve_files
from project.inference import DEFAULT_MAX_BATCH, FORMATS
from project.predict.outputs import (
    DEFAULT_TREE,
    OutputError,
    check_outputs,
    check_writable,
    input_format,
    output_path,
    read_provenance,
    write_output,
)
from project.predict.tasks import (
    DEFAULT_IDS,
    ChunkScores,
    ExportRef,
    FilePlan,
    InputFile,
    open_export,
    plan_file,
    score_chunk,
)

OUTPUT_FORMATS = ("auto", "root", "parquet")


class PredictError(RuntimeError):
    """A job refused before any work: its inputs or settings cannot be used as given."""


@dataclass(frozen=True)
class PredictSettings:
    """What a predict job does (the keys of ``configs/predict.yaml``).

    Parameters
    ----------
    export
        Export directory (``exported/<name>``).
    files
        Input paths and glob patterns (ROOT ``.root``, Parquet ``.parquet``).
    out
        Output directory; created if needed.
    format
        ``root`` (a friend tree), ``parquet``, or ``auto``: the input's own format.
    tree
        TTree of the ROOT inputs (``None``: each file's only TTree); the friend tree gets its
        name. A ROOT output of a Parquet input is named ``Events``.
    suffix
        Appended to the input's file name stem to name its output.
    apply_selection
        Score only rows where the contract's selection holds; the others get NaN.
    overwrite
        Redo outputs that exist.
    backend
        ``auto`` (the runtime's choice, made once by the job) or a format of the export.
    step_size
        ROOT entries per chunk (one task), or a memory size such as ``"100 MB"``; Parquet
        inputs are chunked by row group.
    max_batch
        Rows per model call.
    ids
        Event identifiers kept where present; without any, the entry number (``entry``).
    progress
        Show progress bars over files and entries (on standard error).
    """

    export: str
    files: tuple[str, ...]
    out: str
    format: str = "auto"
    tree: str | None = None
    suffix: str = "_scores"
    apply_selection: bool = False
    overwrite: bool = False
    backend: str = "auto"
    step_size: int | str = 100_000
    max_batch: int = DEFAULT_MAX_BATCH
    ids: tuple[str, ...] = DEFAULT_IDS
    progress: bool = True

    def __post_init__(self) -> None:
        if self.format not in OUTPUT_FORMATS:
            raise PredictError(f"format={self.format!r}: choose one of {OUTPUT_FORMATS}")
        if self.backend not in ("auto", *FORMATS):
            raise PredictError(f"backend={self.backend!r}: choose auto or one of {FORMATS}")
        if isinstance(self.files, str):
            object.__setattr__(self, "files", (self.files,))
        object.__setattr__(self, "files", tuple(map(str, self.files)))
        object.__setattr__(self, "ids", tuple(self.ids))


@dataclass
class FileResult:
    """What became of one input: ``written``, ``skipped`` (its output was there) or ``failed``
    (with the reason); ``entries`` and ``rows`` scored (rows are objects with ``per_object``)."""

    input: str
    output: str
    status: str
    entries: int = 0
    rows: int = 0
    error: str | None = None


@dataclass
class PredictReport:
    """The outcome of a job: one ``FileResult`` per input, and the scoring time."""

    export: str
    backend: str
    results: list[FileResult]
    seconds: float
    where: str = "in-process"

    def count(self, status: str) -> int:
        """Inputs with ``status``."""
        return sum(r.status == status for r in self.results)

    @property
    def failures(self) -> list[FileResult]:
        """The inputs that failed, with their reasons."""
        return [r for r in self.results if r.status == "failed"]

    @property
    def rows(self) -> int:
        """Rows scored by this job."""
        return sum(r.rows for r in self.results)

    @property
    def rows_per_second(self) -> float:
        """Rows scored per second of the job's scoring (planning, reading and writing in)."""
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def print_summary(self, stream: Any = None) -> None:
        """The summary table (files, rows, rows/s, failures), then each failure's reason."""
        from rich.console import Console
        from rich.table import Table

        console = Console(file=stream or sys.stderr, width=120)
        table = Table(title=f"predict: {self.export} ({self.backend}, {self.where})")
        for name in ("files", "written", "skipped", "failed", "entries", "rows", "s", "rows/s"):
            table.add_column(name, justify="right")
        table.add_row(
            str(len(self.results)),
            str(self.count("written")),
            str(self.count("skipped")),
            str(self.count("failed")),
            f"{sum(r.entries for r in self.results):,}",
            f"{self.rows:,}",
            f"{self.seconds:.1f}",
            f"{self.rows_per_second:,.0f}",
        )
        console.print(table)
        for failure in self.failures:
            console.print(f"failed: {failure.input}: {failure.error}", highlight=False)


@dataclass
class Job:
    """A checked job: the export, and the inputs left to score."""

    settings: PredictSettings
    ref: ExportRef
    collection: str | None
    order: list[str]
    pending: list[tuple[InputFile, Path, str]] = field(default_factory=list)
    done: list[FileResult] = field(default_factory=list)

    def provenance(self, item: InputFile, fmt: str) -> dict[str, Any]:
        """How an output of ``item`` is made; a rerun skips an output made the same way."""
        return {
            "export": self.ref.path,
            "manifest_sha256": self.ref.manifest_sha256,
            "backend": self.ref.backend,
            "input": item.path,
            "apply_selection": self.settings.apply_selection,
            "format": fmt,
        }


def _inputs(patterns: Sequence[str]) -> list[str]:
    """Every input, globs expanded, in the order given, as absolute paths; ``PredictError``
    listing the patterns that match nothing."""
    found, missing = [], []
    for pattern in patterns:
        try:
            found += resolve_files(pattern, "input")
        except ContractError:
            missing.append(pattern)
    if missing:
        raise PredictError(f"no input file at {missing}; check the paths and glob patterns")
    if not found:
        raise PredictError("files= names no input file")
    # Absolute, so that a worker started in another directory finds them (URLs as they are).
    return list(dict.fromkeys(f if "://" in f else str(Path(f).absolute()) for f in found))


def prepare(settings: PredictSettings) -> Job:
    """Check a job before any work (module docstring, step 1 and 2).

    Raises
    ------
    OutputError
        The output directory is not writable, or outputs would collide.
    PredictError
        An input is missing or of no known format.
    ArtifactError, IntegrityError
        The export is refused (see ``project.inference.load``).
    """
    check_writable(settings.out)
    paths = _inputs(settings.files)
    try:
        formats = [input_format(p) for p in paths]
    except ValueError as err:
        raise PredictError(str(err)) from None
    out_formats = [f if settings.format == "auto" else settings.format for f in formats]
    outputs = [
        output_path(p, settings.out, f, settings.suffix)
        for p, f in zip(paths, out_formats, strict=True)
    ]
    check_outputs(paths, outputs)
    ref, model = open_export(settings.export, settings.backend, settings.max_batch)
    job = Job(settings, ref, model.contract.per_object, order=paths)
    for path, fmt, out_fmt, out in zip(paths, formats, out_formats, outputs, strict=True):
        item = InputFile(path, fmt, settings.tree if fmt == "root" else None)
        if out.exists() and not settings.overwrite:
            made, wanted = read_provenance(out, out_fmt), job.provenance(item, out_fmt)
            if made == wanted:
                job.done.append(FileResult(path, str(out), "skipped"))
                continue
            if made is None:
                how = "it records no provenance (it was not written by the predict job)"
            else:
                differ = {k: made.get(k) for k in wanted if made.get(k) != wanted[k]}
                how = f"it was made with {differ}"
            error = f"{out} exists, but not as this job would make it: {how}; set overwrite=true"
            job.done.append(FileResult(path, str(out), "failed", error=error + " to redo it"))
            continue
        job.pending.append((item, out, out_fmt))
    return job


class _Progress:
    """Progress bars over files and entries, with the rows scored (tqdm, on standard error).
    The entries of a file join the total when it is planned."""

    def __init__(self, n_files: int, enabled: bool) -> None:
        from tqdm import tqdm

        self.files = tqdm(total=n_files, desc="files", unit="file", disable=not enabled)
        self.entries = tqdm(
            total=0, desc="entries", unit="entry", unit_scale=True, disable=not enabled
        )
        self.rows = 0

    def planned(self, plan: FilePlan) -> None:
        self.entries.total += plan.n_entries
        self.entries.refresh()

    def scored(self, chunk: ChunkScores) -> None:
        self.rows += chunk.n_rows
        self.entries.set_postfix_str(f"{self.rows:,} rows", refresh=False)
        self.entries.update(chunk.n_entries)

    def close(self) -> None:
        self.files.close()
        self.entries.close()


def _error(err: BaseException) -> str:
    return f"{type(err).__name__}: {err}"


def _write(
    job: Job, item: InputFile, out: Path, fmt: str, plan: FilePlan, chunks: list[ChunkScores]
) -> FileResult:
    tree = plan.tree or job.settings.tree or DEFAULT_TREE
    write_output(out, fmt, tree, job.collection, chunks, job.provenance(item, fmt))
    entries = sum(c.n_entries for c in chunks)
    return FileResult(item.path, str(out), "written", entries, sum(c.n_rows for c in chunks))


def _plan_args(job: Job) -> tuple[Any, ...]:
    s = job.settings
    return (s.ids, s.apply_selection, s.step_size)


def _run_here(job: Job, progress: _Progress) -> list[FileResult]:
    results = []
    for item, out, fmt in job.pending:
        try:
            plan = plan_file(job.ref, item, *_plan_args(job))
            progress.planned(plan)
            chunks = []
            for index in range(len(plan.chunks)):
                chunks.append(score_chunk(job.ref, plan, index))
                progress.scored(chunks[-1])
            results.append(_write(job, item, out, fmt, plan, chunks))
        except Exception as err:
            results.append(FileResult(item.path, str(out), "failed", error=_error(err)))
        progress.files.update()
    return results


@dataclass
class _FileTasks:
    """One file's tasks on the cluster, until its output is written or it fails."""

    item: InputFile
    out: Path
    fmt: str
    plan: FilePlan | None = None
    plan_future: Any = None
    futures: list[Any] = field(default_factory=list)
    chunks: list[ChunkScores | None] = field(default_factory=list)
    result: FileResult | None = None


def _run_dask(job: Job, client: Any, progress: _Progress) -> list[FileResult]:
    """Plan every file on the cluster, then score its chunks there as each plan arrives; the
    job writes each output when its last chunk is in."""
    from distributed import as_completed

    files = [_FileTasks(item, out, fmt) for item, out, fmt in job.pending]
    role: dict[str, tuple[_FileTasks, int | None]] = {}
    plans = []
    for ft in files:
        ft.plan_future = client.submit(plan_file, job.ref, ft.item, *_plan_args(job), pure=False)
        role[ft.plan_future.key] = (ft, None)
        plans.append(ft.plan_future)
    pending = as_completed(plans)
    for future in pending:
        ft, index = role.pop(future.key)
        if ft.result is not None:  # the file failed already; its other tasks were cancelled
            continue
        try:
            if future.status == "error":
                raise future.exception()
            if future.status != "finished":
                raise RuntimeError(f"task {future.key} was {future.status}")
            if index is None:
                ft.plan = future.result()
                progress.planned(ft.plan)
                ft.chunks = [None] * len(ft.plan.chunks)
                for i in range(len(ft.plan.chunks)):
                    task = client.submit(score_chunk, job.ref, ft.plan_future, i, pure=False)
                    role[task.key] = (ft, i)
                    ft.futures.append(task)
                    pending.add(task)
                continue
            ft.chunks[index] = future.result()
            progress.scored(ft.chunks[index])
            if any(c is None for c in ft.chunks):
                continue
            ft.result = _write(job, ft.item, ft.out, ft.fmt, ft.plan, ft.chunks)
        except Exception as err:
            ft.result = FileResult(ft.item.path, str(ft.out), "failed", error=_error(err))
            client.cancel([f for f in ft.futures if not f.done()])
        # The file is finished: let the cluster release its plan and chunks.
        ft.plan_future, ft.futures, ft.chunks = None, [], []
        progress.files.update()
    return [ft.result for ft in files]


def execute(job: Job, client: Any = None) -> PredictReport:
    """Score the job's pending inputs, in this process or through the Dask ``client``.

    Returns the report of every input (the skipped and refused ones of ``prepare`` too), in
    the order given.
    """
    progress = _Progress(len(job.pending), job.settings.progress)
    started = time.perf_counter()
    try:
        results = _run_here(job, progress) if client is None else _run_dask(job, client, progress)
    finally:
        progress.close()
    seconds = time.perf_counter() - started
    by_input = {r.input: r for r in [*job.done, *results]}
    where = "in-process"
    if client is not None:
        where = f"Dask {type(getattr(client, 'cluster', None)).__name__}"
    return PredictReport(
        job.settings.export, job.ref.backend, [by_input[p] for p in job.order], seconds, where
    )


def predict(settings: PredictSettings, client: Any = None) -> PredictReport:
    """Check and run a job (``prepare``, then ``execute``)."""
    return execute(prepare(settings), client)


@contextlib.contextmanager
def dask_client(cluster_config: Any, workers: int) -> Iterator[Any]:
    """A Dask client of the cluster that ``cluster_config`` builds (``configs/cluster/``:
    a ``LocalCluster``, or dask-jobqueue's ``SLURMCluster`` or ``HTCondorCluster``), scaled
    to ``workers`` workers, closed when the block ends."""
    import hydra
    from distributed import Client

    # Dask's scheduler and nannies log every connection at INFO; the job keeps its warnings.
    logging.getLogger("distributed").setLevel(logging.WARNING)
    cluster = hydra.utils.instantiate(cluster_config, _convert_="all")
    try:
        cluster.scale(int(workers))
        with Client(cluster) as client:
            yield client
    finally:
        cluster.close()


def settings_from_config(cfg: Any) -> PredictSettings:
    """``PredictSettings`` from the composed ``configs/predict.yaml``."""
    files = cfg.files
    return PredictSettings(
        export=str(cfg.export),
        files=(files,) if isinstance(files, str) else tuple(files),
        out=str(cfg.out),
        format=cfg.format,
        tree=cfg.tree,
        suffix=cfg.suffix,
        apply_selection=bool(cfg.apply_selection),
        overwrite=bool(cfg.overwrite),
        backend=cfg.backend,
        step_size=cfg.step_size,
        max_batch=int(cfg.max_batch),
        ids=tuple(cfg.ids),
        progress=bool(cfg.progress),
    )


def run_predict(cfg: Any) -> PredictReport:
    """The job behind ``scripts/predict.py``: check, score (in-process, or on the cluster of
    ``cfg.cluster`` when it has a ``_target_``), print the summary."""
    job = prepare(settings_from_config(cfg))
    cluster = cfg.get("cluster")
    if job.pending and cluster and cluster.get("_target_"):
        with dask_client(cluster, cfg.workers) as client:
            # Every worker verifies the export's hashes at its first task (export_model).
            report = execute(job, client)
    else:
        report = execute(job)
    report.print_summary()
    return report


__all__ = [
    "FileResult",
    "Job",
    "OutputError",
    "PredictError",
    "PredictReport",
    "PredictSettings",
    "dask_client",
    "execute",
    "predict",
    "prepare",
    "run_predict",
    "settings_from_config",
]
