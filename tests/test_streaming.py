"""Streaming training data: the same rows and constants as in memory, splits independent of the
file order, DDP ranks that see every row once in equal batch counts, bad shards named or
skipped, and a loader that holds no more rows than its budget allows (counted)."""

from __future__ import annotations

import itertools
import json
import logging
import os
from datetime import timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from project.contract import ContractError
from project.data.datamodule import SoADataModule
from project.data.generate import stored_tables
from project.data.sources import UnreadableChunkError
from project.data.sources.parquet import ParquetSource
from project.data.sources.root import RootSource
from project.data.sources.toy import ToyJetSource
from project.data.splitting import SPLITS
from project.data.stream_loader import StreamDataset, StreamLoader, pieces_of, rank_range
from project.data.streaming import estimate_size, memory_need
from project.data.writing import write_parquet

CONTRACTS = Path(__file__).resolve().parents[1] / "configs" / "data" / "contract"
REWEIGHT = {"variables": ["jet_pt"], "bins": {"jet_pt": {"n": 5, "range": [550, 650]}}}


def jets_contract(max_length: int = 16) -> dict:
    """The jets contract of the data configs, constituents cut at ``max_length``."""
    contract = yaml.safe_load((CONTRACTS / "jets.yaml").read_text())
    for coll in contract["jagged"]:
        coll["max_length"] = max_length
    return contract


def toy_shards(directory: Path, n_rows: int = 1200, n_files: int = 4, seed: int = 0) -> list[str]:
    """The toy jets' stored columns as ``n_files`` Parquet shards of row groups of 100 rows."""
    table = pa.concat_tables(stored_tables(ToyJetSource(n_rows, seed)))
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for i, part in enumerate(np.array_split(np.arange(n_rows), n_files)):
        path = directory / f"shard-{i}.parquet"
        write_parquet(table.slice(part[0], len(part)), path, row_group_size=100)
        files.append(str(path))
    return files


def datamodule(source: object, stream: bool | str, **kwargs: object) -> SoADataModule:
    """A small streaming-capable datamodule over the jets contract, split by hash."""
    settings = {
        "split": (0.6, 0.2, 0.2),
        "seed": 5,
        "batch_size": 32,
        "eval_batch_size": 64,
        "split_by": "hash",
        "shuffle_buffer": 150,
        "workers": 0,
        "stream": stream,
        **kwargs,
    }
    return SoADataModule(source, jets_contract(), **settings)


def keys(
    batches: object, columns: tuple[str, str, str] = ("jet_pt", "jet_eta", "jet_mass")
) -> np.ndarray:
    """One float per row that tells rows apart (three columns combined)."""
    a, b, c = columns
    out = [
        x[a].double().numpy() * 1e6 + x[b].double().numpy() * 1e3 + x[c].double().numpy()
        for x in batches
    ]
    return np.concatenate(out) if out else np.zeros(0)


def table_keys(data: object) -> np.ndarray:
    """``keys`` of a ``ColumnarData`` table."""
    return keys([{k: torch.from_numpy(data.flat[k]) for k in ("jet_pt", "jet_eta", "jet_mass")}])


def epoch(loader: object, number: int) -> list[dict[str, torch.Tensor]]:
    """All batches of epoch ``number``."""
    loader.sampler.set_epoch(number)
    return list(loader)


# --- the epoch plan ------------------------------------------------------------------------
def test_rank_ranges_and_pieces_cover_the_rows_once() -> None:
    counts = np.array([5, 0, 7, 3, 9, 1])
    order = np.array([4, 0, 3, 2, 5])
    n = int(counts.sum())
    for world in (1, 2, 3, 4):
        covered = []
        for rank in range(world):
            lo, hi = rank_range(n, rank, world, shuffle=True)
            assert hi - lo == n // world
            for piece in pieces_of(counts, order, lo, hi):
                covered += [(piece.chunk, r) for r in range(piece.lo, piece.hi)]
        assert len(covered) == len(set(covered)) == world * (n // world)
        evaluated = [rank_range(n, r, world, shuffle=False) for r in range(world)]
        assert evaluated[0][0] == 0
        assert evaluated[-1][1] == n
        assert all(a[1] == b[0] for a, b in itertools.pairwise(evaluated))


# --- streaming against in memory ------------------------------------------------------------
@pytest.mark.parametrize("split_by", ["hash", "file"])
def test_streaming_gives_the_in_memory_rows_and_constants(tmp_path: Path, split_by: str) -> None:
    files = toy_shards(tmp_path)
    streamed = datamodule(ParquetSource(files), True, split_by=split_by, reweight=REWEIGHT)
    in_memory = datamodule(ParquetSource(files), False, split_by=split_by, reweight=REWEIGHT)
    streamed.setup()
    in_memory.setup()
    assert streamed.report()["streaming"]
    assert not in_memory.report()["streaming"]
    assert streamed.report()["rows"] == in_memory.report()["rows"]
    # fit_rows left at all rows: the same constants, up to rounding.
    for mine, theirs in zip(streamed.contract.features, in_memory.contract.features, strict=True):
        assert mine.mean == pytest.approx(theirs.mean, rel=1e-9, abs=1e-12)
        assert mine.scale == pytest.approx(theirs.scale, rel=1e-9)
    np.testing.assert_allclose(
        streamed.reweighting.factors, in_memory.reweighting.factors, rtol=1e-9
    )
    orders = []
    for number in (0, 1):
        batches = epoch(streamed.train_dataloader(), number)
        assert len(batches) == len(streamed.train_dataloader())
        reference = epoch(in_memory.train_dataloader(), number)
        np.testing.assert_array_equal(np.sort(keys(batches)), np.sort(keys(reference)))
        # The reweighted event weights travel with their rows.
        weights = np.concatenate([b["weight"].numpy() for b in batches])
        expected = np.concatenate([b["weight"].numpy() for b in reference])
        np.testing.assert_allclose(
            weights[np.argsort(keys(batches))], expected[np.argsort(keys(reference))], rtol=1e-6
        )
        orders.append(keys(batches))
    assert not np.array_equal(orders[0], orders[1])  # reshuffled every epoch
    # Evaluation keeps the stored order (the files are listed in sorted order here).
    np.testing.assert_array_equal(keys(streamed.val_dataloader()), keys(in_memory.val_dataloader()))
    np.testing.assert_array_equal(
        table_keys(streamed.head("val", 50)), table_keys(in_memory.head("val", 50))
    )


def test_streaming_a_root_tree_in_entry_ranges(shared_data: Path) -> None:
    """Per-event rows with a jagged jet collection, read from a TTree in entry ranges."""
    contract = {
        "label": "NMuon >= 2",
        "flat": [
            {"name": "met", "expr": "hypot(MET_px, MET_py)", "transform": "log"},
            {"name": "met_phi", "expr": "arctan2(MET_py, MET_px)"},
        ],
        "jagged": [
            {
                "name": "jet",
                "max_length": 8,
                "counts": "NJet",
                "fields": [{"name": "px", "expr": "Jet_Px"}, {"name": "e", "expr": "Jet_E"}],
            }
        ],
        "classes": ["below_two_muons", "two_muons"],
    }
    path = str(shared_data / "uproot-HZZ.root")
    settings = {"split_by": "hash", "batch_size": 64, "shuffle_buffer": 300, "workers": 0}
    streamed = SoADataModule(
        RootSource(path, "events", step_size=400), contract, stream=True, **settings
    )
    in_memory = SoADataModule(RootSource(path, "events"), contract, stream=False, **settings)
    streamed.setup()
    in_memory.setup()
    assert len(streamed.stream_index.chunks) == 7  # 2421 entries in ranges of 400
    columns = ("met", "met_phi", "n_jets")
    loaders = (streamed.train_dataloader, streamed.val_dataloader, streamed.test_dataloader)
    for split, loader in zip(SPLITS, loaders, strict=True):
        batches = [{**b, "n_jets": torch.diff(b["jet_offsets"])} for b in loader()]
        data = in_memory.splits[split]
        table = {
            "met": torch.from_numpy(data.flat["met"]),
            "met_phi": torch.from_numpy(data.flat["met_phi"]),
            "n_jets": torch.from_numpy(np.minimum(data.jagged["jet"].counts, 8)),
        }
        np.testing.assert_array_equal(
            np.sort(keys(batches, columns)), np.sort(keys([table], columns))
        )
    for mine, theirs in zip(streamed.contract.features, in_memory.contract.features, strict=True):
        assert mine.mean == pytest.approx(theirs.mean, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("stream", [True, False])
@pytest.mark.parametrize("split_by", ["hash", "file"])
def test_split_does_not_depend_on_the_file_order(
    tmp_path: Path, stream: bool, split_by: str
) -> None:
    files = toy_shards(tmp_path, n_files=5)
    orders = (files, files[::-1], files[2:] + files[:2])
    modules = [datamodule(ParquetSource(f), stream, split_by=split_by) for f in orders]
    for dm in modules:
        dm.setup()
    for split in SPLITS:
        rows = [np.sort(table_keys(dm.head(split, 10_000))) for dm in modules]
        assert len(rows[0]) > 0
        for other in rows[1:]:
            np.testing.assert_array_equal(rows[0], other)
    for mine, theirs in zip(
        modules[0].contract.features, modules[1].contract.features, strict=True
    ):
        assert mine.mean == pytest.approx(theirs.mean, rel=1e-9, abs=1e-12)


def test_fit_rows_fits_on_a_sample(tmp_path: Path) -> None:
    files = toy_shards(tmp_path)
    sampled = datamodule(ParquetSource(files), True, fit_rows=250)
    sampled.setup()
    assert sampled.stream_index.fit_rows == 250
    full = datamodule(ParquetSource(files), True)
    full.setup()
    assert full.stream_index.fit_rows == full.report()["rows"]["train"]
    assert sampled.contract.flat[0].mean != full.contract.flat[0].mean


# --- DDP -----------------------------------------------------------------------------------
@pytest.mark.parametrize("workers", [0, 2])
def test_two_ranks_see_every_training_row_once(tmp_path: Path, workers: int) -> None:
    dm = datamodule(ParquetSource(toy_shards(tmp_path)), True, workers=workers)
    dm.setup()
    every = table_keys(dm.head("train", 10_000))
    for number in (0, 1):
        seen, counts = [], []
        for rank in (0, 1):
            dataset = StreamDataset(
                dm.source, dm.table_spec(), dm.stream_index, "train", dm.splitting, 32, True,
                buffer_rows=75, seed=dm.seed, rank=rank, world_size=2, workers=workers,
            )  # fmt: skip
            batches = epoch(StreamLoader(dataset, workers), number)
            counts.append((len(batches), len(dataset)))
            seen.append(keys(batches))
        assert counts[0] == counts[1]
        assert counts[0][0] == counts[0][1]
        both = np.concatenate(seen)
        assert len(both) == len(np.unique(both)) == 2 * (len(every) // 2)
        assert set(both) <= set(every)


def _ddp_rank(rank: int, files: list[str], cache: str, out: str, port: int) -> None:
    """One of two gloo ranks: stream two epochs with a collective after every batch (a rank
    with fewer batches would leave the other waiting until the timeout)."""
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=60))
    dm = datamodule(ParquetSource(files), True, workers=1, cache_dir=cache)
    dm.setup()
    result = {}
    for number in (0, 1):
        dataset = StreamDataset(
            dm.source, dm.table_spec(), dm.stream_index, "train", dm.splitting, 32, True,
            buffer_rows=150, seed=dm.seed, rank=rank, world_size=2, workers=1,
        )  # fmt: skip
        rows = []
        for batch in epoch(StreamLoader(dataset, 1), number):
            steps = torch.ones(1)
            dist.all_reduce(steps)
            rows.append(keys([batch]))
        result[number] = {"rows": np.concatenate(rows).tolist(), "batches": len(rows)}
    dist.destroy_process_group()
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


@pytest.mark.slow
def test_two_cpu_ddp_ranks_run_equal_batches_and_see_each_row_once(tmp_path: Path) -> None:
    files = toy_shards(tmp_path / "data")
    port = 29500 + os.getpid() % 1000
    torch.multiprocessing.spawn(
        _ddp_rank, args=(files, str(tmp_path), str(tmp_path), port), nprocs=2, join=True
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    reference = datamodule(ParquetSource(files), False)
    reference.setup()
    every = table_keys(reference.splits["train"])
    for number in ("0", "1"):
        assert ranks[0][number]["batches"] == ranks[1][number]["batches"] > 0
        both = np.concatenate([r[number]["rows"] for r in ranks])
        assert len(both) == len(np.unique(both)) == 2 * (len(every) // 2)
        assert set(both) <= set(every)
    assert (tmp_path / "stream_index.json").is_file()  # written by rank zero


# --- when it streams, and the cache ---------------------------------------------------------
def test_auto_streams_when_the_table_does_not_fit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = toy_shards(tmp_path)
    with caplog.at_level(logging.INFO, logger="project.data.streaming"):
        small = datamodule(ParquetSource(files), "auto", memory_budget="1 MB")
        small.setup()
    assert small.report()["streaming"]
    assert "data: streaming (data.stream=auto: the table would take about" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="project.data.streaming"):
        large = datamodule(ParquetSource(files), "auto", memory_budget=1e9)
        large.setup()
    assert not large.report()["streaming"]
    assert "data: in memory (data.stream=auto)" in caplog.text


def test_streaming_refuses_split_by_rows(tmp_path: Path) -> None:
    dm = datamodule(ParquetSource(toy_shards(tmp_path)), True, split_by="rows")
    with pytest.raises(ContractError, match=r"needs data\.split_by=hash or file"):
        dm.setup()


def test_the_indexing_pass_is_kept_for_a_resumed_run(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    files = toy_shards(tmp_path / "data")
    first = datamodule(ParquetSource(files), True, cache_dir=str(tmp_path / "run"))
    first.setup()
    assert (tmp_path / "run" / "stream_index.json").is_file()
    with caplog.at_level(logging.INFO, logger="project.data.stream_index"):
        again = datamodule(ParquetSource(files), True, cache_dir=str(tmp_path / "run"))
        again.setup()
    assert "read from" in caplog.text
    assert again.contract == first.contract
    assert np.array_equal(again.stream_index.rows, first.stream_index.rows)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="project.data.stream_index"):
        other = datamodule(ParquetSource(files), True, cache_dir=str(tmp_path / "run"), seed=6)
        other.setup()
    assert "belongs to other files or settings" in caplog.text


# --- bad input -----------------------------------------------------------------------------
def damage_row_group(path: str, row_group: int) -> tuple[int, int]:
    """Flip bytes of one column chunk's first page header; returns the row group's rows."""
    meta = pq.ParquetFile(path).metadata
    column = meta.row_group(row_group).column(0)
    offset = column.dictionary_page_offset or column.data_page_offset
    payload = bytearray(Path(path).read_bytes())
    for i in range(offset, offset + 16):
        payload[i] ^= 0xFF
    Path(path).write_bytes(bytes(payload))
    start = sum(meta.row_group(i).num_rows for i in range(row_group))
    return start, start + meta.row_group(row_group).num_rows


@pytest.mark.parametrize("stream", [True, False])
def test_a_corrupt_shard_is_named_and_skip_goes_on(
    tmp_path: Path, stream: bool, caplog: pytest.LogCaptureFixture
) -> None:
    files = toy_shards(tmp_path)
    start, stop = damage_row_group(files[2], 1)
    with pytest.raises(UnreadableChunkError, match=rf"shard-2\.parquet \(entries {start}-{stop}\)"):
        datamodule(ParquetSource(files), stream).setup()
    with caplog.at_level(logging.WARNING):
        dm = datamodule(ParquetSource(files), stream, on_bad_file="skip")
        dm.setup()
    report = dm.report()
    assert [s["file"] for s in report["skipped_files"]] == [files[2]]
    assert f"entries {start}-{stop}" in report["skipped_files"][0]["reason"]
    assert "leaving out" in caplog.text
    assert files[2] in caplog.text
    good = datamodule(ParquetSource([f for f in files if f != files[2]]), stream)
    good.setup()
    assert report["rows"] == good.report()["rows"]
    assert len(list(dm.train_dataloader())) == len(dm.train_dataloader())


def test_a_truncated_shard_is_named(tmp_path: Path) -> None:
    files = toy_shards(tmp_path)
    payload = Path(files[1]).read_bytes()
    Path(files[1]).write_bytes(payload[: len(payload) // 2])
    with pytest.raises(UnreadableChunkError, match=r"shard-1\.parquet cannot be read"):
        datamodule(ParquetSource(files), True).setup()
    dm = datamodule(ParquetSource(files), True, on_bad_file="skip")
    dm.setup()
    assert [s["file"] for s in dm.report()["skipped_files"]] == [files[1]]


def test_a_shard_damaged_mid_epoch_is_named(tmp_path: Path) -> None:
    files = toy_shards(tmp_path)
    dm = datamodule(ParquetSource(files), True)
    dm.setup()
    start, stop = damage_row_group(files[3], 0)
    with pytest.raises(
        UnreadableChunkError,
        match=rf"(?s)shard-3\.parquet \(entries {start}-{stop}\).*changed since",
    ):
        list(dm.train_dataloader())


def test_a_shard_with_other_dtypes_is_named_before_training(tmp_path: Path) -> None:
    files = toy_shards(tmp_path)
    table = pq.read_table(files[1])
    index = table.schema.get_field_index("jet_pt")
    table = table.set_column(index, "jet_pt", table.column("jet_pt").cast(pa.float64()))
    write_parquet(table, files[1])
    for stream in (True, False):
        with pytest.raises(
            ContractError, match=r"shard-\d\.parquet.*'jet_pt' holds (float64|float32), but"
        ):
            datamodule(ParquetSource(files), stream).setup()


# --- memory --------------------------------------------------------------------------------
def test_the_loader_holds_no_more_rows_than_the_budget_allows() -> None:
    source = ToyJetSource(3000, 3, chunk_size=250)
    probe = datamodule(source, True, shuffle_buffer=400)
    need = memory_need(
        estimate_size(source, probe.table_spec(), "raise"), probe.streaming, 32, 64, 2
    )
    with pytest.raises(ContractError, match=r"streaming needs about .* Give data.memory_budget="):
        datamodule(source, True, shuffle_buffer=400, memory_budget=int(need.total) - 1).setup()
    dm = datamodule(source, True, shuffle_buffer=400, memory_budget=int(need.total) + 1)
    dm.setup()
    loader = dm.train_dataloader()
    for number in (0, 1):
        assert len(epoch(loader, number)) == len(loader)
    # Counted: the buffer mixed rows across chunks (more than one chunk held), and never more
    # than the budget's rows per worker (its share of the buffer, a batch and one chunk).
    assert 250 < loader.stream.peak_rows <= need.worker_rows == 400 + 32 + 251
    val = dm.val_dataloader()
    list(val)
    assert val.stream.peak_rows <= 64 + 251


# --- shards and the run ----------------------------------------------------------------------
def test_generate_writes_a_source_as_parquet_shards(tmp_path: Path) -> None:
    from omegaconf import OmegaConf

    from project.data.generate import generate

    toy = {"_target_": "project.data.sources.toy.ToyJetSource", "n_jets": 3000, "seed": 1}
    cfg = OmegaConf.create(
        {
            "data": {"source": {**toy, "block_rows": 500}},
            "shards": {"dir": str(tmp_path / "shards"), "size": "300 kB", "row_group_rows": 256},
        }
    )
    written = generate(cfg)
    assert len(written) > 3
    assert sum(pq.ParquetFile(p).metadata.num_rows for p in written) == 3000
    assert all(pq.ParquetFile(p).metadata.row_group(0).num_rows <= 256 for p in written)
    shards = datamodule(ParquetSource([str(p) for p in written]), False, split_by="rows")
    blocks = datamodule(ToyJetSource(3000, 1, block_rows=500), False, split_by="rows")
    shards.setup()
    blocks.setup()
    np.testing.assert_array_equal(
        table_keys(shards.splits["val"]), table_keys(blocks.splits["val"])
    )
    with pytest.raises(FileExistsError, match="is not empty"):
        generate(cfg)


def test_a_skipped_shard_is_listed_in_the_runs_metrics(
    tmp_path: Path, compose_train, fast_overrides: list[str]
) -> None:
    from project.training.run import train

    files = toy_shards(tmp_path / "data", n_rows=800)
    damage_row_group(files[1], 0)
    overrides = [
        *fast_overrides,
        "data=parquet",
        f"data.source.files=[{','.join(files)}]",
        "data.stream=true",
        "data.split_by=hash",
        "data.on_bad_file=skip",
        "data.batch_size=64",
        "data.workers=1",
        "model=mlp",
    ]
    cfg = compose_train(overrides, tmp_path)
    train(cfg)
    run = Path(cfg.paths.output_dir)
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["data"]["streaming"] is True
    assert [s["file"] for s in summary["data"]["skipped_files"]] == [files[1]]
    assert (run / "stream_index.json").is_file()
    train_rows = summary["data"]["rows"]["train"]
    assert summary["global_step"] == -(-train_rows // 64)


@pytest.mark.slow
def test_cli_streams_under_ddp_and_resumes_without_indexing_again(
    tmp_path: Path, repo_root: Path
) -> None:
    """Two CPU ranks through the real CLI: the run ends (no rank waits for another), every
    rank ran ``ceil((train_rows // 2) / batch)`` steps per epoch; resuming reads the index."""
    import subprocess
    import sys

    files = toy_shards(tmp_path / "data", n_rows=1600)
    args = [
        "data=parquet",
        f"data.source.files=[{','.join(files)}]",
        "data.stream=true",
        "data.split_by=hash",
        "data.batch_size=64",
        "trainer=cpu",
        "trainer.devices=2",
        "trainer.strategy=ddp",
        "trainer.max_epochs=2",
        "model=mlp",
        "logger=csv",
        "callbacks.progress_bar=null",
        f"paths.log_dir={tmp_path}/logs",
    ]
    env = {**os.environ, "PROJECT_ROOT": str(repo_root)}

    def cli(extra: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "scripts/train.py", *args, *extra],
            cwd=repo_root, env=env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip

    result = cli([])
    assert result.returncode == 0, result.stderr[-4000:]
    (run,) = (tmp_path / "logs" / "train" / "runs").iterdir()
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["world_size"] == 2
    assert summary["data"]["streaming"] is True
    per_rank = summary["data"]["rows"]["train"] // 2
    assert summary["global_step"] == 2 * -(-per_rank // 64)
    resumed = cli(["ckpt_path=last", "trainer.max_epochs=3"])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "indexing pass's result is read from" in resumed.stderr + resumed.stdout
    summary = json.loads((run / "metrics.json").read_text())
    assert summary["global_step"] == 3 * -(-per_rank // 64)


def test_packed_and_fixed_size_batches_assemble_to_the_same_tensors(tmp_path: Path) -> None:
    """What a DataLoader worker sends (``pack``) unpacks to the same batch, and the GPU's
    fixed-size batches (same shapes for every full batch) assemble as the compact ones."""
    from project.data.stream_loader import pack, unpack
    from project.soa.assembler import SoAAssembler

    dm = datamodule(ParquetSource(toy_shards(tmp_path)), True)
    dm.setup()

    def batches(fixed_size: bool) -> list[dict[str, torch.Tensor]]:
        dataset = StreamDataset(
            dm.source, dm.table_spec(), dm.stream_index, "train", dm.splitting, 32, True,
            buffer_rows=150, seed=dm.seed, fixed_size=fixed_size,
        )  # fmt: skip
        return list(dataset)

    compact, fixed = batches(False), batches(True)
    assert len({tuple(b["part_pt"].shape) for b in fixed[:-1]}) == 1
    assert fixed[0]["part_pt"].shape == (32 * 16,)
    assembler = SoAAssembler(dm.contract)
    names = dm.contract.input_names
    for a, b in zip(compact, fixed, strict=True):
        unpacked = unpack(pack(b))
        assert unpacked.keys() == b.keys()
        for name in b:
            torch.testing.assert_close(unpacked[name], b[name], rtol=0, atol=0)
        for x, y in zip(
            assembler([a[n] for n in names]), assembler([b[n] for n in names]), strict=True
        ):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_streaming_hdf5_in_its_chunks(tmp_path: Path) -> None:
    """The HDF5 source (salt/UPP layout) streams in its HDF5 chunks, with the in-memory rows."""
    import awkward as ak
    import h5py

    from project.data.sources.h5 import H5Source
    from project.data.sources.toy import EXTRA, FIELDS, FLAT

    table = ToyJetSource(900, 4, max_constituents=30).table
    jets = np.zeros(900, dtype=[(c, table[c].dtype) for c in (*FLAT, *EXTRA)])
    for c in (*FLAT, *EXTRA):
        jets[c] = table[c]
    part = np.zeros((900, 30), dtype=[*((f, np.float32) for f in FIELDS), ("valid", bool)])
    part["valid"] = np.arange(30) < ak.to_numpy(ak.num(table["part_pt"]))[:, None]
    for f in FIELDS:
        part[f] = ak.to_numpy(ak.fill_none(ak.pad_none(table[f"part_{f}"], 30, clip=True), 0.0))
    path = tmp_path / "jets.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("jets", data=jets, chunks=(128,))
        h5.create_dataset("part", data=part, chunks=(128, 30))
    streamed = datamodule(H5Source(str(path)), True)
    in_memory = datamodule(H5Source(str(path)), False)
    streamed.setup()
    in_memory.setup()
    assert len(streamed.stream_index.chunks) == 8  # 900 rows in HDF5 chunks of 128
    np.testing.assert_array_equal(
        np.sort(keys(streamed.train_dataloader())), np.sort(table_keys(in_memory.splits["train"]))
    )
    for mine, theirs in zip(streamed.contract.features, in_memory.contract.features, strict=True):
        assert mine.mean == pytest.approx(theirs.mean, rel=1e-9, abs=1e-12)
