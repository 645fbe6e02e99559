"""The predict job: a data=root model scores NanoAOD files per jet into friend trees.

A tiny model is trained on the real CMS NanoAOD file with the repository's configs/data/root.yaml
(one row per jet, trained on jets with Jet_pt > 20), exported to ONNX, and scores that file and
slices of it in this process and on a Dask LocalCluster.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import awkward as ak
import numpy as np
import pyarrow.parquet as pq
import pytest
import uproot
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from project.inference import IntegrityError, load
from project.predict.job import (
    OutputError,
    PredictSettings,
    dask_client,
    execute,
    predict,
    prepare,
    settings_from_config,
)
from project.predict.tasks import ExportRef, check_export, export_model

NANOAOD = "nanoAOD_2015_CMS_Open_Data_ttbar.root"
SELECTION = "Jet_pt > 20"
OUTPUTS = ("prob_light", "prob_b")
# The branches the root.yaml contract reads, and the event identifiers.
IDS = ("run", "luminosityBlock", "event")


def _compose_predict(repo_root: Path, overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(repo_root / "configs")):
        cfg = compose(config_name="predict", overrides=overrides)
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture(scope="module")
def root_export(tmp_path_factory, compose_train, compose_export, fast_overrides) -> Path:
    """A data=root MLP (one row per NanoAOD jet, selection Jet_pt > 20), one CPU epoch,
    exported to ONNX only."""
    from project.deploy.export import run_export
    from project.training.run import train

    tmp = tmp_path_factory.mktemp("root-model")
    overrides = [o for o in fast_overrides if not o.startswith("data=")]
    overrides += ["data=root", "model=mlp", f"data.contract.selection='{SELECTION}'"]
    cfg = compose_train(overrides, tmp)
    train(cfg)
    export_cfg = compose_export(
        [
            f"run_dir={cfg.paths.output_dir}",
            f"output_dir={tmp / 'exported'}",
            "name=root",
            "devices=[cpu]",
            "formats=[onnx]",
        ]
    )
    return run_export(export_cfg).export_dir


def _write_events(path: Path, events: ak.Array) -> None:
    """NanoAOD's layout: per-event branches, and Jet_* with the counter nJet."""
    jet = [f for f in events.fields if f.startswith("Jet_")]
    branches = {f: ak.to_numpy(events[f]) for f in events.fields if f not in jet}
    branches["Jet"] = ak.zip({f.removeprefix("Jet_"): events[f] for f in jet})
    with uproot.recreate(path) as file:
        types = {
            k: v.dtype if isinstance(v, np.ndarray) else ak.type(v).content
            for k, v in branches.items()
        }
        file.mktree("Events", types).extend(branches)


@pytest.fixture(scope="module")
def nano_events(shared_data: Path) -> ak.Array:
    """The branches of the real NanoAOD file that the model and the job read."""
    with uproot.open(shared_data / NANOAOD) as file:
        tree = file["Events"]
        names = [*IDS, "MET_pt", *tree.keys(filter_name="Jet_*")]
        return tree.arrays(names)


@pytest.fixture(scope="module")
def four_files(tmp_path_factory, nano_events: ak.Array) -> list[Path]:
    """The NanoAOD file's 200 events in four files of 50."""
    folder = tmp_path_factory.mktemp("nano-parts")
    paths = []
    for i in range(4):
        paths.append(folder / f"part{i}.root")
        _write_events(paths[-1], nano_events[50 * i : 50 * (i + 1)])
    return paths


def _settings(export: Path, files: list, out: Path, **kwargs) -> PredictSettings:
    return PredictSettings(
        export=str(export), files=tuple(map(str, files)), out=str(out), progress=False, **kwargs
    )


def _expected_scores(export: Path, events: ak.Array) -> dict[str, np.ndarray]:
    """The runtime on the file's jets, columns built here from the branches: per-jet
    branches flattened, per-event ones repeated for each jet of their event."""
    model = load(export, "onnx")
    n_jets = ak.to_numpy(ak.num(events["Jet_pt"]))
    columns = {}
    for feature in model.contract.flat:
        values = events[feature.expr]
        if values.ndim == 2:
            columns[feature.name] = ak.to_numpy(ak.flatten(values)).astype(np.float32)
        else:
            columns[feature.name] = np.repeat(ak.to_numpy(values), n_jets).astype(np.float32)
    return model(columns)


def test_scores_nanoaod_per_jet_into_a_friend_tree(
    root_export: Path, shared_data: Path, nano_events: ak.Array, tmp_path: Path
) -> None:
    report = predict(_settings(root_export, [shared_data / NANOAOD], tmp_path))
    assert [r.status for r in report.results] == ["written"]
    assert report.rows == 537
    assert report.backend == "onnx"
    out = tmp_path / "nanoAOD_2015_CMS_Open_Data_ttbar_scores.root"
    with uproot.open(out) as file:
        friend = file["Events"]
        assert friend.num_entries == len(nano_events) == 200
        assert set(friend.keys()) == {*IDS, "nJet", "Jet_prob_light", "Jet_prob_b"}
        scores = friend.arrays()
    n_jet = ak.to_numpy(ak.num(nano_events["Jet_pt"]))
    np.testing.assert_array_equal(ak.to_numpy(scores["nJet"]), n_jet)
    for name in IDS:
        np.testing.assert_array_equal(ak.to_numpy(scores[name]), ak.to_numpy(nano_events[name]))
    # Read side by side, entry by entry, the friend's jets are the input's jets.
    jets = ak.zip({"pt": nano_events["Jet_pt"], "prob_b": scores["Jet_prob_b"]})
    assert ak.all(ak.num(jets) == n_jet)
    expected = _expected_scores(root_export, nano_events)
    for name in OUTPUTS:
        got = ak.to_numpy(ak.flatten(scores[f"Jet_{name}"]))
        # Every jet is scored: the training selection (Jet_pt > 20) is not applied.
        assert np.isfinite(got).all()
        np.testing.assert_array_equal(got, expected[name])


def test_apply_selection_leaves_the_other_jets_unscored_in_parquet(
    root_export: Path, shared_data: Path, nano_events: ak.Array, tmp_path: Path
) -> None:
    settings = _settings(
        root_export, [shared_data / NANOAOD], tmp_path, format="parquet", apply_selection=True
    )
    report = predict(settings)
    assert report.rows == 537
    table = pq.read_table(tmp_path / "nanoAOD_2015_CMS_Open_Data_ttbar_scores.parquet")
    assert table.num_rows == 200
    assert table.column_names == [*IDS, "nJet", "Jet_prob_light", "Jet_prob_b"]
    n_jet = ak.to_numpy(ak.num(nano_events["Jet_pt"]))
    np.testing.assert_array_equal(table["nJet"].to_numpy(), n_jet)
    prob_b = ak.from_arrow(table["Jet_prob_b"])
    assert ak.all(ak.num(prob_b) == n_jet)
    got = ak.to_numpy(ak.flatten(prob_b))
    passed = ak.to_numpy(ak.flatten(nano_events["Jet_pt"])) > 20
    assert 0 < passed.sum() < len(passed)
    assert np.isnan(got[~passed]).all()
    np.testing.assert_array_equal(
        got[passed], _expected_scores(root_export, nano_events)["prob_b"][passed]
    )


def test_one_row_per_entry_with_a_jagged_collection(exported, tmp_path: Path) -> None:
    """The toy jets MLP (one row per jet, a jagged constituent collection) scores its run's
    validation sample: Parquet in the layout of data=jets (flat jet_* columns, list columns
    part_*), as make demo scores the held-out jets."""
    from project.data.sample import SAMPLE_FILE

    jets_export = exported("mlp")
    sample = (
        Path(json.loads((jets_export / "manifest.json").read_text())["source"]["run_dir"])
        / SAMPLE_FILE
    )
    table = pq.read_table(sample)
    model = load(jets_export, "onnx")
    columns = {name: table[name].to_numpy() for name in model.contract.flat_names}
    for coll in model.contract.jagged:
        lists = table[coll.field_input_names[0]].combine_chunks()
        columns[coll.offsets_name] = lists.offsets.to_numpy().astype(np.int64)
        for name in coll.field_input_names:
            columns[name] = table[name].combine_chunks().flatten().to_numpy()
    expected = model(columns)
    for fmt in ("root", "parquet"):
        report = predict(
            _settings(jets_export, [sample], tmp_path / fmt, format=fmt, backend="onnx")
        )
        assert report.results[0].status == "written"
        assert report.rows == table.num_rows
    with uproot.open(tmp_path / "root" / "validation_sample_scores.root") as file:
        friend = file["Events"].arrays(library="np")
    parquet = pq.read_table(tmp_path / "parquet" / "validation_sample_scores.parquet")
    # One score per event: no counter; no identifiers in the sample, so the entry number.
    assert set(friend) == set(parquet.column_names) == {"entry", "prob_qcd", "prob_top"}
    np.testing.assert_array_equal(friend["entry"], np.arange(table.num_rows))
    for name in ("prob_qcd", "prob_top"):
        np.testing.assert_array_equal(friend[name], parquet[name].to_numpy())
        np.testing.assert_array_equal(friend[name], expected[name])


def _read_all(path: Path) -> dict[str, np.ndarray]:
    with uproot.open(path) as file:
        arrays = file["Events"].arrays()
    return {f: ak.to_numpy(ak.flatten(arrays[f], axis=None)) for f in arrays.fields}


@pytest.fixture(scope="module")
def local_client(repo_root: Path):
    """A Dask client of configs/cluster/local.yaml with 2 workers."""
    cfg = _compose_predict(
        repo_root, ["export=x", "files=x", "out=x", "cluster=local", "workers=2"]
    )
    with dask_client(cfg.cluster, cfg.workers) as client:
        client.wait_for_workers(2)
        yield client


def test_local_cluster_gives_the_in_process_outputs(
    root_export: Path, four_files: list[Path], local_client, tmp_path: Path
) -> None:
    here = predict(_settings(root_export, four_files, tmp_path / "here", step_size=20))
    info = local_client.scheduler_info()["workers"].values()
    assert len(info) == 2
    assert all(w["nthreads"] == 1 for w in info)
    there = execute(
        prepare(_settings(root_export, four_files, tmp_path / "dask", step_size=20)), local_client
    )
    assert [r.status for r in here.results] == [r.status for r in there.results] == ["written"] * 4
    assert here.rows == there.rows == 537
    for path in four_files:
        name = f"{path.stem}_scores.root"
        a, b = _read_all(tmp_path / "here" / name), _read_all(tmp_path / "dask" / name)
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=f"{name}: {key}")


def test_an_export_failing_its_hashes_is_refused_on_every_worker(
    root_export: Path, four_files: list[Path], local_client, tmp_path: Path
) -> None:
    export = tmp_path / "export"
    shutil.copytree(root_export, export)
    good = ExportRef(str(export), _manifest_sha(export), "onnx", 4096)
    # The export as the job checked it, re-exported while the job runs: refused.
    with pytest.raises(IntegrityError, match="changed while the job ran"):
        export_model(ExportRef(good.path, "0" * 64, "onnx", 4096))
    model_file = export / "model.onnx"
    model_file.write_bytes(model_file.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(IntegrityError, match=r"model\.onnx"):
        predict(_settings(export, four_files, tmp_path / "out"))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
    refusals = local_client.run(check_export, good, on_error="return")
    assert len(refusals) == 2
    for error in refusals.values():
        assert isinstance(error, IntegrityError)
        assert "model.onnx" in str(error)


def _manifest_sha(export: Path) -> str:
    return (export / "manifest.sha256").read_text().strip()


def test_an_interrupted_run_resumes(
    root_export: Path, four_files: list[Path], tmp_path: Path
) -> None:
    first = predict(_settings(root_export, four_files[:1], tmp_path))
    assert first.results[0].status == "written"
    done = tmp_path / "part0_scores.root"
    before = done.stat().st_mtime_ns
    report = predict(_settings(root_export, four_files, tmp_path))
    assert [r.status for r in report.results] == ["skipped", "written", "written", "written"]
    assert done.stat().st_mtime_ns == before
    assert report.rows == sum(r.rows for r in report.results[1:]) > 0
    # An output made with other settings is not taken as finished.
    other = predict(_settings(root_export, four_files[:1], tmp_path, apply_selection=True))
    assert other.results[0].status == "failed"
    assert "overwrite=true" in other.results[0].error
    redo = predict(_settings(root_export, four_files, tmp_path, overwrite=True))
    assert [r.status for r in redo.results] == ["written"] * 4
    assert done.stat().st_mtime_ns != before


def test_a_truncated_file_is_reported_and_the_others_are_written(
    repo_root: Path, root_export: Path, four_files: list[Path], tmp_path: Path
) -> None:
    broken = tmp_path / "inputs" / "broken.root"
    broken.parent.mkdir()
    payload = four_files[3].read_bytes()
    broken.write_bytes(payload[: len(payload) // 2])
    out = tmp_path / "out"
    files = ",".join(str(p) for p in [*four_files[:2], broken, four_files[2]])
    proc = subprocess.run(
        [
            sys.executable,
            str(repo_root / "scripts" / "predict.py"),
            f"export={root_export}",
            f"files=[{files}]",
            f"out={out}",
            "progress=false",
            f"hydra.run.dir={tmp_path / 'hydra'}",
        ],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"failed: {broken}" in proc.stderr
    assert "truncated" in proc.stderr
    assert sorted(p.name for p in out.iterdir()) == [
        "part0_scores.root",
        "part1_scores.root",
        "part2_scores.root",
    ]


def test_a_missing_branch_names_the_branch_the_file_and_the_expression(
    root_export: Path, nano_events: ak.Array, tmp_path: Path
) -> None:
    path = tmp_path / "no_qgl.root"
    _write_events(path, nano_events[[f for f in nano_events.fields if f != "Jet_qgl"]][:10])
    report = predict(_settings(root_export, [path], tmp_path / "out"))
    (result,) = report.results
    assert result.status == "failed"
    assert "'Jet_qgl'" in result.error
    assert str(path) in result.error
    assert "flat column 'jet_qgl' = 'Jet_qgl'" in result.error
    assert not (tmp_path / "out" / "no_qgl_scores.root").exists()


def test_an_empty_file_gives_an_empty_output(
    root_export: Path, nano_events: ak.Array, tmp_path: Path
) -> None:
    path = tmp_path / "empty.root"
    _write_events(path, nano_events[:0])
    for fmt in ("root", "parquet"):
        report = predict(_settings(root_export, [path], tmp_path / fmt, format=fmt))
        assert report.results[0].status == "written"
        assert report.rows == 0
    with uproot.open(tmp_path / "root" / "empty_scores.root") as file:
        assert file["Events"].num_entries == 0
        assert "Jet_prob_b" in file["Events"].keys(filter_name="Jet_*")
    table = pq.read_table(tmp_path / "parquet" / "empty_scores.parquet")
    assert table.num_rows == 0
    assert "Jet_prob_b" in table.column_names


def test_an_output_directory_that_is_not_writable_fails_before_any_work(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    # The export does not exist either: the output directory is checked first.
    settings = _settings(tmp_path / "no-export", [tmp_path / "no-input.root"], blocker / "out")
    with pytest.raises(OutputError, match="not writable"):
        predict(settings)


def test_the_batch_system_configs_make_single_threaded_workers(
    repo_root: Path, tmp_path: Path
) -> None:
    """SLURM and HTCondor are not here: their job scripts are written, not submitted."""
    import hydra

    for name, marker in (("slurm", "#SBATCH"), ("htcondor", "RequestCpus")):
        overrides = ["export=e", "files=f", "out=o", f"cluster={name}"]
        cfg = _compose_predict(repo_root, [*overrides, f"cluster.log_directory={tmp_path}"])
        assert settings_from_config(cfg).files == ("f",)
        cluster = hydra.utils.instantiate(cfg.cluster, _convert_="all")
        try:
            script = cluster.job_script()
        finally:
            cluster.close()
        assert marker in script
        assert "--nthreads 1" in script
        assert "--nworkers" not in script


def test_the_manifest_carries_everything_the_job_reads(root_export: Path) -> None:
    """The export alone is enough: the contract in its manifest holds each feature's branch
    expression, per_object and the selection."""
    contract = json.loads((root_export / "manifest.json").read_text())["contract"]
    assert contract["per_object"] == "Jet"
    assert contract["selection"] == SELECTION
    assert {f["expr"] for f in contract["flat"]} >= {"Jet_pt", "MET_pt", "Jet_qgl"}
