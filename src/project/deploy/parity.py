"""Parity: every artifact, run in a fresh process, against the eager deploy graph."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from project.contract import InputContract
from project.data.columnar import ColumnarData, Jagged
from project.deploy.graph import DeployGraph

Case = list[np.ndarray]


@dataclass
class Tolerance:
    """Pass when ``|artifact - eager| <= abs + rel * |eager|`` everywhere (and all finite)."""

    abs: float
    rel: float


@dataclass
class ParityResult:
    """One artifact's verdict: one row of the parity table."""

    format: str
    device: str
    file: str
    optimization: str | None
    batch_sizes: list[int]
    max_abs: float | None
    max_rel: float | None
    rowwise_max_abs: float | None
    load_seconds: float | None
    passed: bool
    tolerance: dict[str, float]
    error: str | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """Plain-dict form for the manifest."""
        return asdict(self)


def _rows_as_case(data: ColumnarData, contract: InputContract) -> Case:
    soa = data.to_soa(contract)
    return [np.ascontiguousarray(soa[name]) for name in contract.input_names]


def _without_objects(data: ColumnarData, rows: np.ndarray) -> ColumnarData:
    """Copy of ``data`` where ``rows`` have no objects in any jagged collection."""
    jagged = {}
    for name, coll in data.jagged.items():
        counts = coll.counts.copy()
        owner = np.repeat(np.arange(len(counts)), counts)
        keep = ~np.isin(owner, rows)
        counts[rows] = 0
        jagged[name] = Jagged.from_counts(counts, {k: v[keep] for k, v in coll.fields.items()})
    return ColumnarData(data.flat, jagged, data.labels, data.source)


# Objects before and after a view's rows in its field arrays (``offsets_view``): large finite
# values, so that reading one of them would change the outputs.
VIEW_PADDING = (5, 3)
VIEW_FILL = 1.0e6


def offsets_view(case: Case, contract: InputContract) -> Case:
    """The same rows as ``case`` handed over as a framework's view of a larger collection: each
    collection's offsets start at ``VIEW_PADDING[0]``, and its field arrays hold other objects
    before and after the rows' own (``contract.OFFSETS_RULE``). Every consumer must give the
    same outputs as for ``case``."""
    before, after = VIEW_PADDING
    view = list(case)
    pos = len(contract.flat)
    for coll in contract.jagged:
        view[pos] = case[pos] + before
        for j in range(pos + 1, pos + 1 + len(coll.fields)):
            pad = np.full(before + after, VIEW_FILL, dtype=case[j].dtype)
            view[j] = np.concatenate([pad[:before], case[j], pad[before:]])
        pos += 1 + len(coll.fields)
    return view


def build_cases(
    rows: ColumnarData, contract: InputContract, batch_sizes: list[int], rowwise: int
) -> tuple[dict[str, Case], dict[str, int]]:
    """Parity inputs from real rows: each batch size (rows repeated if there are too few),
    rows with zero objects, a batch with no objects at all, a view of a larger collection
    (``offsets_view``), and ``rowwise`` single rows.

    Returns the cases and the batch size of each.
    """
    n = len(rows)
    cases: dict[str, Case] = {}
    sizes: dict[str, int] = {}
    for b in batch_sizes:
        idx = np.arange(b) % n
        cases[f"batch{b}"] = _rows_as_case(rows.take(idx), contract)
        sizes[f"batch{b}"] = b
    if contract.jagged:
        some = rows.take(np.arange(8) % n)
        cases["zero_objects"] = _rows_as_case(_without_objects(some, np.array([1, 4, 5])), contract)
        sizes["zero_objects"] = 8
        none = rows.take(np.arange(3) % n)
        cases["no_objects"] = _rows_as_case(_without_objects(none, np.arange(3)), contract)
        sizes["no_objects"] = 3
        cases["offsets_view"] = offsets_view(_rows_as_case(some, contract), contract)
        sizes["offsets_view"] = 8
    for i in range(min(rowwise, n)):
        cases[f"row{i}"] = _rows_as_case(rows.take(np.array([i])), contract)
        sizes[f"row{i}"] = 1
    return cases, sizes


def eager_outputs(graph: DeployGraph, cases: dict[str, Case]) -> dict[str, list[np.ndarray]]:
    """The eager deploy graph's float32 outputs for every case (the reference)."""
    out = {}
    with torch.inference_mode():
        for name, case in cases.items():
            out[name] = [o.numpy() for o in graph(*(torch.from_numpy(a) for a in case))]
    return out


def run_artifact(
    fmt: str,
    artifact: Path,
    device: str,
    cases: dict[str, Case],
    optimization: str = "all",
    timeout: float = 900.0,
) -> tuple[dict[str, list[np.ndarray]], float]:
    """Run an artifact on every case in a child process; return outputs and load time.

    Raises ``RuntimeError`` with the child's stderr if it fails or crashes (a negative exit
    status is a signal: a segfault while loading compiled code, for instance).
    """
    with tempfile.TemporaryDirectory(prefix="parity-") as tmp:
        cases_file = Path(tmp) / "cases.npz"
        np.savez(
            cases_file, **{f"{c}::{i}": a for c, arrs in cases.items() for i, a in enumerate(arrs)}
        )
        cmd = [
            sys.executable,
            "-m",
            "project.deploy._parity_worker",
            fmt,
            str(artifact),
            device,
            str(cases_file),
            tmp,
            optimization,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if proc.returncode != 0:
            how = (
                f"crashed with signal {-proc.returncode}"
                if proc.returncode < 0
                else f"exited with status {proc.returncode}"
            )
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            raise RuntimeError(f"loading/running {artifact.name} in a fresh process {how}:\n{tail}")
        result = json.loads((Path(tmp) / "result.json").read_text())
        outputs: dict[str, list[np.ndarray]] = {}
        with np.load(Path(tmp) / "outputs.npz") as data:
            for key in data.files:
                case, j = key.rsplit("::", 1)
                outputs.setdefault(case, []).append((int(j), data[key]))  # type: ignore[arg-type]
        ordered = {c: [a for _, a in sorted(v, key=lambda p: p[0])] for c, v in outputs.items()}
        return ordered, float(result["load_seconds"])


def compare(
    fmt: str,
    device: str,
    artifact: Path,
    cases: dict[str, Case],
    sizes: dict[str, int],
    reference: dict[str, list[np.ndarray]],
    tolerance: Tolerance,
    optimization: str | None = None,
) -> ParityResult:
    """Run ``artifact`` in a child process and compare every case with ``reference``.

    Also checks that the artifact's row-by-row outputs equal its batched outputs for the
    first rows of the largest batch.
    """
    result = ParityResult(
        format=fmt,
        device=device,
        file=artifact.name,
        optimization=optimization,
        batch_sizes=sorted(set(sizes.values())),
        max_abs=None,
        max_rel=None,
        rowwise_max_abs=None,
        load_seconds=None,
        passed=False,
        tolerance=asdict(tolerance),
    )
    try:
        outputs, result.load_seconds = run_artifact(
            fmt, artifact, device, cases, optimization or "all"
        )
    except Exception as err:  # a failing format is a verdict, not a crash of the export
        result.error = str(err)
        return result
    max_abs = max_rel = 0.0
    ok = True
    for case, ref in reference.items():
        got = outputs.get(case)
        if got is None or len(got) != len(ref):
            result.error = (
                f"case {case}: expected {len(ref)} outputs, got {0 if got is None else len(got)}"
            )
            return result
        for r, g in zip(ref, got, strict=True):
            if g.shape != r.shape:
                result.error = f"case {case}: output shape {g.shape}, expected {r.shape}"
                return result
            if not np.all(np.isfinite(g)):
                result.error = f"case {case}: NaN or Inf in the artifact's output"
                return result
            diff = np.abs(g.astype(np.float64) - r)
            max_abs = max(max_abs, float(diff.max(initial=0.0)))
            max_rel = max(max_rel, float((diff / np.maximum(np.abs(r), 1e-12)).max(initial=0.0)))
            ok &= bool(np.all(diff <= tolerance.abs + tolerance.rel * np.abs(r)))
    rows = sorted((k for k in outputs if k.startswith("row")), key=lambda k: int(k[3:]))
    if rows:
        largest = max((k for k in sizes if k.startswith("batch")), key=lambda k: sizes[k])
        rowwise_abs = 0.0
        for i, key in enumerate(rows):
            for batched, single in zip(outputs[largest], outputs[key], strict=True):
                d = abs(float(batched[i]) - float(single[0]))
                rowwise_abs = max(rowwise_abs, d)
                ok &= d <= tolerance.abs + tolerance.rel * abs(float(batched[i]))
        result.rowwise_max_abs = rowwise_abs
    result.max_abs, result.max_rel, result.passed = max_abs, max_rel, ok
    if not ok:
        result.error = f"outside tolerance abs={tolerance.abs} rel={tolerance.rel}"
    return result


def format_table(results: list[ParityResult]) -> str:
    """The parity table as fixed-width text."""
    width = max([11, *(len(r.format) for r in results)]) + 1
    head = f"{'format':<{width}}{'device':<7}{'opt':<5}{'batch sizes':<26}{'max abs':>10}{'max rel':>10}{'row/batch':>11}{'load s':>8}  verdict"
    lines = [head, "-" * len(head)]
    for r in results:
        fmt_num = lambda v: "-" if v is None else f"{v:.1e}"  # noqa: E731
        sizes = ",".join(map(str, r.batch_sizes))
        lines.append(
            f"{r.format:<{width}}{r.device:<7}{(r.optimization or '-'):<5}{sizes:<26}{fmt_num(r.max_abs):>10}"
            f"{fmt_num(r.max_rel):>10}{fmt_num(r.rowwise_max_abs):>11}"
            f"{'-' if r.load_seconds is None else f'{r.load_seconds:.2f}':>8}  "
            + ("PASS" if r.passed else f"FAIL: {(r.error or '').splitlines()[0][:80]}")
        )
    return "\n".join(lines)


def format_failures(results: list[ParityResult]) -> str:
    """The whole reason of every failed row; the table shows only its first line.

    A child process that failed to load or run an artifact reports its stderr's last lines
    here, which is where the cause (a missing symbol, a version mismatch) is named.
    """
    blocks = []
    first: dict[str, str] = {}  # reason -> the row that printed it (both ONNX levels, say)
    for r in results:
        if r.passed:
            continue
        label = "/".join(x for x in (r.format, r.device, r.optimization) if x)
        reason = (r.error or "no reason recorded").rstrip()
        if reason in first:
            blocks.append(f"{label} failed: the same reason as {first[reason]}")
            continue
        first[reason] = label
        blocks.append(f"{label} failed: " + reason.replace("\n", "\n    "))
    return "\n".join(blocks)
