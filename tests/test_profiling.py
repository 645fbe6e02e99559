"""Profiling one switch away: ``profiler=pytorch`` writes a chrome trace into the run
directory with the template's named ranges; the ranges cost nothing when profiling is off."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from project.utils import profiling

RANGES = {
    "soa.gather",
    "soa.assemble",
    "train.forward",
    "train.backward",
    "train.optimizer_step",
    "eval.validation",
}


def test_profiler_pytorch_traces_the_named_ranges(
    tmp_path: Path, fast_overrides, compose_train
) -> None:
    from project.training.run import train

    cfg = compose_train(
        [*fast_overrides, "model=deepsets", "profiler=pytorch", "data.eval_batch_size=16"],
        tmp_path,
    )  # five validation steps: the schedule records steps 3 to 5 of each kind
    was = profiling.enabled()
    try:
        train(cfg)
    finally:
        profiling.enable(was)
    run = Path(cfg.paths.output_dir)
    traces = sorted((run / "profile").glob("*.pt.trace.json"))
    assert traces, sorted(p.name for p in run.rglob("*"))
    names: set[str] = set()
    for trace in traces:
        events = json.loads(trace.read_text())["traceEvents"]  # chrome trace format
        names |= {e.get("name") for e in events}
    assert names >= RANGES, RANGES - names
    assert (run / "profile" / "fit-profile.txt").is_file()  # the summary table


def test_ranges_are_free_and_silent_when_profiling_is_off() -> None:
    was = profiling.enabled()
    try:
        profiling.enable(False)
        assert profiling.marked("a") is profiling.marked("b")  # one shared no-op
        with torch.profiler.profile() as prof, profiling.marked("soa.gather"):
            torch.ones(3).sum()
        assert "soa.gather" not in {e.name for e in prof.events()}
        profiling.enable(True)
        with torch.profiler.profile() as prof, profiling.marked("soa.gather"):
            torch.ones(3).sum()
        assert "soa.gather" in {e.name for e in prof.events()}
        # Inside a trace (an export), nothing is recorded into the graph.
        traced = torch.jit.trace(lambda x: _marked_double(x), torch.ones(2))
        assert "record_function" not in str(traced.graph)
    finally:
        profiling.enable(was)


def _marked_double(x: torch.Tensor) -> torch.Tensor:
    with profiling.marked("double"):
        return 2 * x
