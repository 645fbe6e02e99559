"""Splits, epoch shards, SoA batches and the DataModule on the toy source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from project.contract import LOG_FLOOR, ContractError, Feature, InputContract, JaggedCollection
from project.data.batching import (
    EpochSampler,
    GroupedBatches,
    ResidentBatch,
    SoABatchLoader,
    SoATensors,
)
from project.data.columnar import ColumnarData, Jagged
from project.data.datamodule import SoADataModule, check_labels, fit_standardizer, split_rows
from project.data.sources import load
from project.data.sources.toy import ToyJetSource

ROOT = Path(__file__).resolve().parents[1]


def jets_contract(max_length: int | None = None) -> dict:
    """The repository's jets contract (configs/data/contract/jets.yaml) as a plain dict."""
    d = OmegaConf.to_container(OmegaConf.load(ROOT / "configs/data/contract/jets.yaml"))
    if max_length is not None:
        d["jagged"][0]["max_length"] = max_length
    return d


def random_table(seed: int, n_rows: int = 60, max_count: int = 12) -> ColumnarData:
    rng = np.random.default_rng(seed)
    counts = rng.integers(0, max_count + 1, n_rows)
    counts[::5] = 0
    total = int(counts.sum())
    return ColumnarData(
        flat={"f": rng.normal(size=n_rows).astype(np.float32)},
        jagged={
            "c": Jagged.from_counts(
                counts,
                {
                    "x": rng.normal(size=total).astype(np.float32),
                    "y": rng.uniform(0, 10, total).astype(np.float32),
                },
            )
        },
        labels=rng.integers(0, 2, n_rows),
    ).validate()


SMALL_CONTRACT = InputContract(
    flat=(Feature("f"),),
    jagged=(JaggedCollection("c", 5, (Feature("x"), Feature("y", "log"))),),
)


# --- split_rows ------------------------------------------------------------------------------
@pytest.mark.parametrize("n_rows", [10, 101, 1000])
def test_split_rows_disjoint_covering_deterministic(n_rows: int) -> None:
    fractions = (0.7, 0.2, 0.1)
    parts = split_rows(n_rows, fractions, seed=3)
    again = split_rows(n_rows, fractions, seed=3)
    for p, q in zip(parts, again, strict=True):
        np.testing.assert_array_equal(p, q)
    joined = np.concatenate(parts)
    assert len(joined) == n_rows
    np.testing.assert_array_equal(np.sort(joined), np.arange(n_rows))  # disjoint and covering
    for part, frac in zip(parts, fractions, strict=True):
        assert abs(len(part) - frac * n_rows) <= 1
        assert np.all(np.diff(part) > 0)  # sorted
    other = split_rows(n_rows, fractions, seed=4)
    assert any(not np.array_equal(p, q) for p, q in zip(parts, other, strict=True))


@pytest.mark.parametrize("fractions", [(0.5, 0.4), (0.8, 0.3, -0.1), (1.0, 0.0)])
def test_split_rows_bad_fractions(fractions: tuple) -> None:
    with pytest.raises(ValueError, match="split fractions"):
        split_rows(100, fractions, seed=0)


# --- EpochSampler ----------------------------------------------------------------------------
@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize("n_rows", [100, 101])
def test_training_shards(world_size: int, n_rows: int) -> None:
    samplers = [
        EpochSampler(n_rows, True, seed=7, rank=r, world_size=world_size) for r in range(world_size)
    ]

    def shards(epoch: int) -> list[np.ndarray]:
        out = []
        for s in samplers:
            s.set_epoch(epoch)
            out.append(s.rows().numpy())
        return out

    epoch0 = shards(0)
    lengths = {len(s) for s in epoch0}
    assert lengths == {n_rows // world_size}
    assert all(len(s) == len(sampler) for s, sampler in zip(epoch0, samplers, strict=True))
    joined = np.concatenate(epoch0)
    assert len(np.unique(joined)) == len(joined)  # disjoint, no row twice
    assert joined.min() >= 0
    assert joined.max() < n_rows
    epoch1 = shards(1)
    assert not np.array_equal(np.concatenate(epoch1), joined)  # reshuffled per epoch
    assert len(np.unique(np.concatenate(epoch1))) == len(joined)
    for a, b in zip(shards(0), epoch0, strict=True):  # same epoch, same rows
        np.testing.assert_array_equal(a, b)
    for rows in epoch0:
        assert rows.dtype == np.int64


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_eval_shards_cover_every_row_once(world_size: int) -> None:
    n_rows = 101
    shards = [
        EpochSampler(n_rows, False, seed=0, rank=r, world_size=world_size).rows().numpy()
        for r in range(world_size)
    ]
    np.testing.assert_array_equal(np.concatenate(shards), np.arange(n_rows))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_sampler_rank_outside_world() -> None:
    with pytest.raises(ValueError, match="outside world size"):
        EpochSampler(10, True, seed=0, rank=2, world_size=2)


# --- SoATensors and the loader ---------------------------------------------------------------
@pytest.mark.parametrize("seed", range(3))
def test_soa_batch_equals_take_truncated(seed: int) -> None:
    data = random_table(seed)
    tensors = SoATensors(data, SMALL_CONTRACT)
    rows = np.random.default_rng(seed).permutation(len(data))[:25]
    batch = tensors.batch(torch.from_numpy(rows))
    taken = data.take(rows)
    max_length = SMALL_CONTRACT.jagged[0].max_length

    np.testing.assert_array_equal(batch["f"].numpy(), taken.flat["f"])
    np.testing.assert_array_equal(batch["label"].numpy(), taken.labels)
    # Truncate take()'s rows to max_length by a loop.
    coll = taken.jagged["c"]
    counts = np.minimum(coll.counts, max_length)
    np.testing.assert_array_equal(batch["c_offsets"].numpy(), np.r_[0, np.cumsum(counts)])
    for name in ("x", "y"):
        expected = np.concatenate(
            [
                coll.fields[name][coll.offsets[i] : coll.offsets[i] + counts[i]]
                for i in range(len(rows))
            ]
        )
        np.testing.assert_array_equal(batch[f"c_{name}"].numpy(), expected)
    assert batch["c_offsets"].dtype == torch.int64
    assert set(batch) == {*SMALL_CONTRACT.input_names, "label"}


def test_loader_batches_cover_the_shard() -> None:
    data = random_table(0, n_rows=53)
    tensors = SoATensors(data, SMALL_CONTRACT)
    sampler = EpochSampler(len(data), True, seed=1)
    loader = SoABatchLoader(tensors, 10, sampler)
    batches = list(loader)
    assert len(loader) == len(batches) == 6
    assert [len(b["f"]) for b in batches] == [10] * 5 + [3]
    seen = np.concatenate([b["f"].numpy() for b in batches])
    np.testing.assert_array_equal(seen, data.flat["f"][sampler.rows().numpy()])
    assert len(SoABatchLoader(tensors, 10, sampler, drop_last=True)) == 5
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        SoABatchLoader(tensors, 0, sampler)


def test_a_resident_batch_reads_as_its_gather_and_batches_group_for_several_steps() -> None:
    data = random_table(0, n_rows=53)
    tensors = SoATensors(data, SMALL_CONTRACT)
    rows = torch.tensor([5, 0, 52, 7])
    lazy = ResidentBatch(tensors, rows)
    gathered = tensors.batch(rows)
    assert set(lazy) == set(gathered)
    assert len(lazy) == len(gathered)
    for key, value in gathered.items():
        assert torch.equal(lazy[key], value)
    assert lazy.gather() is lazy.gather()  # gathered once
    sampler = EpochSampler(len(data), True, seed=1)
    loader = SoABatchLoader(tensors, 10, sampler)
    grouped = GroupedBatches(loader, 4)
    groups = list(grouped)
    assert grouped.sampler is sampler  # Lightning's set_epoch reaches the loader's sampler
    assert len(grouped) == len(groups) == 2
    assert [len(g) for g in groups] == [4, 2]
    for batch, expected in zip([b for g in groups for b in g], loader, strict=True):
        assert torch.equal(batch["f"], expected["f"])
    with pytest.raises(ValueError, match="steps must be >= 1"):
        GroupedBatches(loader, 0)


# --- fit_standardizer and check_labels -------------------------------------------------------
def test_fit_standardizer_constants() -> None:
    data = random_table(5)
    data.flat["f"][0] = 100.0
    fitted = fit_standardizer(data, SMALL_CONTRACT)
    assert fitted.fitted
    assert fitted.flat[0].mean == pytest.approx(float(np.mean(data.flat["f"].astype(np.float64))))
    assert fitted.flat[0].scale == pytest.approx(float(np.std(data.flat["f"].astype(np.float64))))
    # Jagged fields: only the first max_length objects of each row, as the model sees them.
    coll = data.jagged["c"]
    max_length = SMALL_CONTRACT.jagged[0].max_length
    seen = {name: [] for name in coll.fields}
    for i in range(len(data)):
        lo, hi = coll.offsets[i], min(coll.offsets[i + 1], coll.offsets[i] + max_length)
        for name, arr in coll.fields.items():
            seen[name].extend(arr[lo:hi].tolist())
    x, y = np.array(seen["x"]), np.log(np.maximum(np.array(seen["y"]), LOG_FLOOR))
    fx, fy = fitted.jagged[0].fields
    assert fx.mean == pytest.approx(x.mean(), rel=1e-6)
    assert fx.scale == pytest.approx(x.std(), rel=1e-6)
    assert fy.mean == pytest.approx(y.mean(), rel=1e-6)
    assert fy.scale == pytest.approx(y.std(), rel=1e-6)
    # The truncation matters for this table, so the check above is not vacuous.
    all_x = coll.fields["x"].astype(np.float64)
    assert len(all_x) > len(x)


def test_fit_standardizer_constant_column_gets_unit_scale() -> None:
    data = random_table(1)
    data.flat["f"][:] = 3.0
    fitted = fit_standardizer(data, SMALL_CONTRACT)
    assert fitted.flat[0].mean == pytest.approx(3.0)
    assert fitted.flat[0].scale == 1.0


def test_check_labels_errors() -> None:
    data = random_table(2)
    check_labels(data, SMALL_CONTRACT)  # labels 0/1 for two classes
    data.labels[3] = 2
    data.labels[4] = -1
    with pytest.raises(ContractError, match=r"labels \[-1, 2\] are outside 0..1"):
        check_labels(data, SMALL_CONTRACT)
    data.labels = None
    with pytest.raises(ContractError, match="gives no labels"):
        check_labels(data, SMALL_CONTRACT)


def test_datamodule_refuses_bad_labels() -> None:
    contract = {**jets_contract(), "label": "where(jet_pt > 640, 5, label)"}
    dm = SoADataModule(ToyJetSource(n_jets=64, seed=0), contract, seed=0)
    with pytest.raises(
        ContractError, match=r"labels \[5\] are outside 0..1 for classes \['qcd', 'top'\]"
    ):
        dm.setup()


def test_datamodule_refuses_empty_split() -> None:
    dm = SoADataModule(ToyJetSource(n_jets=5, seed=0), jets_contract(), split=(0.9, 0.05, 0.05))
    with pytest.raises(ContractError, match="split is empty"):
        dm.setup()


# --- SoADataModule ---------------------------------------------------------------------------
def make_datamodule(seed: int = 11, **kwargs) -> SoADataModule:
    return SoADataModule(
        ToyJetSource(n_jets=400, seed=seed),
        jets_contract(max_length=16),
        split=(0.6, 0.2, 0.2),
        seed=seed,
        **kwargs,
    )


def test_datamodule_deterministic_splits() -> None:
    a, b = make_datamodule(), make_datamodule()
    a.setup()
    b.setup()
    assert [len(a.splits[k]) for k in ("train", "val", "test")] == [240, 80, 80]
    for name in ("train", "val", "test"):
        np.testing.assert_array_equal(a.splits[name].flat["jet_pt"], b.splits[name].flat["jet_pt"])
        np.testing.assert_array_equal(
            a.splits[name].jagged["part"].offsets, b.splits[name].jagged["part"].offsets
        )
    assert a.contract == b.contract
    # Splits are disjoint: jet_pt values are continuous random numbers, unique per jet.
    pts = [set(a.splits[k].flat["jet_pt"].tolist()) for k in ("train", "val", "test")]
    assert not pts[0] & pts[1]
    assert not pts[0] & pts[2]
    assert not pts[1] & pts[2]
    assert len(pts[0] | pts[1] | pts[2]) == 400
    a.setup()  # idempotent
    assert len(a.splits["train"]) == 240


def test_datamodule_fits_on_train_split_only() -> None:
    dm = make_datamodule()
    dm.setup()
    contract = dm.contract
    assert contract is not None
    assert contract.fitted
    train = dm.splits["train"]
    full = load(ToyJetSource(n_jets=400, seed=11), dm.table_spec())
    for feat in contract.flat:
        x = train.flat[feat.name].astype(np.float64)
        if feat.transform == "log":
            x = np.log(np.maximum(x, LOG_FLOOR))
        assert feat.mean == pytest.approx(x.mean(), rel=1e-6, abs=1e-9)
        assert feat.scale == pytest.approx(x.std(), rel=1e-6)
    # Not the full table's statistics.
    mass = contract.flat[[f.name for f in contract.flat].index("jet_mass")]
    assert mass.mean != pytest.approx(
        np.log(full.flat["jet_mass"].astype(np.float64)).mean(), rel=1e-6
    )
    coll = train.jagged["part"]
    counts = np.minimum(coll.counts, 16)
    deta = np.concatenate(
        [
            coll.fields["deta"][coll.offsets[i] : coll.offsets[i] + counts[i]]
            for i in range(len(train))
        ]
    ).astype(np.float64)
    field = contract.jagged[0].fields[0]
    assert field.name == "deta"
    assert field.mean == pytest.approx(deta.mean(), rel=1e-5, abs=1e-9)
    assert field.scale == pytest.approx(deta.std(), rel=1e-5)


def test_datamodule_loaders() -> None:
    dm = make_datamodule(batch_size=64, eval_batch_size=30)
    dm.setup()
    train, val, test = dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()
    assert len(train) == 4  # ceil(240 / 64)
    assert len(val) == len(test) == 3  # ceil(80 / 30)
    train_batches = list(train)
    assert [len(b["label"]) for b in train_batches] == [64, 64, 64, 48]
    val_rows = np.concatenate([b["jet_pt"].numpy() for b in val])
    np.testing.assert_array_equal(val_rows, dm.splits["val"].flat["jet_pt"])  # stored order
    batch = train_batches[0]
    assert set(batch) == {*dm.contract.input_names, "label"}
    counts = torch.diff(batch["part_offsets"])
    assert counts.max() <= 16
    assert len(batch["part_pt"]) == int(batch["part_offsets"][-1])
    dropping = make_datamodule(batch_size=64, drop_last=True)
    assert len(dropping.train_dataloader()) == 3
    assert len(dropping.val_dataloader()) == 1  # eval never drops


def test_datamodule_two_fake_ranks_get_disjoint_shards() -> None:
    dm = make_datamodule()
    dm.setup()
    tensors = dm._tensors["train"]
    seen = []
    for rank in range(2):
        sampler = EpochSampler(tensors.n_rows, True, dm.seed, rank=rank, world_size=2)
        loader = SoABatchLoader(tensors, 50, sampler)
        seen.append(np.concatenate([b["jet_pt"].numpy() for b in loader]))
    assert len(seen[0]) == len(seen[1]) == 120
    assert not set(seen[0].tolist()) & set(seen[1].tolist())
    assert set(seen[0].tolist()) | set(seen[1].tolist()) == set(
        dm.splits["train"].flat["jet_pt"].tolist()
    )


@pytest.mark.parametrize("seed", range(3))
def test_device_resident_path_gives_the_default_paths_batches(seed: int) -> None:
    """The GPU-resident path's logic, run on the CPU: columns stacked into matrices and the
    fixed-size, synchronisation-free gather give, after the assembler, the same batches as
    the default path, in the same order for a seed."""
    from project.soa.assembler import SoAAssembler

    dm = SoADataModule(ToyJetSource(700, seed), jets_contract(), batch_size=64, seed=seed)
    dm.setup("fit")
    default = dm._tensors["train"]
    resident = SoATensors(dm.splits["train"], dm.contract).to("cpu", resident=True)
    assert resident.resident
    assert not default.resident
    assert resident._flat_matrix is not None
    assert set(resident._field_matrices) == {"part"}
    assembler = SoAAssembler(dm.contract)
    names = dm.contract.input_names
    sampler = EpochSampler(default.n_rows, True, seed=seed)
    pairs = zip(
        SoABatchLoader(default, 64, sampler), SoABatchLoader(resident, 64, sampler), strict=True
    )
    max_length = dm.contract.jagged[0].max_length
    for a, b in pairs:
        torch.testing.assert_close(a["label"], b["label"])
        flat_a, padded_a, masks_a = assembler([a[k] for k in names])
        flat_b, padded_b, masks_b = assembler([b[k] for k in names])
        torch.testing.assert_close(flat_a, flat_b)
        for x, y in zip(padded_a + masks_a, padded_b + masks_b, strict=True):
            torch.testing.assert_close(x, y)
        # batch * max_length slots per field, the batch's objects first as in the compact one
        n_total = int(a["part_offsets"][-1])
        assert len(b["part_pt"]) == len(a["label"]) * max_length
        torch.testing.assert_close(b["part_pt"][:n_total], a["part_pt"])
