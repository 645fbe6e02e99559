"""SoA tables to Parquet: flat columns as columns, jagged fields as list columns.

The one writer of the data layer: the Pythia jets cache, the run directory's validation
sample, and generated shards all go through it, atomically. A file written here reads back
through ``ParquetSource`` with a contract whose expressions are the column names.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from project.contract import InputContract
from project.data.columnar import ColumnarData, Jagged
from project.utils import atomic_path

LABEL_COLUMN, WEIGHT_COLUMN = "label", "weight"


def arrow_table(flat: Mapping[str, np.ndarray], jagged: Mapping[str, Jagged]) -> pa.Table:
    """One column per flat array, one list column ``<collection>_<field>`` per jagged field
    (int32 list offsets where they fit, int64 large lists beyond)."""
    columns = {name: pa.array(values) for name, values in flat.items()}
    for cname, coll in jagged.items():
        large = len(coll.offsets) and int(coll.offsets[-1]) > np.iinfo(np.int32).max
        offsets = pa.array(coll.offsets.astype(np.int64 if large else np.int32))
        kind = pa.LargeListArray if large else pa.ListArray
        for fname, values in coll.fields.items():
            columns[f"{cname}_{fname}"] = kind.from_arrays(offsets, pa.array(values))
    return pa.table(columns)


def columns_table(arrays: Mapping[str, Any]) -> pa.Table:
    """Stored columns as a source reads them (numpy arrays, awkward arrays with a list per
    row) as an Arrow table with the same names: what ``write_shards`` writes."""
    return pa.table(
        {
            name: ak.to_arrow(values, extensionarray=False)
            if isinstance(values, ak.Array)
            else pa.array(np.asarray(values))
            for name, values in arrays.items()
        }
    )


def write_shards(
    tables: Iterable[pa.Table],
    directory: str | Path,
    shard_bytes: int,
    row_group_rows: int,
    prefix: str = "part",
) -> list[Path]:
    """Write the rows of ``tables`` (one schema) as Parquet shards ``<prefix>-00000.parquet``,
    ... in ``directory`` (new or empty), each holding about ``shard_bytes`` of Arrow data
    (on disk the toy jets, random floats in list columns, take about 1.3 times that) in row
    groups of ``row_group_rows``: the chunks a streaming run reads. Each shard is written atomically,
    and at most one shard is held in memory. Returns the paths written."""
    directory = Path(directory)
    if directory.exists() and any(directory.iterdir()):
        raise FileExistsError(
            f"{directory} is not empty: shards are written to a new or empty folder, so that "
            "they are not mixed with other files; give another folder or empty this one"
        )
    directory.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    pending: list[pa.Table] = []
    size = 0

    def flush() -> None:
        path = directory / f"{prefix}-{len(written):05d}.parquet"
        write_parquet(pa.concat_tables(pending), path, row_group_size=row_group_rows)
        written.append(path)
        pending.clear()

    for table in tables:
        while table.num_rows:
            # Cut the table where the shard is full, so shards hold about shard_bytes each.
            room = max(1, int((shard_bytes - size) * table.num_rows / max(table.nbytes, 1)))
            head, table = table.slice(0, room), table.slice(room)
            pending.append(head)
            size += head.nbytes
            if size >= shard_bytes:
                flush()
                size = 0
    if pending:
        flush()
    return written


def write_parquet(table: pa.Table, path: str | Path, row_group_size: int | None = None) -> None:
    """Write ``table`` to ``path`` atomically (a unique temporary file, then a rename)."""
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, row_group_size=row_group_size)


def soa_table(data: ColumnarData, contract: InputContract) -> pa.Table:
    """The contract's inputs of ``data`` under their input names, with the label, regression
    targets and weights beside them: what a model sees, as raw SoA."""
    flat = {name: data.flat[name] for name in contract.flat_names}
    if data.labels is not None:
        flat[LABEL_COLUMN] = data.labels
    for target in contract.regression:
        flat[target.name] = data.targets[target.name]
    if data.weights is not None:
        flat[WEIGHT_COLUMN] = data.weights
    jagged = {c.name: data.jagged[c.name] for c in contract.jagged}
    return arrow_table(flat, jagged)
