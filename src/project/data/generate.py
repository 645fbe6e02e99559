"""The job behind ``scripts/generate.py``: materialise a data config's source.

The source's files are made (a generator writes its cache) and counted chunk by chunk; the
stored columns can then be written to one Parquet file (``output``) or, for data sets of any
size, as many Parquet shards of a given size (``shards.dir``), one chunk in memory at a time
(a toy source with ``block_rows`` generates each block when it is read).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import hydra
import pyarrow as pa
from omegaconf import DictConfig

from project.data.sources import Source, read_arrays
from project.data.streaming import format_bytes, parse_bytes
from project.data.writing import columns_table, write_parquet, write_shards


def stored_tables(source: Source) -> Iterator[pa.Table]:
    """Every chunk of every file of ``source`` with all its stored columns, as Arrow tables."""
    for file in source.files():
        names, _ = source.schema(file)
        for chunk in source.chunks(file, names):
            yield columns_table(read_arrays(source, chunk, names))


def generate(cfg: DictConfig) -> Path | list[Path] | None:
    """Make the files of ``cfg.data.source``, print what they hold, and write them to
    ``cfg.output`` (one Parquet file) or as shards under ``cfg.shards.dir``. Returns what was
    written."""
    source = hydra.utils.instantiate(cfg.data.source, _convert_="all")
    started = time.perf_counter()
    files = source.files()
    shards = cfg.get("shards") or {}
    if shards.get("dir") is not None:
        written = write_shards(
            _counted(stored_tables(source)),
            shards.dir,
            parse_bytes(shards.get("size", "256 MB"), "shards.size"),
            int(shards.get("row_group_rows", 65536)),
        )
        total = sum(p.stat().st_size for p in written)
        print(
            f"wrote {len(written)} shards ({format_bytes(total)} on disk) to {shards.dir} in "
            f"{time.perf_counter() - started:.1f} s"
        )
        return written
    rows = sum(c.n_rows for f in files for c in source.chunks(f, source.schema(f)[0]))
    print(
        f"{rows} rows in {len(files)} files ({files[0]}) in {time.perf_counter() - started:.1f} s"
    )
    if cfg.get("output") is None:
        return None
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    cache = getattr(source, "cache_path", None)
    if cache is not None:  # the generator's own cache file, as it is
        tmp = out.with_name(f".{out.name}.tmp")
        shutil.copyfile(cache, tmp)
        tmp.replace(out)
    else:
        write_parquet(pa.concat_tables(list(stored_tables(source))), out)
    print(f"wrote {out}")
    return out


def _counted(tables: Iterator[pa.Table]) -> Iterator[pa.Table]:
    """``tables``, with a line printed every 20 chunks (large data sets take minutes)."""
    rows = 0
    for i, table in enumerate(tables, 1):
        rows += table.num_rows
        if i % 20 == 0:
            print(f"  {i} chunks, {rows:,} rows")
        yield table
