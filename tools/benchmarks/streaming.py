"""``scripts/benchmark.py train --files ... --stream-compare | --stream-epoch``: streaming.

Both modes train the template's real path (``SoADataModule`` + ``ClassifierModule`` +
Lightning ``Trainer``, as ``benchmark.py train`` does) on Parquet files, for instance the
toy shards written by ``scripts/generate.py ... shards.dir=...``, split by hash:

- ``--stream-compare``: the same files, in memory (``data.stream=false``; on a GPU resident
  when it fits, ``data.resident=auto``) and streamed (``data.stream=true``), for a fixed
  number of steps after a warm-up; the two sides alternate ``--repeats`` times and the
  medians are compared (rows/s streaming over rows/s in memory). Give a subset that fits.
- ``--stream-epoch``: one whole epoch streamed under ``--memory-budget`` (``data.stream=auto``:
  the log says why it streams), the memory of this process and its DataLoader workers
  sampled every 50 ms: the peak of their summed resident set (RSS, which counts the pages the
  forked workers share with this process once per process) and of their summed proportional
  set (PSS, shared pages divided among the processes sharing them), against the budget plus
  1 GB.

The indexing pass runs before the clock starts and is kept under ``BENCHMARK_DIR`` (reused by
later runs on the same files); its time is printed.
"""

from __future__ import annotations

import argparse
import glob
import json
import logging
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import psutil
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from tools.benchmarks.training import CONFIG_DIR, StepTimer

GB = 1e9


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The streaming options of ``benchmark.py train``."""
    parser.add_argument(
        "--files", nargs="+", help="Parquet files or glob patterns to train on (streaming modes)"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--stream-compare", action="store_true", help="rows/s streamed against in memory"
    )
    mode.add_argument(
        "--stream-epoch", action="store_true", help="one streamed epoch: peak memory, rows/s"
    )
    parser.add_argument("--memory-budget", default="2e9", help="data.memory_budget (bytes)")
    parser.add_argument("--workers", type=int, default=0, help="data.workers of the stream")
    parser.add_argument("--shuffle-buffer", type=int, default=100_000)
    parser.add_argument(
        "--full-contract",
        action="store_true",
        help="the data config's whole contract (with constituents) even for the mlp, whose "
        "experiment reads the flat columns only",
    )


def _files(patterns: list[str]) -> list[str]:
    files = sorted({f for p in patterns for f in (glob.glob(p) or [p])})
    missing = [f for f in files if not Path(f).is_file()]
    if not files or missing:
        raise SystemExit(f"--files: no such files {missing or patterns}")
    return files


def compose_case(args: argparse.Namespace, output_dir: Path, stream: bool | str) -> DictConfig:
    """The training config of one case: the model's experiment on ``args.files``."""
    experiment = CONFIG_DIR / "experiment" / f"{args.model}.yaml"
    use_experiment = experiment.is_file() and not args.full_contract
    overrides = [
        f"experiment={args.model}" if use_experiment else f"model={args.model}",
        "data=parquet",
        "data.source.files=[]",
        "data.split_by=hash",
        "data.split=[0.9,0.05,0.05]",
        f"data.stream={str(stream).lower()}",
        f"data.memory_budget={args.memory_budget}",
        f"data.workers={args.workers}",
        f"data.shuffle_buffer={args.shuffle_buffer}",
        *([f"data.batch_size={args.batch_size}"] if args.batch_size else []),
        f"trainer.accelerator={args.accelerator}",
        f"trainer.devices={args.devices}",
        f"trainer.precision={args.precision}",
        f"model.compile={str(args.compile).lower()}",
        "logger=csv",
        *args.overrides,
    ]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.data.source.files = _files(args.files)
        cfg.paths.output_dir = str(output_dir)
        cfg.trainer.limit_val_batches = 0
        cfg.trainer.num_sanity_val_steps = 0
        cfg.trainer.enable_checkpointing = False
        cfg.trainer.enable_progress_bar = False
        cfg.trainer.enable_model_summary = False
        if args.stream_epoch:
            cfg.trainer.max_epochs = 1
            cfg.trainer.max_steps = -1
        else:
            cfg.trainer.max_steps = args.warmup + args.steps
            cfg.trainer.max_epochs = -1
    return cfg


class PeakMemory:
    """The peak summed RSS and PSS of this process and its children, sampled in a thread."""

    def __init__(self, every_s: float = 0.05) -> None:
        self.every_s = every_s
        self.rss = self.pss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="peak-memory")

    def sample(self) -> tuple[int, int]:
        """``(rss, pss)`` now, summed over the process tree."""
        me = psutil.Process()
        rss = pss = 0
        for proc in [me, *me.children(recursive=True)]:
            try:
                info = proc.memory_full_info()
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            rss, pss = rss + info.rss, pss + info.pss
        return rss, pss

    def _run(self) -> None:
        while not self._stop.is_set():
            rss, pss = self.sample()
            self.rss, self.pss = max(self.rss, rss), max(self.pss, pss)
            self._stop.wait(self.every_s)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_case(cfg: DictConfig, datamodule: Any, warmup: int) -> dict[str, Any]:
    """Fit once on ``datamodule`` (set up already); rows/s after ``warmup`` steps."""
    model = hydra.utils.instantiate(cfg.model, contract=datamodule.contract.to_dict())
    timer = StepTimer(warmup)
    loggers = [hydra.utils.instantiate(c) for c in cfg.logger.values()]
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=[timer], logger=loggers)
    trainer.fit(model, datamodule=datamodule)
    # Counted by the timer: a Lightning step takes model.steps_per_call batches.
    rows = timer.rows * trainer.world_size
    return {
        "rows_per_s": rows / timer.seconds if timer.seconds else float("nan"),
        "steps": trainer.global_step,
        "is_global_zero": trainer.is_global_zero,
        "resident": timer.resident,
        "graph_steps": model.cuda_graph_steps,
    }


def _datamodule(cfg: DictConfig, cache_dir: Path) -> tuple[Any, float]:
    started = time.perf_counter()
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all", cache_dir=str(cache_dir))
    datamodule.setup("fit")
    return datamodule, time.perf_counter() - started


def main(args: argparse.Namespace) -> int:
    """Run the chosen streaming mode and print its table (rank zero only under DDP)."""
    if not args.files:
        raise SystemExit("--stream-compare and --stream-epoch need --files")
    # The data layer's log says which path was taken and why, and what the indexing pass did.
    logging.basicConfig(format="%(name)s: %(message)s")
    logging.getLogger("project.data").setLevel(logging.INFO)
    os.environ.setdefault("PROJECT_ROOT", str(CONFIG_DIR.parent))
    out = Path(os.environ.get("BENCHMARK_DIR", "logs/benchmark")) / f"stream-{args.model}"
    files = _files(args.files)
    on_disk = sum(Path(f).stat().st_size for f in files)
    row: dict[str, Any] = {
        "model": args.model, "files": len(files), "on_disk_gb": round(on_disk / GB, 2),
        "accelerator": args.accelerator, "batch": args.batch_size, "workers": args.workers,
        "shuffle_buffer": args.shuffle_buffer, "memory_budget": args.memory_budget,
    }  # fmt: skip
    if args.stream_epoch:
        row.update(_epoch(args, out))
    else:
        row.update(_compare(args, out))
    if row.pop("is_global_zero", True):
        print(json.dumps(row, indent=1))
        if args.json:
            with args.json.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
    return 0


def _compare(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    cases = {}
    for stream in (False, True):
        cfg = compose_case(args, out / ("stream" if stream else "memory"), stream)
        datamodule, seconds = _datamodule(cfg, out / "index")
        cases[stream] = (cfg, datamodule)
        print(f"{'streamed' if stream else 'in memory'}: data set up in {seconds:.1f} s")
    args.batch_size = int(cases[True][0].data.batch_size)
    rates: dict[bool, list[float]] = {False: [], True: []}
    resident = False
    graph_steps = {False: 0, True: 0}
    for _ in range(max(1, args.repeats)):
        for stream, (cfg, datamodule) in cases.items():
            result = run_case(cfg, datamodule, args.warmup)
            rates[stream].append(result["rows_per_s"])
            resident |= result["resident"] and not stream
            graph_steps[stream] = result["graph_steps"]
    memory, streamed = statistics.median(rates[False]), statistics.median(rates[True])
    print(
        f"{'model':<12}{'batch':>6}{'in memory rows/s':>18}{'streamed rows/s':>17}{'ratio':>7}"
        f"   (median of {len(rates[True])}; all runs)"
    )
    print(
        f"{args.model:<12}{args.batch_size:>6}{memory:>18.0f}{streamed:>17.0f}"
        f"{streamed / memory:>7.2f}   in memory {[round(r) for r in rates[False]]}, streamed "
        f"{[round(r) for r in rates[True]]}"
    )
    return {
        "batch": args.batch_size, "resident": resident,
        "graph_steps_in_memory": graph_steps[False], "graph_steps_streamed": graph_steps[True],
        "in_memory_rows_s": round(memory), "streamed_rows_s": round(streamed),
        "ratio": round(streamed / memory, 3),
        "in_memory_all": [round(r) for r in rates[False]],
        "streamed_all": [round(r) for r in rates[True]],
    }  # fmt: skip


def _epoch(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    cfg = compose_case(args, out / "epoch", "auto")
    budget = float(args.memory_budget)
    baseline_rss, baseline_pss = PeakMemory().sample()
    with PeakMemory() as setup_peak:
        datamodule, setup_s = _datamodule(cfg, out / "index")
    if not datamodule.report()["streaming"]:
        raise SystemExit(f"the data fits the budget {args.memory_budget}: nothing streamed")
    started = time.perf_counter()
    with PeakMemory() as peak:
        result = run_case(cfg, datamodule, args.warmup)
    seconds = time.perf_counter() - started
    rows = datamodule.report()["rows"]["train"]
    limit = budget + GB
    print(
        f"one streamed epoch of {rows:,} training rows ({args.model}) in {seconds:.0f} s "
        f"({rows / seconds:,.0f} rows/s with start-up, {result['rows_per_s']:,.0f} after "
        f"{args.warmup} steps); indexing and set-up {setup_s:.0f} s\n"
        f"peak memory of the process and its {args.workers} workers: RSS "
        f"{peak.rss / GB:.2f} GB, PSS {peak.pss / GB:.2f} GB (before the data: RSS "
        f"{baseline_rss / GB:.2f} GB); budget {budget / GB:.2f} GB + 1 GB = {limit / GB:.2f} GB: "
        f"{'within' if max(peak.rss, peak.pss) <= limit else 'OVER'}"
    )
    return {
        "is_global_zero": result["is_global_zero"],
        "train_rows": rows, "epoch_s": round(seconds, 1), "steps": result["steps"],
        "rows_s_epoch": round(rows / seconds), "rows_s_after_warmup": round(result["rows_per_s"]),
        "setup_s": round(setup_s, 1), "setup_peak_rss_gb": round(setup_peak.rss / GB, 3),
        "baseline_rss_gb": round(baseline_rss / GB, 3), "baseline_pss_gb": round(baseline_pss / GB, 3),
        "peak_rss_gb": round(peak.rss / GB, 3), "peak_pss_gb": round(peak.pss / GB, 3),
        "limit_gb": round(limit / GB, 3), "within": max(peak.rss, peak.pss) <= limit,
        "cuda": torch.cuda.is_available() and args.accelerator != "cpu",
    }  # fmt: skip
