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

With ``--device cuda`` the export's CUDA artifacts run on device-resident columns (torch
tensors); every timed call ends with ``torch.cuda.synchronize()``, so a latency is the call's
until its results exist. The target there: the full call adds at most 10 us, or 5% of the raw
call, at batch 1, 1024 and 16384. Besides the table, a report like pytorch_benchmark's (machine,
parameters, FLOPs, peak memory, latency mean, std and percentiles per batch size) is printed,
and written as JSON with ``--json PATH``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from project.contract import InputContract
from project.data.columnar import ColumnarData
from project.inference.threads import ThreadPolicy, apply_torch_policy

BATCH_SIZES = (1, 64, 1024, 4096, 16384)
TARGETS = {1: 0.20, 4096: 0.03}  # allowed SoA overhead over the raw backend, by batch size
CUDA_BATCH_SIZES = (1, 1024, 16384)
CUDA_TARGET = (10e-6, 0.05)  # the full call may add 10 us, or 5% of the raw call
PERCENTILES = (50, 90, 99)
# CPU time of the calling thread: with one thread doing all the work (the deployment policy)
# it is the latency of an idle machine, without the time spent waiting for a busy core.
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def tile_golden(
    golden: dict[str, np.ndarray], contract: InputContract, batch: int
) -> dict[str, np.ndarray]:
    """The golden rows repeated to ``batch`` rows, as contiguous SoA columns (gathered by the
    data layer's ``ColumnarData.take``)."""
    table = ColumnarData.from_soa(golden, contract)
    return table.take(np.arange(batch) % len(table)).to_soa(contract)


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


def _raw_call(model: Any, cols: dict[str, Any]) -> Callable[[], Any]:
    names, runner = model.input_names, model.runner
    if isinstance(cols[names[0]], torch.Tensor):  # the tensor path (always on CUDA)
        tensors = [cols[n] for n in names]
        return lambda: runner.call(tensors)
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


def count_flops(graph: torch.nn.Module, cols: dict[str, Any], names: list[str]) -> int:
    """FLOPs of one call of the eager graph on ``cols`` (``FlopCounterMode``), numpy columns
    or tensors on the graph's device."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter, torch.inference_mode():
        graph(*(torch.as_tensor(cols[n]) for n in names))
    return int(counter.get_total_flops())


def stats(seconds: list[float]) -> dict[str, float]:
    """Mean, standard deviation, minimum and percentiles (``PERCENTILES``) of call times."""
    values = np.asarray(seconds)
    out = {"mean": float(values.mean()), "std": float(values.std()), "min": float(values.min())}
    out.update({f"p{q}": float(np.percentile(values, q)) for q in PERCENTILES})
    return out | {"calls": len(seconds)}


def peak_rss() -> int:
    """The process's peak resident memory so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    """The CPU (model, cores), the GPU of ``device`` if CUDA, and the library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    info: dict[str, Any] = {"cpu": cpu, "cores": os.cpu_count(), "cores_usable": usable}
    info |= {"python": platform.python_version(), "torch": torch.__version__}
    info |= {"numpy": np.__version__}
    try:
        import onnxruntime

        info["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        pass
    if device is not None and device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["gpu"] = {
            "name": props.name,
            "memory_gib": round(props.total_memory / 2**30, 1),
            "multiprocessors": props.multi_processor_count,
            "capability": f"{props.major}.{props.minor}",
            "cuda": torch.version.cuda,
        }
    return info


def count_parameters(graph: torch.nn.Module | None, models: dict[str, Any]) -> int | None:
    """Parameters of the eager graph, else of a loaded TorchScript module; ``None`` if
    neither is at hand (an AOTInductor or ONNX artifact holds its weights as constants)."""
    module = graph
    if module is None and "torchscript" in models:
        module = models["torchscript"].runner.module
    return None if module is None else sum(p.numel() for p in module.parameters())


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
    memory: dict[int, dict[str, int]] = {}
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
            found["stats"] = {k: stats(v) for k, v in times.items()}
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
        memory[batch] = {"peak_rss": peak_rss()}
    return {
        "name": manifest["name"],
        "device": "cpu",
        "clock": clock,
        "max_batch": next(iter(models.values())).max_batch,
        "rows": rows,
        "eager": eager,
        "flops": flops,
        "skipped": skipped,
        "machine": machine_info(),
        "parameters": count_parameters(graph, models),
        "memory": memory,
    }


def run_device(
    export_dir: Path, backends: list[str], batch_sizes: list[int], budget: float, device: str
) -> dict[str, Any]:
    """The measurements on tensor columns of ``device`` (``cuda``; ``cpu`` runs the same path
    on host tensors): per backend and batch size the latency of ``raw`` (the loaded module or
    package on ready tensors), ``full`` (the default call: tensor columns in, tensors out, the
    value checks on the device without waiting), ``no_scan`` (``nan_policy="ignore"``) and
    ``validate`` (``validate=True``: waits for the checks), each call synchronised; eager
    PyTorch on the device; FLOPs; peak memory per batch size."""
    from project.inference import load

    manifest = json.loads((export_dir / "manifest.json").read_text())
    models = {b: load(export_dir, b, device=device) for b in backends}
    unchecked = {b: m.with_nan_policy("ignore") for b, m in models.items()}
    first = next(iter(models.values()))
    contract, where = first.contract, first.device
    with np.load(export_dir / manifest["golden"]["file"]) as data:
        golden = {k: data[k] for k in data.files}
    graph = eager_graph(manifest)
    graph = None if graph is None else graph.to(where)
    cuda = where.type == "cuda"
    sync = torch.cuda.synchronize if cuda else lambda: None
    rows: list[dict[str, Any]] = []
    eager: dict[int, float] = {}
    flops: dict[int, int] = {}
    memory: dict[int, dict[str, int]] = {}
    for batch in sorted(batch_sizes):
        cols = {
            n: torch.from_numpy(a).to(where)
            for n, a in tile_golden(golden, contract, batch).items()
        }
        if cuda:
            torch.cuda.reset_peak_memory_stats(where)
        for name, model in models.items():
            raw = _raw_call(model, cols)
            calls = {
                "raw": lambda f=raw: (f(), sync()),
                "full": lambda m=model, c=cols: (m(c), sync()),
                "no_scan": lambda m=unchecked[name], c=cols: (m(c), sync()),
                "validate": lambda m=model, c=cols: (m(c, validate=True), sync()),
            }
            times = measure(calls, budget)
            model.synchronize()  # the last call's checks, read
            found: dict[str, Any] = {k: statistics.median(v) for k, v in times.items()}
            found["stats"] = {k: stats(v) for k, v in times.items()}
            found["added"] = added(times, "full")
            found["added_no_scan"] = added(times, "no_scan")
            rows.append({"backend": name, "batch": batch, **found})
        if graph is not None:
            tensors = [cols[n] for n in contract.input_names]

            def call(tensors: list[torch.Tensor] = tensors) -> Any:
                with torch.inference_mode():
                    graph(*tensors)
                sync()

            eager[batch] = medians({"eager": call}, budget)["eager"]
            flops[batch] = count_flops(graph, cols, contract.input_names)
        memory[batch] = {"peak_rss": peak_rss()}
        if cuda:
            memory[batch]["cuda_max_allocated"] = torch.cuda.max_memory_allocated(where)
    return {
        "name": manifest["name"],
        "device": str(where),
        "clock": "wall",
        "max_batch": first.max_batch,
        "rows": rows,
        "eager": eager,
        "flops": flops,
        "skipped": [],
        "machine": machine_info(where),
        "parameters": count_parameters(graph, models),
        "memory": memory,
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


def cuda_verdict(row: dict[str, Any]) -> tuple[float, str]:
    """What the full call adds over raw on CUDA (the less favourable of the two estimates), and
    ``met`` / ``MISSED`` against ``CUDA_TARGET`` (``unclear``: full ran faster than raw by
    more than the allowance, the machine's noise)."""
    more = max(row["full"] - row["raw"], row["added"])
    allowed = max(CUDA_TARGET[0], CUDA_TARGET[1] * row["raw"])
    if more < -allowed:
        return more, "unclear"
    return more, "met" if more <= allowed else "MISSED"


def format_cuda_report(result: dict[str, Any]) -> str:
    """The CUDA table of ``scripts/benchmark.py inference --device cuda``."""
    gpu = result["machine"].get("gpu", {}).get("name", result["device"])
    head = (
        f"{'backend':<12}{'batch':>6}{'raw us':>11}{'full us':>11}{'added us':>10}"
        f"{'added':>8}{'target':>8}{'no-scan added us':>18}{'validate us':>13}{'full rows/s':>14}"
    )
    lines = [
        f"{result['name']} on {gpu} ({result['device']}): median latency per call, each call "
        f"synchronised, torch {result['machine']['torch']}",
        "  raw = the loaded module or package on ready device tensors; full = the default call",
        "  (device columns in, device outputs out, NaN/Inf screen and offsets checks queued on",
        "  the device, read at a later call); added = full over raw, the larger of the",
        "  difference of medians and the median of paired differences; target = at most",
        f"  +{CUDA_TARGET[0] * 1e6:.0f} us or +{CUDA_TARGET[1]:.0%} of raw, whichever is larger; "
        "no-scan = added with nan_policy=",
        "  'ignore'; validate = the call with validate=True (waits for the checks)",
        head,
        "-" * len(head),
    ]
    for r in result["rows"]:
        more, judged = cuda_verdict(r)
        no_scan = max(r["no_scan"] - r["raw"], r["added_no_scan"])
        lines.append(
            f"{r['backend']:<12}{r['batch']:>6}{_us(r['raw']):>11}{_us(r['full']):>11}"
            f"{more * 1e6:>+10.1f}{more / r['raw']:>+8.1%}{judged:>8}{no_scan * 1e6:>+18.1f}"
            f"{_us(r['validate']):>13}{r['batch'] / r['full']:>14,.0f}"
        )
    for batch, seconds in result["eager"].items():
        lines.append(f"{'eager':<12}{batch:>6}{_us(seconds):>11}")
    return "\n".join(lines)


def format_stats(result: dict[str, Any]) -> str:
    """The report like pytorch_benchmark's: machine, parameters, FLOPs, peak memory, and the
    latency mean, std and percentiles of every call kind per backend and batch size."""
    m = result["machine"]
    gpu = m.get("gpu")
    params = result.get("parameters")
    lines = [
        f"machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable)"
        + (f"; GPU {gpu['name']}, {gpu['memory_gib']} GiB, CUDA {gpu['cuda']}" if gpu else "")
        + f"; Python {m['python']}, torch {m['torch']}",
        f"model {result['name']} on {result['device']}: "
        + (f"{params:,} parameters" if params is not None else "parameters unknown")
        + "".join(
            f"; {f / b:,.0f} FLOP/row (batch {b})" for b, f in list(result["flops"].items())[-1:]
        ),
    ]
    head = (
        f"{'backend':<12}{'batch':>6}{'call':>10}{'mean us':>12}{'std us':>10}"
        + "".join(f"{f'p{q} us':>12}" for q in PERCENTILES)
        + f"{'rows/s':>14}{'peak RSS MB':>13}{'CUDA max MB':>13}"
    )
    lines += [head, "-" * len(head)]
    for r in result["rows"]:
        mem = result["memory"].get(r["batch"], {})
        cuda = mem.get("cuda_max_allocated")
        for kind, st in r.get("stats", {}).items():
            lines.append(
                f"{r['backend']:<12}{r['batch']:>6}{kind:>10}{_us(st['mean']):>12}"
                f"{_us(st['std']):>10}"
                + "".join(f"{_us(st[f'p{q}']):>12}" for q in PERCENTILES)
                + f"{r['batch'] / st['mean']:>14,.0f}{mem.get('peak_rss', 0) / 2**20:>13,.0f}"
                + (f"{cuda / 2**20:>13,.1f}" if cuda is not None else f"{'-':>13}")
            )
    return "\n".join(lines)


def write_json(result: dict[str, Any], path: Path) -> None:
    """``result`` as JSON at ``path``, published whole (a temporary file, then a rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)


def usable_backends(export_dir: Path, device: str = "cpu") -> tuple[list[str], list[str]]:
    """The export's backends for ``device`` (``cpu`` or ``cuda``) that ``load`` would accept
    here, and why the others not (no artifact, parity failed, an AOTInductor package compiled
    for another torch or CPU)."""
    from project.inference import FORMATS, ArtifactError
    from project.inference.export_dir import choose_artifact, read_export

    export = read_export(export_dir)
    usable, passed_over = [], []
    for fmt in FORMATS:
        try:
            choose_artifact(export, fmt, device, "all")
        except ArtifactError as err:
            # "<dir>: no usable artifact ... on <device>: <fmt>: <reason>", or the reason alone.
            message = str(err)
            sep = f" on {device}: "
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
    parser.add_argument(
        "--device",
        default="cpu",
        help="cpu, or cuda[:N]: the export's CUDA artifacts on device-resident columns",
    )
    parser.add_argument(
        "--batch-sizes",
        help=f"comma-separated (default: {','.join(map(str, BATCH_SIZES))} on the CPU, "
        f"{','.join(map(str, CUDA_BATCH_SIZES))} on CUDA)",
    )
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
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
    cuda = args.device.startswith("cuda")
    if args.backends:
        backends = [b for b in args.backends.split(",") if b]
    else:
        backends, passed_over = usable_backends(export_dir, "cuda" if cuda else "cpu")
        for reason in passed_over:
            print(f"not measured: {reason}")
        if not backends:
            raise SystemExit(f"{export_dir}: no backend can run on {args.device} (see above)")
    sizes = args.batch_sizes or ",".join(map(str, CUDA_BATCH_SIZES if cuda else BATCH_SIZES))
    batch_sizes = [int(b) for b in sizes.split(",") if b]
    if cuda:
        result = run_device(export_dir, backends, batch_sizes, args.budget, args.device)
        print(format_cuda_report(result))
    else:
        result = run(export_dir, backends, batch_sizes, args.budget, args.clock, args.max_call)
        print(format_report(result))
    print(format_stats(result))
    if args.json:
        write_json(result, args.json)
        print(f"written: {args.json}")
    return 0
