"""The template's own benchmarks (``scripts/benchmark.py``, ``tools/benchmarks/``) run and
report what they claim: training, streaming, and inference (on the CPU, and as on CUDA on host
tensors). A new analysis leaves this file out with the tools it tests."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from project.inference import FORMATS
from project.inference.threads import ThreadPolicy, apply_torch_policy

ROOT = Path(__file__).resolve().parents[1]

# The inter-op pool can be sized only before any inter-op work in this process, so the
# deployment policy is applied at import (the inference benchmark loads models under it);
# intra-op threads are given back to the other tests afterwards.
_INTRA_OP = torch.get_num_threads()
apply_torch_policy(ThreadPolicy.single())
torch.set_num_threads(_INTRA_OP)


@pytest.fixture(scope="module", autouse=True)
def _restore_intra_op_threads():
    yield
    torch.set_num_threads(_INTRA_OP)


def write_manifest(export_dir: Path, manifest: dict) -> None:
    """Replace an export's manifest and its hash record, as the export writes them."""
    text = json.dumps(manifest, indent=2) + "\n"
    (export_dir / "manifest.json").write_text(text)
    (export_dir / "manifest.sha256").write_text(hashlib.sha256(text.encode()).hexdigest() + "\n")


def test_training_benchmark_compares_both_sides(tmp_path: Path) -> None:
    """``scripts/benchmark.py train`` runs the template and the hand-written loop in turn on
    the model's experiment config and reports the medians and every run."""
    out = tmp_path / "bench.jsonl"
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts/benchmark.py"), "train", "--model", "mlp",
         "--batch-size", "32", "--steps", "4", "--warmup", "2", "--rows", "600",
         "--accelerator", "cpu", "--repeats", "2", "--ceiling", "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=False, cwd=ROOT,
        env={**os.environ, "BENCHMARK_DIR": str(tmp_path / "logs")},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(out.read_text().splitlines()[-1])
    assert row["repeats"] == 2
    assert len(row["all"]["template"]) == len(row["all"]["loop"]) == 2
    assert row["template_rows_s"] > 0
    assert row["handwritten_rows_s"] > 0
    ratio = row["template_rows_s"] / row["handwritten_rows_s"]
    assert row["ratio_handwritten"] == pytest.approx(ratio, 0.01)
    assert row["batch"] == 32
    # The CPU's defaults: one optimiser step per Lightning step, no graph, no compiler, fp32;
    # the ceiling needs a GPU.
    assert (row["steps_per_call"], row["graph_steps"], row["compile"]) == (1, 0, False)
    assert row["precision"] == "32-true"
    assert row["ceiling_rows_s"] is None
    assert "template" in result.stdout


def test_streaming_benchmark_compares_and_measures_an_epoch(tmp_path: Path) -> None:
    """``benchmark.py train --stream-compare`` trains in memory and streamed on the same files
    and reports the medians and every run; ``--stream-epoch`` streams one epoch under the
    memory budget (the data would not fit it) and reports the peak memory against it."""
    env = {**os.environ, "BENCHMARK_DIR": str(tmp_path / "logs")}
    shards = tmp_path / "shards"
    generate = subprocess.run(
        [sys.executable, "scripts/generate.py", "data=toy", "data.source.n_jets=6000",
         "+data.source.block_rows=1000", f"shards.dir={shards}", "shards.size=400kB",
         "shards.row_group_rows=500"],
        capture_output=True, text=True, timeout=300, check=False, cwd=ROOT, env=env,
    )  # fmt: skip
    assert generate.returncode == 0, generate.stderr[-3000:]
    common = ["--model", "mlp", "--batch-size", "32", "--accelerator", "cpu",
              "--shuffle-buffer", "200", "--files", str(shards / "*.parquet")]  # fmt: skip
    out = tmp_path / "bench.jsonl"
    for mode in (["--stream-compare", "--steps", "4", "--warmup", "2", "--repeats", "2"],
                 ["--stream-epoch", "--warmup", "2", "--memory-budget", "5e5"]):  # fmt: skip
        result = subprocess.run(
            [sys.executable, str(ROOT / "scripts/benchmark.py"), "train", *mode, "--json",
             str(out), *common],
            capture_output=True, text=True, timeout=300, check=False, cwd=ROOT, env=env,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
    compare, epoch = (json.loads(line) for line in out.read_text().splitlines())
    assert len(compare["in_memory_all"]) == len(compare["streamed_all"]) == 2
    assert compare["ratio"] == pytest.approx(
        compare["streamed_rows_s"] / compare["in_memory_rows_s"], 0.01
    )
    assert epoch["train_rows"] > 0
    assert epoch["steps"] == -(-epoch["train_rows"] // 32)
    assert epoch["peak_rss_gb"] >= epoch["baseline_rss_gb"] > 0
    assert epoch["limit_gb"] == pytest.approx(5e5 / 1e9 + 1, abs=1e-3)
    assert "data: streaming (data.stream=auto" in result.stderr


# --- scripts/benchmark.py inference ---------------------------------------------------------


def test_benchmark_runs(exported) -> None:
    from tools.benchmarks.inference import added, format_report, run

    result = run(exported("deepsets"), ["onnx", "aoti"], [1, 3], budget=0.01)
    row = result["rows"][0]
    assert {"raw", "full", "no_scan", "soa", "soa_warm", "added", "added_no_scan"} <= set(row)
    # What a call adds is paired by repetition: a slow spell shared by both calls cancels.
    times = {"raw": [1.0, 5.0, 1.0], "full": [1.5, 5.5, 1.25]}
    assert added(times, "full") == 0.5
    assert result["flops"][1] > 0
    report = format_report(result)
    for text in ("onnx", "aoti", "eager", "SoA us warm", "GFLOP/s"):
        assert text in report
    assert "in chunks" not in report  # no batch above max_batch
    result["rows"][-1]["batch"] = result["max_batch"] + 1
    assert f"runs in chunks of {result['max_batch']}" in format_report(result)


def test_benchmark_measures_the_backends_that_can_run(exported, tmp_path: Path) -> None:
    """Without --backends: the export's artifacts that ``load`` would accept here, the others
    named with the reason (an export without TorchScript, say)."""
    from tools.benchmarks.inference import usable_backends

    assert usable_backends(exported("mlp")) == (list(FORMATS), [])
    copy = tmp_path / "export"
    shutil.copytree(exported("mlp"), copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["artifacts"] = [a for a in manifest["artifacts"] if a["format"] != "torchscript"]
    for art in manifest["artifacts"]:
        art["passed"] = art["format"] != "onnx"
    manifest["provenance"]["torch"] = "0.0.0"  # the AOTInductor package: another torch build
    write_manifest(copy, manifest)
    usable, passed_over = usable_backends(copy)
    assert usable == []
    assert passed_over == [
        "torchscript: no cpu artifact in the export",
        f"aoti: cannot run {copy / 'model.pt2'} here: compiled with torch 0.0.0, this is torch "
        f"{torch.__version__}",
        "onnx: failed its parity check at export. Fix the export (see the manifest's parity "
        "table).",
    ]


def test_benchmark_verdicts() -> None:
    """A full call measured faster than raw by more than the target is noise, not a pass."""
    from tools.benchmarks.inference import format_report, verdict

    assert verdict(0.19, 1) == "met"
    assert verdict(0.21, 1) == "MISSED"
    assert verdict(-0.02, 4096) == "met"
    assert verdict(-0.031, 4096) == "unclear"

    def row(full: float, added: float) -> dict:
        us = 1e-6
        return {"backend": "aoti", "batch": 4096, "raw": 100 * us, "full": full * us,
                "added": added * us, "no_scan": 100 * us, "added_no_scan": 0.0,
                "soa": 1 * us, "soa_warm": 1 * us}  # fmt: skip

    def report(*rows: dict) -> str:
        return format_report({"name": "m", "clock": "cpu", "rows": list(rows), "eager": {},
                              "flops": {}, "skipped": []})  # fmt: skip

    # The less favourable of the two estimates is judged: 102 us by medians, +4 us paired.
    missed = report(row(102, 4))
    assert " MISSED " in missed
    assert "unclear" not in missed
    noisy = report(row(76, -24), row(102, 2))
    assert "-24.0% unclear" in noisy
    assert "+2.0%     met" in noisy
    assert "rerun with --clock cpu" in noisy.splitlines()[-1]


def test_benchmark_report_and_json(exported, tmp_path: Path, capsys) -> None:
    """``scripts/benchmark.py inference --json``: the table, the report (machine, parameters,
    FLOPs, memory, latency statistics) and the same figures as JSON."""
    from tools.benchmarks.inference import add_arguments, main

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    path = tmp_path / "out" / "bench.json"
    args = parser.parse_args(
        [str(exported("mlp")), "--backends", "onnx", "--batch-sizes", "1,3", "--budget", "0.01",
         "--json", str(path)]
    )  # fmt: skip
    assert main(args) == 0
    printed = capsys.readouterr().out
    result = json.loads(path.read_text())
    assert {"machine", "parameters", "flops", "memory", "rows", "device"} <= set(result)
    assert result["device"] == "cpu"
    assert result["machine"]["cores"] >= 1
    assert result["machine"]["cpu"]
    assert result["parameters"] > 0
    assert result["memory"]["1"]["peak_rss"] > 0
    row = result["rows"][0]
    for kind in ("raw", "full"):
        st = row["stats"][kind]
        assert st["min"] <= st["p50"] <= st["p90"] <= st["p99"]
        assert st["calls"] >= 3
        assert st["std"] >= 0
    for text in ("machine:", "parameters", "FLOP/row", "p99 us", "peak RSS MB", "written:"):
        assert text in printed
    assert not list(path.parent.glob(".*tmp"))


def test_cuda_verdicts_and_table() -> None:
    """The CUDA target: the full call may add 10 us, or 5% of raw, whichever is larger."""
    from tools.benchmarks.inference import cuda_verdict, format_cuda_report

    us = 1e-6

    def row(batch: int, raw: float, full: float, added: float) -> dict:
        return {"backend": "torchscript", "batch": batch, "raw": raw * us, "full": full * us,
                "added": added * us, "no_scan": raw * us, "added_no_scan": 0.0,
                "validate": 2 * raw * us}  # fmt: skip

    assert cuda_verdict(row(1, 100, 109, 9))[1] == "met"
    assert cuda_verdict(row(1, 100, 111, 11))[1] == "MISSED"
    assert cuda_verdict(row(16384, 1000, 1049, 49))[1] == "met"  # 5% of 1 ms: 50 us
    assert cuda_verdict(row(16384, 1000, 1060, 40))[1] == "MISSED"  # the less favourable
    assert cuda_verdict(row(1024, 1000, 900, -100))[1] == "unclear"
    table = format_cuda_report(
        {
            "name": "m",
            "device": "cuda:0",
            "rows": [row(1, 100, 111, 11)],
            "eager": {1: 90 * us},
            "machine": {"torch": "x", "gpu": {"name": "GPU"}},
        }
    )
    assert "m on GPU (cuda:0)" in table
    assert "+11.0  +11.0%  MISSED" in table


def test_device_benchmark_on_host_tensors(exported) -> None:
    """The ``--device cuda`` measurements, run on host tensors: every call kind per backend
    and batch, its statistics, and the CUDA table and report made from them."""
    from tools.benchmarks.inference import format_cuda_report, format_stats, run_device

    result = run_device(exported("deepsets"), ["torchscript", "onnx"], [1, 5], 0.01, "cpu")
    assert [(r["backend"], r["batch"]) for r in result["rows"]] == [
        ("torchscript", 1), ("onnx", 1), ("torchscript", 5), ("onnx", 5)
    ]  # fmt: skip
    for row in result["rows"]:
        assert set(row["stats"]) == {"raw", "full", "no_scan", "validate"}
        assert {"added", "added_no_scan"} <= set(row)
    assert "cuda_max_allocated" not in result["memory"][1]
    assert result["flops"][5] == 5 * result["flops"][1]
    table = format_cuda_report(result)
    assert table.count("\nonnx ") == 2
    assert "validate" in format_stats(result)
