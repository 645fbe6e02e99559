"""The template's own benchmarks (``scripts/benchmark.py``, ``tools/benchmarks/``) run and
report what they claim. A new analysis leaves this file out with the tools it tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
