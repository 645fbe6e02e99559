"""``scripts/benchmark.py inference``: latency of each backend, raw and through the SoA runtime.

Template tooling, outside the package: it rebuilds the eager graph from the export's
checkpoint (training code), which the standalone runtime never imports.

For each backend and batch size it measures, on one thread, the median latency of
(a) ``raw``: the backend alone on ready inputs (TorchScript/AOTInductor: the loaded module or
package called on ready tensors; ONNX: ``InferenceSession.run`` on ready numpy arrays), and
(b) ``full``: ``InferenceModel.__call__`` from SoA numpy columns to SoA outputs (matching by
name, checks, the NaN/Inf scan, zero-copy hand-over, outputs), next to eager PyTorch on the
deploy graph rebuilt from the export's checkpoint. The targets (what the full call adds over
the raw backend: 20% at batch 1, 3% at batch 4096) are judged on full against raw. At those
batch sizes it also measures the full call without the NaN/Inf scan (``nan_policy="ignore"``)
and the SoA work alone (the full call with the backend's computation replaced by a no-op),
alternated with the other calls (cold: the backend's run evicts the inputs from cache) and
back to back (warm: as for a host that has just filled its columns). The calls being compared
alternate, so they see the same machine load. Inputs are the export's golden rows tiled to the
batch size.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from project.contract import InputContract
from project.inference.threads import ThreadPolicy, apply_torch_policy

BATCH_SIZES = (1, 64, 1024, 4096, 16384)
TARGETS = {1: 0.20, 4096: 0.03}  # allowed SoA overhead over the raw backend, by batch size
# CPU time of the calling thread: with one thread doing all the work (the deployment policy)
# it is the latency of an idle machine, without the time spent waiting for a busy core.
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def tile_golden(
    golden: dict[str, np.ndarray], contract: InputContract, batch: int
) -> dict[str, np.ndarray]:
    """The golden rows repeated to ``batch`` rows, as contiguous SoA columns."""
    n = len(golden[contract.input_names[0]]) - (0 if contract.flat else 1)
    rows = np.arange(batch) % n
    cols = {name: np.ascontiguousarray(golden[name][rows]) for name in contract.flat_names}
    for coll in contract.jagged:
        offsets = golden[coll.offsets_name]
        counts = np.diff(offsets)[rows]
        new = np.zeros(batch + 1, dtype=np.int64)
        np.cumsum(counts, out=new[1:])
        # Object j of new row i comes from old object offsets[rows[i]] + (j - new[i]).
        objects = np.repeat(offsets[rows] - new[:-1], counts) + np.arange(new[-1])
        cols[coll.offsets_name] = new
        for name in coll.field_input_names:
            cols[name] = np.ascontiguousarray(golden[name][objects])
    return cols


def measure(
    calls: dict[str, Callable[[], Any]], budget: float, clock: str = "wall", min_reps: int = 3
) -> dict[str, list[float]]:
    """Seconds of every call of each of ``calls``, run in turn (one repetition = each call
    once) for about ``budget`` seconds each, so that all of them see the same load on a shared
    machine; entry ``i`` of every list is from repetition ``i``. The order rotates from one
    repetition to the next, so each call follows each of the others equally often (a call
    finds in cache what the one before it left)."""
    now = CLOCKS[clock]
    for fn in calls.values():
        # Warm-up: TorchScript optimises on its first calls, caches fill. Slow calls (large
        # batches) need fewer of them, and keep the whole run short.
        start = time.perf_counter()
        fn()
        if time.perf_counter() - start < 0.05:
            fn()
            fn()
    times: dict[str, list[float]] = {k: [] for k in calls}
    deadline = time.perf_counter() + budget * len(calls)
    reps = 0
    order = list(calls.items())
    while reps < min_reps or (time.perf_counter() < deadline and reps < 5000):
        shift = reps % len(order)
        for key, fn in order[shift:] + order[:shift]:
            start = now()
            fn()
            times[key].append(now() - start)
        reps += 1
    return times


def medians(
    calls: dict[str, Callable[[], Any]], budget: float, clock: str = "wall", min_reps: int = 3
) -> dict[str, float]:
    """Median seconds per call of each of ``calls`` (see ``measure``)."""
    return {k: statistics.median(v) for k, v in measure(calls, budget, clock, min_reps).items()}


def added(times: dict[str, list[float]], key: str, base: str = "raw") -> float:
    """Median over repetitions of ``key``'s time minus ``base``'s in the same repetition:
    what ``key`` adds to ``base``, with the machine's slower and faster spells (which both
    calls of a repetition share) cancelled out."""
    return statistics.median(a - b for a, b in zip(times[key], times[base], strict=True))


def _raw_call(model: Any, cols: dict[str, np.ndarray]) -> Callable[[], Any]:
    names, runner = model.input_names, model.runner
    if model.backend == "onnx":
        session, outputs = runner.session, list(model.output_names)
        feed = {n: cols[n] for n in names}
        return lambda: session.run(outputs, feed)
    tensors = [torch.from_numpy(cols[n]) for n in names]
    return lambda: runner.call(tensors)


def eager_graph(manifest: dict[str, Any]) -> torch.nn.Module | None:
    """The eager deploy graph rebuilt from the export's checkpoint, or ``None`` if missing."""
    from project.deploy.graph import load_checkpoint

    path = Path(manifest["source"]["checkpoint"])
    if not path.is_file():
        return None
    return load_checkpoint(path, manifest["source"].get("checkpoint_sha256")).graph.eval()


def count_flops(graph: torch.nn.Module, cols: dict[str, np.ndarray], names: list[str]) -> int:
    """FLOPs of one call of the eager graph on ``cols`` (``FlopCounterMode``)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        graph(*(torch.from_numpy(cols[n]) for n in names))
    return int(counter.get_total_flops())


def soa_only(model: Any, cols: dict[str, np.ndarray]) -> Any:
    """Make ``model``'s backend computation a no-op, so that calling it on ``cols`` costs only
    the SoA work: matching, checks, NaN scan, zero-copy hand-over (tensors, or the feed of
    ONNX Runtime) and outputs. Measured this way it is free of the noise of the backend's run:
    the outputs of one real call on ``cols`` are handed back by every later call."""
    runner = model.runner
    if model.backend == "onnx":
        done = runner.session.run(list(model.output_names), {n: cols[n] for n in model.input_names})
        runner.session = SimpleNamespace(run=lambda outputs, feed: done)
    else:
        done = runner.call([torch.from_numpy(cols[n]) for n in model.input_names])
        runner.call = lambda tensors: done
    return model


def run(
    export_dir: Path,
    backends: list[str],
    batch_sizes: list[int],
    budget: float,
    clock: str = "wall",
    max_call: float = 2.0,
) -> dict[str, Any]:
    """Measure everything: ``{"rows": [...], "eager": {batch: s}, "flops": {batch: n}, ...}``.

    A batch size whose calls would take longer than ``max_call`` seconds (extrapolated from
    the previous size) is skipped and listed in ``"skipped"``, so the run stays short.
    """
    from project.inference import load

    manifest = json.loads((export_dir / "manifest.json").read_text())
    models = {b: load(export_dir, b) for b in backends}
    # The same loaded backends (one copy of the weights, as warm in cache as for ``raw``).
    unchecked = {b: m.with_nan_policy("ignore") for b, m in models.items()}
    contract = next(iter(models.values())).contract
    with np.load(export_dir / manifest["golden"]["file"]) as data:
        golden = {k: data[k] for k in data.files}
    graph = eager_graph(manifest)
    rows: list[dict[str, Any]] = []
    eager: dict[int, float] = {}
    flops: dict[int, int] = {}
    skipped: list[str] = []
    per_row = 0.0
    for batch in sorted(batch_sizes):
        if per_row * batch > max_call:
            skipped.append(f"batch {batch} (~{per_row * batch:.0f} s per call)")
            continue
        cols = tile_golden(golden, contract, batch)
        per_row = 0.0  # the slowest per-row latency at this size predicts the next size
        for name, model in models.items():
            calls = {"raw": _raw_call(model, cols), "full": lambda m=model, c=cols: m(c)}
            if batch in TARGETS:  # where the targets are judged: also the SoA work alone
                calls["no_scan"] = lambda m=unchecked[name], c=cols: m(c)
                stub = soa_only(load(export_dir, name, verify_golden=False), cols)
                calls["soa"] = lambda m=stub, c=cols: m(c)
            times = measure(calls, budget, clock)
            found = {k: statistics.median(v) for k, v in times.items()}
            found["added"] = added(times, "full")
            if "no_scan" in calls:
                found["added_no_scan"] = added(times, "no_scan")
            if "soa" in calls:
                # The SoA work once more, back to back: its inputs stay in cache between
                # calls, as they are for a host that has just filled its columns.
                found["soa_warm"] = medians({"soa": calls["soa"]}, budget, clock)["soa"]
            rows.append({"backend": name, "batch": batch, **found})
            per_row = max(per_row, found["full"] / batch, found["raw"] / batch)
        if graph is not None:
            tensors = [torch.from_numpy(cols[n]) for n in contract.input_names]

            def call(tensors: list[torch.Tensor] = tensors) -> Any:
                with torch.inference_mode():
                    return graph(*tensors)

            eager[batch] = medians({"eager": call}, budget, clock)["eager"]
            per_row = max(per_row, eager[batch] / batch)
            flops[batch] = count_flops(graph, cols, contract.input_names)
    return {
        "name": manifest["name"],
        "clock": clock,
        "max_batch": next(iter(models.values())).max_batch,
        "rows": rows,
        "eager": eager,
        "flops": flops,
        "skipped": skipped,
    }


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:,.1f}"


def _overhead(row: dict[str, Any], key: str, paired: str) -> float:
    """What ``key`` adds over raw, as a fraction of raw: of the two estimates, the less
    favourable (on a busy machine they can differ by a few percent of raw at batch 1024)."""
    return max(row[key] - row["raw"], row[paired]) / row["raw"]


def verdict(overhead: float, batch: int) -> str:
    """``met`` or ``MISSED`` against ``TARGETS[batch]``; ``unclear`` when the full call ran
    faster than the raw backend by more than the target itself. It does strictly more work,
    so that is the machine's noise, larger than what is being judged."""
    target = TARGETS[batch]
    if overhead < -target:
        return "unclear"
    return "met" if overhead <= target else "MISSED"


def format_report(result: dict[str, Any]) -> str:
    """The table printed by ``scripts/benchmark.py inference``."""
    head = (
        f"{'backend':<12}{'batch':>6}{'raw us/call':>13}{'raw us/row':>11}{'full us/call':>14}"
        f"{'full us/row':>12}{'full/raw':>10}{'target':>8}{'no NaN scan':>12}"
        f"{'SoA us warm':>12}{'/raw':>7}{'SoA us cold':>12}"
    )
    lines = [
        f"{result['name']}: median {result['clock']}-clock latency, one thread, torch "
        f"{torch.__version__}",
        "  raw = backend on ready inputs; full = SoA columns in, SoA outputs out (default call);",
        "  full/raw = what the full call adds over raw, over raw: the larger of the difference",
        "  of their medians and the median of their differences (the two run alternately);",
        "  target = full/raw within +20% at batch 1 and +3% at batch 4096 (NaN/Inf screen",
        "  included); no NaN scan = the same for the same loaded backend with nan_policy=",
        "  'ignore'; SoA us = the full call with the backend's computation replaced by a no-op:",
        "  warm = back to back (inputs in cache, as for a host that has just filled its",
        "  columns), /raw = warm over raw; cold = alternated with the backend's calls, which",
        "  evict the inputs from cache between calls",
        head,
        "-" * len(head),
    ]
    unclear = False
    for r in result["rows"]:
        raw, batch = r["raw"], r["batch"]
        more = _overhead(r, "full", "added")
        line = (
            f"{r['backend']:<12}{batch:>6}{_us(raw):>13}{_us(raw / batch):>11}"
            f"{_us(r['full']):>14}{_us(r['full'] / batch):>12}{more:>+10.1%}"
        )
        if "soa" in r:
            judged = verdict(more, batch)
            unclear = unclear or judged == "unclear"
            line += (
                f"{judged:>8}{_overhead(r, 'no_scan', 'added_no_scan'):>+12.1%}{_us(r['soa_warm']):>12}"
                f"{r['soa_warm'] / raw:>7.1%}{_us(r['soa']):>12}"
            )
        lines.append(line)
    for batch, seconds in result["eager"].items():
        lines.append(f"{'eager':<12}{batch:>6}{_us(seconds):>13}{_us(seconds / batch):>11}")
    at = max((b for b in result["flops"] if b <= 4096), default=None)
    if at is not None:
        best = min((r for r in result["rows"] if r["batch"] == at), key=lambda r: r["full"])
        flops = result["flops"][at]
        lines.append(
            f"FLOPs (FlopCounterMode, eager graph): {flops / at / 1e3:,.1f} kFLOP/row. Best at "
            f"batch {at}: {best['backend']}, {flops / best['full'] / 1e9:.2f} GFLOP/s through "
            f"the full call ({flops / best['raw'] / 1e9:.2f} GFLOP/s raw)."
        )
    chunk = result.get("max_batch")
    if chunk and any(r["batch"] > chunk for r in result["rows"]):
        lines += [
            f"Above {chunk} rows the full call runs in chunks of {chunk} (load's max_batch), raw",
            "  in one call: the chunks can be the faster of the two (a smaller working set).",
        ]
    if unclear:
        lines += [
            "unclear = the full call ran faster than raw by more than the target: the machine's",
            "  noise exceeds what is judged; rerun with --clock cpu or a longer --budget.",
        ]
    if result.get("skipped"):
        lines.append(f"Skipped (over --max-call seconds): {', '.join(result['skipped'])}.")
    return "\n".join(lines)


def usable_backends(export_dir: Path) -> tuple[list[str], list[str]]:
    """The export's CPU backends that ``load`` would accept here, and why the others not (no
    artifact, parity failed, an AOTInductor package compiled for another torch or CPU)."""
    from project.inference import FORMATS, ArtifactError
    from project.inference.export_dir import choose_artifact, read_export

    export = read_export(export_dir)
    usable, passed_over = [], []
    for fmt in FORMATS:
        try:
            choose_artifact(export, fmt, "cpu", "all")
        except ArtifactError as err:
            # "<dir>: no usable artifact ... on cpu: <fmt>: <reason>", or the reason alone.
            message = str(err)
            sep = " on cpu: "
            passed_over.append(message.split(sep, 1)[1] if sep in message else f"{fmt}: {message}")
        else:
            usable.append(fmt)
    return usable, passed_over


def latest_export(root: Path = Path("exported")) -> Path:
    """The most recently written export directory under ``root``."""
    manifests = sorted(root.glob("*/manifest.json"), key=lambda p: p.stat().st_mtime)
    if not manifests:
        raise SystemExit(f"no export under {root}/; run scripts/export.py or give EXPORT_DIR")
    return manifests[-1].parent


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``inference`` subcommand's arguments."""
    parser.add_argument(
        "export_dir", nargs="?", help="export directory (default: the newest under exported/)"
    )
    parser.add_argument(
        "--backends",
        help="comma-separated, of torchscript,aoti,onnx (default: every one the export has "
        "that passed parity and can run here)",
    )
    parser.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)))
    parser.add_argument(
        "--budget", type=float, default=0.25, help="seconds of repetitions per measurement"
    )
    parser.add_argument(
        "--clock",
        choices=sorted(CLOCKS),
        default="wall",
        help="wall time, or the thread's CPU time (steadier on a shared, busy machine)",
    )
    parser.add_argument(
        "--max-call",
        type=float,
        default=2.0,
        help="skip batch sizes whose calls would take longer than this (seconds)",
    )


def main(args: argparse.Namespace) -> int:
    """Run the benchmark from parsed arguments and print the report."""
    # First: the policy must be in place before anything starts PyTorch's thread pools.
    apply_torch_policy(ThreadPolicy.single())
    export_dir = Path(args.export_dir) if args.export_dir else latest_export()
    if args.backends:
        backends = [b for b in args.backends.split(",") if b]
    else:
        backends, passed_over = usable_backends(export_dir)
        for reason in passed_over:
            print(f"not measured: {reason}")
        if not backends:
            raise SystemExit(f"{export_dir}: no backend can run here (see above)")
    result = run(
        export_dir,
        backends,
        [int(b) for b in args.batch_sizes.split(",") if b],
        args.budget,
        args.clock,
        args.max_call,
    )
    print(format_report(result))
    return 0
