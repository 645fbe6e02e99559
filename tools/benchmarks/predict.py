"""Rows/s of the predict job: in-process, and on a Dask LocalCluster of 1, 2, ... workers.

Template tooling, outside the package. ``python tools/benchmarks/predict.py EXPORT_DIR``, with
an export of a ``data=root`` model (one row per NanoAOD jet). The CMS NanoAOD file of
``../shared/data`` holds 200 events; its events are repeated into ``--files`` files of
``--events`` events in all, with the branches in NanoAOD's layout (``nJet``, ``Jet_*``), so
that reading and scoring, not opening a file, dominate. For each setting the job scores every
file into a fresh output directory (``overwrite``), ``--repeat`` times; the table gives the
median rows/s (rows are jets) and the range. Cluster start-up is not timed: the workers start
and load the export (``client.run``) before the first run.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import awkward as ak
import numpy as np
import uproot

from project.predict.job import PredictSettings, dask_client, execute, prepare
from project.predict.tasks import check_export

NANOAOD = (
    Path(__file__).resolve().parents[2].parent / "shared/data/nanoAOD_2015_CMS_Open_Data_ttbar.root"
)


def write_inputs(folder: Path, n_files: int, n_events: int) -> list[Path]:
    """``n_files`` NanoAOD-like files of ``n_events`` events in all, the real file's events
    repeated (identifiers, ``MET_pt`` and every ``Jet_*`` branch)."""
    with uproot.open(NANOAOD) as file:
        tree = file["Events"]
        names = ["run", "luminosityBlock", "event", "MET_pt", *tree.keys(filter_name="Jet_*")]
        events = tree.arrays(names)
    per_file = n_events // n_files
    reps = -(-per_file // len(events))
    tiled = ak.concatenate([events] * reps)[:per_file]
    jet = [f for f in tiled.fields if f.startswith("Jet_")]
    branches = {f: ak.to_numpy(tiled[f]) for f in tiled.fields if f not in jet}
    branches["Jet"] = ak.zip({f.removeprefix("Jet_"): tiled[f] for f in jet})
    types = {
        k: v.dtype if isinstance(v, np.ndarray) else ak.type(v).content for k, v in branches.items()
    }
    paths = []
    for i in range(n_files):
        paths.append(folder / f"bench{i}.root")
        with uproot.recreate(paths[-1]) as file:
            file.mktree("Events", types).extend(branches)
    return paths


def measure(settings: PredictSettings, repeat: int, client: object = None) -> list[float]:
    """rows/s of ``repeat`` runs of the job (a fresh output each time)."""
    speeds = []
    for i in range(repeat):
        job = prepare(
            PredictSettings(
                **{**settings.__dict__, "out": f"{settings.out}/{i}", "overwrite": True}
            )
        )
        if client is not None:
            client.run(check_export, job.ref)  # every worker loads the export before timing
        report = execute(job, client)
        if report.failures:
            raise RuntimeError(f"the benchmark job failed: {report.failures[0].error}")
        speeds.append(report.rows_per_second)
    return speeds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's arguments."""
    parser.add_argument("export", help="export directory of a data=root model")
    parser.add_argument("--files", type=int, default=4, help="input files")
    parser.add_argument("--events", type=int, default=200_000, help="events in all files")
    parser.add_argument("--step-size", type=int, default=25_000, help="entries per task")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeat", type=int, default=3)


def main(args: argparse.Namespace) -> int:
    """Write the inputs, run each setting, print the table."""
    from distributed import LocalCluster

    with tempfile.TemporaryDirectory(prefix="predict-bench-") as tmp:
        inputs = write_inputs(Path(tmp), args.files, args.events)
        settings = PredictSettings(
            export=args.export,
            files=tuple(map(str, inputs)),
            out=f"{tmp}/out",
            step_size=args.step_size,
            progress=False,
        )
        rows = {"in-process": measure(settings, args.repeat)}
        for n in args.workers:
            config = {
                "_target_": f"{LocalCluster.__module__}.LocalCluster",
                "n_workers": n,
                "threads_per_worker": 1,
                "processes": True,
                "dashboard_address": ":0",
            }
            with dask_client(config, n) as client:
                client.wait_for_workers(n)
                rows[f"LocalCluster, {n} worker{'s' * (n > 1)}"] = measure(
                    settings, args.repeat, client
                )
    print(
        f"\n{args.events:,} events ({args.files} files, {args.step_size:,} entries per task), "
        f"{args.repeat} runs each; rows are jets\n"
    )
    print(f"{'setting':<26} {'rows/s (median)':>16} {'range':>22}")
    for name, speeds in rows.items():
        low, high = min(speeds), max(speeds)
        print(f"{name:<26} {statistics.median(speeds):>16,.0f} {low:>10,.0f} - {high:<10,.0f}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    raise SystemExit(main(parser.parse_args()))
