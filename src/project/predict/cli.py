"""``python -m project.inference EXPORT_DIR INPUT --out OUTPUT``: score a Parquet or ROOT file.

Reads the columns the model's contract names (Parquet: list columns ``<collection>_<field>``
are the jagged fields; ROOT: jagged branches ``<collection>_<field>`` of a TTree) in steps of
``--step-size`` rows and writes Parquet with the rows' identifiers and one column per output,
through a unique temporary file renamed into place at the end (two runs with the same
``--out`` never mix, a failed run leaves nothing). pyarrow is imported here (it writes the
output); ROOT inputs are read through the data layer's ROOT source (uproot), imported only
for them.
"""

from __future__ import annotations

import argparse
import difflib
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from project.contract import ContractError
from project.inference import (
    DEFAULT_MAX_BATCH,
    ArtifactError,
    InferenceModel,
    InputError,
    ThreadPolicyError,
    load,
)
from project.utils import atomic_path

DEFAULT_IDS = ("run", "luminosityBlock", "event")


def needed_columns(model: InferenceModel) -> list[str]:
    """Input columns of the file that the model reads (jagged fields carry their offsets)."""
    names = list(model.contract.flat_names)
    for coll in model.contract.jagged:
        names += coll.field_input_names
    return names


def _check_present(needed: list[str], available: list[str], source: str) -> None:
    missing = [n for n in needed if n not in available]
    if not missing:
        return
    by_lower = {a.lower(): a for a in available}
    hints = []
    for name in missing:
        close = difflib.get_close_matches(name.lower(), list(by_lower), n=2, cutoff=0.75)
        if close:
            hints.append(f"{name!r}: did you mean {' or '.join(repr(by_lower[c]) for c in close)}?")
    raise InputError(
        f"{source} lacks {', '.join(map(repr, missing))}. The model reads: "
        f"{', '.join(needed)}. "
        + (f"Close names in the file: {'; '.join(hints)} " if hints else "")
        + f"The file has {len(available)} columns: {', '.join(sorted(available)[:30])}"
        + (" ..." if len(available) > 30 else "")
    )


def _id_columns(requested: str | None, available: list[str]) -> list[str]:
    if requested is None:
        return [c for c in DEFAULT_IDS if c in available]
    ids = [c for c in requested.split(",") if c]
    missing = [c for c in ids if c not in available]
    if missing:
        raise InputError(f"--id-columns {missing} are not in the input file")
    return ids


def parquet_batches(
    path: Path, model: InferenceModel, ids: str | None, step: int
) -> Iterator[tuple[Any, dict[str, np.ndarray]]]:
    """``(RecordBatch of model inputs, {id column: values})`` per step of a Parquet file."""
    import pyarrow as pa

    pf = _parquet_file(path)
    available = pf.schema_arrow.names
    needed = needed_columns(model)
    _check_present(needed, available, str(path))
    id_cols = _id_columns(ids, available)
    batches = pf.iter_batches(batch_size=step, columns=list(dict.fromkeys(needed + id_cols)))
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (pa.ArrowException, OSError) as err:
            raise InputError(
                f"{path} cannot be read further (damaged or truncated?): {err}"
            ) from err
        yield batch, {c: batch.column(c).to_numpy(zero_copy_only=False) for c in id_cols}


def _parquet_file(path: Path) -> Any:
    """``pyarrow.parquet.ParquetFile`` of ``path``, or an ``InputError`` saying why not."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as err:
        raise InputError(
            f"{path} is not a readable Parquet file ({err}); it may be truncated or of another "
            "format. The inputs read are Parquet (.parquet) and ROOT TTrees (.root)."
        ) from err


def root_batches(
    path: Path, model: InferenceModel, ids: str | None, step: int, tree: str | None
) -> Iterator[tuple[Any, dict[str, np.ndarray]]]:
    """``(awkward record array of model inputs, {id column: values})`` per step of a TTree.

    The tree is opened by the ROOT source of the data layer (uproot, imported only then), so
    the runtime itself never imports it.
    """
    from project.data.sources.root import open_tree

    with open_tree(path, tree, choose_with="--tree") as ttree:
        available = list(ttree.keys())
        needed = needed_columns(model)
        _check_present(needed, available, f"{path}:{ttree.name}")
        id_cols = _id_columns(ids, available)
        names = list(dict.fromkeys(needed + id_cols))
        for arrays in ttree.iterate(names, step_size=step, library="ak"):
            yield arrays, {c: np.asarray(arrays[c]) for c in id_cols}


def check_paths(source: Path, out: Path) -> None:
    """Refuse, before anything is scored, an input that is not there or an output that
    cannot be written as asked: a directory, or the input itself."""
    if not source.is_file():
        raise InputError(f"input file {source} does not exist")
    if out.is_dir():
        raise InputError(f"--out {out} is a directory; give the path of the Parquet file to write")
    if out.exists() and out.samefile(source):
        raise InputError(
            f"--out {out} is the input file itself; scoring it would replace the input with "
            "the scores. Give another output path."
        )


def run(args: argparse.Namespace) -> int:
    """Score ``args.input`` with ``args.export_dir`` and write ``args.out``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path, out = Path(args.input), Path(args.out)
    check_paths(path, out)
    if path.suffix.lower() != ".root":
        _parquet_file(path)  # a file that is not Parquet is refused before the model loads
    model = load(
        args.export_dir,
        args.backend,
        threads=args.threads,
        max_batch=args.max_batch,
        nan_policy=args.nan_policy,
    )
    if path.suffix.lower() == ".root":
        batches = root_batches(path, model, args.id_columns, args.step_size, args.tree)
    else:
        batches = parquet_batches(path, model, args.id_columns, args.step_size)
    started = time.perf_counter()
    rows = 0
    with atomic_path(out) as tmp:
        writer = None
        try:
            for inputs, ids in batches:
                try:
                    outputs = model(inputs)
                except InputError as err:
                    raise InputError(f"{path}, rows from {rows}: {err}") from err
                n = len(next(iter(outputs.values())))
                columns = dict(ids) or {"row": np.arange(rows, rows + n, dtype=np.int64)}
                table = pa.table({**columns, **outputs})
                if writer is None:
                    writer = pq.ParquetWriter(tmp, table.schema)
                writer.write_table(table)
                rows += n
        finally:
            if writer is not None:
                writer.close()
        if writer is None:  # no rows at all: still a valid file with the output columns
            empty = {"row": np.empty(0, np.int64)} | {
                o: np.empty(0, np.float32) for o in model.output_names
            }
            pq.write_table(pa.table(empty), tmp)
    seconds = time.perf_counter() - started
    print(
        f"{rows} rows of {path} scored with {model.backend} ({model.artifact.name}) in "
        f"{seconds:.2f} s -> {out}",
        file=sys.stderr,
    )
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    p = argparse.ArgumentParser(
        prog="python -m project.inference", description=__doc__.splitlines()[0]
    )
    p.add_argument("export_dir", help="export directory (manifest.json and artifacts)")
    p.add_argument("input", help="Parquet (.parquet) or ROOT (.root) file")
    p.add_argument("--out", required=True, help="output Parquet file")
    p.add_argument("--backend", choices=["auto", "torchscript", "aoti", "onnx"], default="auto")
    p.add_argument("--tree", help="TTree of a ROOT file (default: its only TTree)")
    p.add_argument(
        "--id-columns",
        help="comma-separated columns copied to the output (default: those of run, "
        "luminosityBlock, event present; else a 'row' index)",
    )
    p.add_argument("--step-size", type=_positive, default=100_000, help="rows read per step")
    p.add_argument(
        "--max-batch", type=_positive, default=DEFAULT_MAX_BATCH, help="rows per model call"
    )
    p.add_argument("--nan-policy", choices=["raise", "ignore"], default="raise")
    p.add_argument("--threads", choices=["single", "unrestricted"], default="single")
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad inputs or exports, with the reason)."""
    args = parser().parse_args(argv)
    try:
        return run(args)
    except (ContractError, ArtifactError, ThreadPolicyError) as err:  # InputError included
        print(f"error: {err}", file=sys.stderr)
        return 2
