"""The predict job's units of work: planning one input file, and scoring one chunk of it.

Both run wherever the job sends them: in the job's own process (``cluster=none``) or on a Dask
worker. They take and return plain picklable values, and read everything they need from the
export and the input file themselves, so a worker needs nothing from the job but its
arguments. Each process loads the export once (``export_model``).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import awkward as ak
import numpy as np

from project.contract import MANIFEST_FILE, ContractError, Feature, InputContract
from project.data.expressions import Binding, TableSpec
from project.data.sources import Chunk, Source, read_arrays
from project.data.sources.parquet import ParquetSource
from project.data.sources.root import RootSource, open_tree
from project.inference import InferenceModel, IntegrityError, load
from project.utils import sha256_file
from project.utils.profiling import marked

# Event identifiers written beside the scores where the input has them; else the entry number.
DEFAULT_IDS = ("run", "luminosityBlock", "event")
ENTRY = "entry"
# The contract's selection, built as one more flat feature (0/1) of the rows.
SELECTED = "selected_by_contract_"


@dataclass(frozen=True)
class ExportRef:
    """The export every task scores with, as the job checked it.

    ``backend`` is the one the job's own load chose, never ``auto``: every worker runs the same
    artifact, so the scores do not depend on where a chunk ran.
    """

    path: str
    manifest_sha256: str
    backend: str
    max_batch: int


# One loaded model per export per process. load() verifies the manifest, every artifact's and
# the golden file's sha256, replays the golden rows and builds the backend's session: measured
# 0.14 s for a process's first load of the tests' small data=root MLP (ONNX), 0.02 s for the
# next ones, against 0.3-0.8 s to read and score a chunk of 50 events of the NanoAOD file
# (opening its 947-branch tree dominates); the hashing and ONNX Runtime's session set-up grow
# with the artifact, and an AOTInductor package takes 16 s to load under torch 2.10. A loaded
# session cannot be pickled and sent to a worker either. The key holds the manifest sha256
# that the job verified, so a worker of a long-lived cluster never scores with another export
# found under the same path.
_MODELS: dict[tuple[str, str, str, int], InferenceModel] = {}


def _key(ref: ExportRef) -> tuple[str, str, str, int]:
    return (str(Path(ref.path).resolve()), ref.manifest_sha256, ref.backend, ref.max_batch)


def open_export(path: str, backend: str, max_batch: int) -> tuple[ExportRef, InferenceModel]:
    """The job's own load of the export: checked, its backend chosen once (``auto``: the
    runtime's choice), and kept for the tasks this process runs.

    Raises what ``project.inference.load`` raises for an export it refuses.
    """
    model = load(path, None if backend == "auto" else backend, max_batch=max_batch)
    sha = sha256_file(Path(path) / MANIFEST_FILE)
    # Absolute, so that a worker started in another directory finds it.
    ref = ExportRef(str(Path(path).absolute()), sha, model.backend, max_batch)
    _MODELS[_key(ref)] = model
    return ref, model


def export_model(ref: ExportRef) -> InferenceModel:
    """The export of ``ref``, loaded (and its hashes verified) on the first call in a process.

    Raises
    ------
    IntegrityError
        The export's files fail their hashes, or its manifest is not the one the job checked
        (it was exported again while the job ran).
    ArtifactError, ParityFailedError
        The export cannot be used here (see ``project.inference.load``).
    """
    key = _key(ref)
    model = _MODELS.get(key)
    if model is None:
        model = load(ref.path, ref.backend, max_batch=ref.max_batch)
        found = sha256_file(Path(ref.path) / MANIFEST_FILE)
        if found != ref.manifest_sha256:
            raise IntegrityError(
                f"{Path(ref.path) / MANIFEST_FILE} has sha256 {found}, but the job started with "
                f"{ref.manifest_sha256}: the export changed while the job ran. Rerun the job so "
                "that every file is scored by one export."
            )
        _MODELS[key] = model
    return model


def check_export(ref: ExportRef) -> str:
    """Load and verify the export of ``ref`` in this process (once, see ``export_model``) and
    name the artifact loaded; for ``Client.run`` on every worker, which can send back a name
    but not a loaded model."""
    model = export_model(ref)
    return f"{model.backend}: {model.artifact}"


@dataclass(frozen=True)
class InputFile:
    """One input of the job: its path, ``root`` or ``parquet``, and the TTree asked for
    (ROOT only; ``None`` takes the file's only TTree)."""

    path: str
    format: str
    tree: str | None = None


@dataclass
class FilePlan:
    """An input file checked against the export's contract, and how it is read.

    Attributes
    ----------
    source
        The data layer's source of this one file.
    tree
        The TTree read (ROOT), which the friend tree is named after; ``None`` for Parquet.
    binding
        The contract (plus the selection as the flat feature ``SELECTED``, where it is
        applied) checked against the file's columns.
    ids
        The event identifier columns present in the file (empty: the entry number is written).
    chunks
        Entry ranges (ROOT) or row groups (Parquet); one task each.
    """

    source: Source
    tree: str | None
    binding: Binding
    ids: list[str]
    chunks: list[Chunk]

    @property
    def n_entries(self) -> int:
        """Events (tree entries, table rows) in the file."""
        return sum(c.n_rows for c in self.chunks)


def selection_contract(contract: InputContract) -> InputContract:
    """``contract`` with its selection as one more flat feature, ``SELECTED``.

    The data layer then builds it like any feature, one value per row (per object with
    ``per_object``, per event otherwise), by the same rules as training; it is a boolean
    feature, 1 where the selection holds.
    """
    if contract.selection is None:
        return contract
    mask = Feature(SELECTED, expr=contract.selection, boolean=True)
    return replace(contract, flat=(*contract.flat, mask))


def plan_file(
    ref: ExportRef,
    item: InputFile,
    ids: tuple[str, ...] | list[str] = DEFAULT_IDS,
    apply_selection: bool = False,
    step_size: int | str = 100_000,
) -> FilePlan:
    """Check ``item`` against the export's contract and split it into chunks.

    Parameters
    ----------
    ref
        The export (its contract says which columns are read and how rows are formed).
    item
        The input file.
    ids
        Event identifiers to keep where present.
    apply_selection
        Build the contract's selection, so that rows outside it are not scored.
    step_size
        ROOT entries per chunk, or a memory size (``"100 MB"``) of the branches read.

    Raises
    ------
    ContractError
        The file cannot be opened, has no such tree, or lacks a branch or column that an
        expression needs (naming the branch, the file and the expression).
    """
    contract = export_model(ref).contract
    source: Source
    tree = None
    if item.format == "root":
        tree = item.tree
        if tree is None:
            with open_tree(item.path, None, choose_with="tree=<name>") as ttree:
                # Its path in the file ("dir/Events"), without the leading "/" and the cycle.
                tree = ttree.object_path.strip("/").split(";")[0]
        source = RootSource(item.path, tree, step_size=step_size)
    else:
        source = ParquetSource(item.path)
    available, jagged = source.schema(item.path)
    present = [name for name in ids if name in available]
    if apply_selection:
        contract = selection_contract(contract)
    spec = TableSpec(contract, ids=present, labels=False, apply_selection=False)
    binding = spec.bind(available, jagged, source.where(item.path), source.kind)
    return FilePlan(source, tree, binding, present, source.chunks(item.path, binding.columns))


@dataclass
class ChunkScores:
    """The scores of one chunk.

    ``ids`` has one value per event (entry) of the chunk: the identifier columns, or
    ``entry``. ``counts`` is the number of objects (rows) per event with ``per_object``, else
    ``None``. ``scores`` has one float32 value per row and output; NaN where the selection,
    when applied, is false.
    """

    n_entries: int
    ids: dict[str, np.ndarray]
    counts: np.ndarray | None
    scores: dict[str, np.ndarray]

    @property
    def n_rows(self) -> int:
        """Rows (events, or objects with ``per_object``)."""
        return len(next(iter(self.scores.values())))


def score_chunk(ref: ExportRef, plan: FilePlan, index: int) -> ChunkScores:
    """Score chunk ``index`` of ``plan`` with the export of ``ref``.

    Every event or object of the chunk is a row (the contract's ``per_object``); with the
    selection in the plan, rows outside it are not scored and get NaN.
    """
    model = export_model(ref)
    contract = model.contract
    chunk = plan.chunks[index]
    arrays = read_arrays(plan.source, chunk, plan.binding.columns)
    data, _ = plan.binding.build(arrays, start=chunk.start)
    n_entries = chunk.n_rows
    rows = np.arange(len(data))
    if SELECTED in data.flat:
        mask = data.flat.pop(SELECTED)
        if not np.isin(mask, (0, 1)).all():
            raise ContractError(
                f"{chunk.describe()}: selection = {contract.selection!r} gives values other than "
                "true and false; it must be a condition (a comparison such as `Jet_pt > 20`)"
            )
        rows = np.flatnonzero(mask == 1)
    scored = data if len(rows) == len(data) else data.take(rows)
    with marked("inference.call"):
        outputs = model(scored.to_soa(contract))
    scores = {}
    for name, values in outputs.items():
        full = np.full(len(data), np.nan, dtype=np.float32)
        full[rows] = values
        scores[name] = full
    if plan.ids:
        ids = {name: ak.to_numpy(arrays[name]) for name in plan.ids}
    else:
        ids = {ENTRY: np.arange(chunk.start, chunk.stop, dtype=np.int64)}
    counts = None
    if contract.per_object is not None:
        # Every object is a row (nothing is dropped), so counting rows per entry gives each
        # event's number of objects, empty events included.
        counts = np.bincount(data.ids[ENTRY] - chunk.start, minlength=n_entries)
    elif len(data) != n_entries:
        raise ContractError(
            f"{chunk.describe()}: {len(data)} rows from {n_entries} events; a per-event "
            "contract gives one row per event"
        )
    return ChunkScores(n_entries, ids, counts, scores)
