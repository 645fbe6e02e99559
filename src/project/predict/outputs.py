"""The predict job's outputs: one file per input, a ROOT friend tree or Parquet, atomically.

An output has one entry per entry of its input (event, or table row), in the same order:

- the event identifiers (``run``, ``luminosityBlock``, ``event`` where the input has them, else
  ``entry``, the entry number);
- per event (no ``per_object``): one branch or column per output of the model
  (``prob_b``);
- per object (``per_object: Jet``): the number of objects ``nJet`` and one jagged branch per
  output, ``Jet_prob_b``, with ``nJet`` as its counter: NanoAOD's own layout, so that ROOT's
  ``tree.AddFriend("Events", "scores.root")`` and uproot, reading both trees entry by entry,
  line each score up with its object of the original collection.

Each output records how it was made (``provenance``: the export's manifest sha256, the input,
whether the selection was applied); a rerun skips an output only if it was made the same way.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import pyarrow.parquet as pq
import uproot

from project.data.columnar import Jagged
from project.data.writing import arrow_table, write_parquet
from project.predict.tasks import ChunkScores
from project.utils import atomic_path

FORMATS = ("root", "parquet")
INPUT_SUFFIXES = {".root": "root", ".parquet": "parquet", ".parq": "parquet", ".pq": "parquet"}
EXTENSIONS = {"root": ".root", "parquet": ".parquet"}
# Where an output keeps its provenance: a TObjString beside the tree, or Parquet metadata.
PROVENANCE_KEY = "provenance"
# The tree of a ROOT output made from a Parquet input (which has no tree to follow).
DEFAULT_TREE = "Events"


class OutputError(RuntimeError):
    """An output that cannot be written where asked (an output directory that is not
    writable, two inputs that would write one output, an output that is an input)."""


def input_format(path: str) -> str:
    """``root`` or ``parquet``, from the file's suffix; a ``ValueError`` for other files."""
    fmt = INPUT_SUFFIXES.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(
            f"{path}: cannot tell the format from its suffix; inputs are ROOT TTrees (.root) "
            "or Parquet (.parquet)"
        )
    return fmt


def output_path(path: str, out_dir: str | Path, fmt: str, suffix: str) -> Path:
    """``<out_dir>/<input stem><suffix>.<root|parquet>``: the output of input ``path``."""
    return Path(out_dir) / f"{Path(path).stem}{suffix}{EXTENSIONS[fmt]}"


def check_writable(out_dir: str | Path) -> None:
    """Create ``out_dir`` if needed and write (then remove) a file in it; ``OutputError``
    naming the directory when either fails. A real write is asked rather than permission bits,
    which neither root nor a read-only or full file system follows."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=out, prefix=".write-check-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(
            f"output directory {out} is not writable ({type(err).__name__}: {err}); choose "
            "another out=, or fix its permissions"
        ) from err


def check_outputs(inputs: Sequence[str], outputs: Sequence[Path]) -> None:
    """``OutputError`` if two inputs would write one output, or an output is an input."""
    seen: dict[Path, str] = {}
    resolved = {Path(i).resolve() for i in inputs}
    for src, out in zip(inputs, outputs, strict=True):
        key = out.resolve()
        if key in resolved:
            raise OutputError(
                f"the output of {src} would be {out}, which is an input; choose another out= "
                "or suffix="
            )
        if key in seen:
            raise OutputError(
                f"{seen[key]} and {src} would both write {out}: outputs are named after their "
                "input's file name; score files of the same name into separate out= directories"
            )
        seen[key] = src


def read_provenance(path: Path, fmt: str) -> dict[str, Any] | None:
    """The provenance an output records, or ``None`` if it has none or cannot be read."""
    try:
        if fmt == "parquet":
            meta = pq.read_schema(path).metadata or {}
            text = meta.get(PROVENANCE_KEY.encode())
        else:
            with uproot.open(path) as file:
                text = str(file[PROVENANCE_KEY]) if PROVENANCE_KEY in file else None
        return None if text is None else json.loads(text)
    except Exception:
        return None


def _merged(chunks: Sequence[ChunkScores]) -> tuple[dict, np.ndarray | None, dict]:
    first = chunks[0]
    ids = {k: np.concatenate([c.ids[k] for c in chunks]) for k in first.ids}
    counts = None
    if first.counts is not None:
        counts = np.concatenate([c.counts for c in chunks]).astype(np.int32)
    scores = {k: np.concatenate([c.scores[k] for c in chunks]) for k in first.scores}
    return ids, counts, scores


def _root_branches(chunk: ChunkScores, collection: str | None) -> dict[str, Any]:
    branches: dict[str, Any] = dict(chunk.ids)
    if collection is None:
        branches.update(chunk.scores)
    else:
        # A record of jagged arrays: uproot writes Jet_<output> with the one counter nJet.
        branches[collection] = ak.zip(
            {k: ak.unflatten(v, chunk.counts) for k, v in chunk.scores.items()}
        )
    return branches


def write_root(
    path: Path,
    tree: str,
    collection: str | None,
    chunks: Sequence[ChunkScores],
    provenance: dict[str, Any],
) -> None:
    """Write the friend tree ``tree`` of ``chunks`` (in entry order) to ``path``, atomically.

    One basket per chunk; the per-object scores of ``collection`` as ``<collection>_<output>``
    with the counter ``n<collection>``.
    """
    with atomic_path(path) as tmp, uproot.recreate(tmp) as file:
        first = _root_branches(chunks[0], collection)
        types = {
            k: v.dtype if isinstance(v, np.ndarray) else ak.type(v).content
            for k, v in first.items()
        }
        ttree = file.mktree(tree, types, title="scores")
        for chunk in chunks:
            ttree.extend(_root_branches(chunk, collection))
        file[PROVENANCE_KEY] = json.dumps(provenance, sort_keys=True)


def write_parquet_scores(
    path: Path, collection: str | None, chunks: Sequence[ChunkScores], provenance: dict[str, Any]
) -> None:
    """Write ``chunks`` as Parquet in the friend tree's shape (list columns
    ``<collection>_<output>`` beside ``n<collection>``), atomically."""
    ids, counts, scores = _merged(chunks)
    if collection is None:
        table = arrow_table({**ids, **scores}, {})
    else:
        flat = {**ids, f"n{collection}": counts}
        table = arrow_table(flat, {collection: Jagged.from_counts(counts, scores)})
    meta = {PROVENANCE_KEY: json.dumps(provenance, sort_keys=True)}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), **meta})
    write_parquet(table, path)


def write_output(
    path: Path,
    fmt: str,
    tree: str | None,
    collection: str | None,
    chunks: Sequence[ChunkScores],
    provenance: dict[str, Any],
) -> None:
    """Write one input's scores as ``fmt`` (``root`` or ``parquet``); see the module docstring."""
    if fmt == "root":
        write_root(path, tree or DEFAULT_TREE, collection, chunks, provenance)
    elif fmt == "parquet":
        write_parquet_scores(path, collection, chunks, provenance)
    else:
        raise ValueError(f"unknown output format {fmt!r}; choose one of {FORMATS}")
