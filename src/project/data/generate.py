"""The job behind ``scripts/generate.py``: materialise a data config's source."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig


def generate(cfg: DictConfig) -> Path | None:
    """Load the source of ``cfg.data`` (generating and caching it if needed), print what it
    holds, and copy its Parquet cache to ``cfg.output`` if given. Returns the written path."""
    source = hydra.utils.instantiate(cfg.data.source, _convert_="all")
    started = time.perf_counter()
    data = source.load()
    seconds = time.perf_counter() - started
    cache = getattr(source, "cache_path", None)
    counts = {c: int(j.offsets[-1]) for c, j in data.jagged.items()}
    print(
        f"{len(data)} rows from {data.source} in {seconds:.1f} s; objects per collection {counts}"
    )
    if cfg.get("output") is None:
        return None
    if cache is None:
        raise ValueError(f"{type(source).__name__} keeps no Parquet cache to copy to {cfg.output}")
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    shutil.copyfile(cache, tmp)
    tmp.replace(out)
    print(f"wrote {out}")
    return out
