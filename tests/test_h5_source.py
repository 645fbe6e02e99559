"""The HDF5 source (salt/UPP layout) against the Parquet source on the same toy jets."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import awkward as ak
import h5py
import numpy as np
import pytest
from omegaconf import OmegaConf

from project.contract import ContractError, InputContract, Target
from project.data.columnar import ColumnarData, Jagged
from project.data.datamodule import SoADataModule
from project.data.expressions import TableSpec
from project.data.sources import load
from project.data.sources.h5 import H5Source
from project.data.sources.parquet import ParquetSource
from project.data.sources.toy import EXTRA, FIELDS, FLAT, ToyJetSource
from project.data.writing import arrow_table, write_parquet

N_JETS, CHUNK = 300, 64
WEIGHT = "gen_weight * xsec"


def write_h5(path: Path, table: dict, max_objects: int, chunk: int = CHUNK) -> None:
    """The toy table in the salt/UPP layout: a flat ``jets`` dataset and a padded ``part``
    dataset with a ``valid`` flag."""
    n = len(table["label"])
    jets = np.zeros(n, dtype=[(c, table[c].dtype) for c in (*FLAT, *EXTRA)])
    for c in (*FLAT, *EXTRA):
        jets[c] = table[c]
    part = np.zeros((n, max_objects), dtype=[*((f, np.float32) for f in FIELDS), ("valid", bool)])
    counts = ak.to_numpy(ak.num(table["part_pt"]))
    part["valid"] = np.arange(max_objects)[None, :] < counts[:, None]
    for f in FIELDS:
        padded = ak.fill_none(ak.pad_none(table[f"part_{f}"], max_objects, clip=True), -999.0)
        part[f] = ak.to_numpy(padded)
    with h5py.File(path, "w") as h5:
        h5.create_dataset("jets", data=jets, chunks=(chunk,))
        h5.create_dataset("part", data=part, chunks=(chunk, max_objects))


def write_same_parquet(path: Path, table: dict) -> None:
    counts = ak.to_numpy(ak.num(table["part_pt"]))
    fields = {f: ak.to_numpy(ak.flatten(table[f"part_{f}"])) for f in FIELDS}
    flat = {c: table[c] for c in (*FLAT, *EXTRA)}
    write_parquet(arrow_table(flat, {"part": Jagged.from_counts(counts, fields)}), path, CHUNK)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("h5")
    source = ToyJetSource(n_jets=N_JETS, seed=3, max_constituents=30)
    table = source.table
    h5_path, pq_path = tmp / "jets.h5", tmp / "jets.parquet"
    write_h5(h5_path, table, max_objects=30)
    write_same_parquet(pq_path, table)
    return h5_path, pq_path


@pytest.fixture(scope="module")
def contract(repo_root: Path) -> InputContract:
    d = OmegaConf.to_container(OmegaConf.load(repo_root / "configs/data/contract/jets.yaml"))
    jets = InputContract.from_dict(d)
    # A short padding length, so the SoA keeps rows longer than it (the assembler truncates).
    coll = replace(jets.jagged[0], max_length=12)
    return replace(
        jets, jagged=(coll,), regression=(Target("jet_truth_mass", loss="huber"),), outputs=()
    )


def assert_same(a: ColumnarData, b: ColumnarData) -> None:
    assert len(a) == len(b) == N_JETS
    assert a.flat.keys() == b.flat.keys()
    for k in a.flat:
        np.testing.assert_array_equal(a.flat[k], b.flat[k], err_msg=k)
    assert a.jagged.keys() == b.jagged.keys()
    for c in a.jagged:
        np.testing.assert_array_equal(a.jagged[c].offsets, b.jagged[c].offsets)
        for f in a.jagged[c].fields:
            np.testing.assert_array_equal(a.jagged[c].fields[f], b.jagged[c].fields[f], err_msg=f)
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(a.weights, b.weights)
    for k in a.targets:
        np.testing.assert_array_equal(a.targets[k], b.targets[k])


def test_h5_equals_parquet_on_the_same_jets(files, contract) -> None:
    h5_path, pq_path = files
    spec = TableSpec(contract, weight=WEIGHT)
    source = H5Source(h5_path)
    assert len(source.chunks(str(h5_path), [])) == -(-N_JETS // CHUNK)  # the HDF5 chunks
    from_h5 = load(source, spec)
    from_parquet = load(ParquetSource(pq_path), spec)
    assert_same(from_h5, from_parquet)
    # The padding never reaches the table: the objects are the valid slots.
    counts = from_h5.jagged["part"].counts
    assert counts.max() > 12
    assert (counts == 0).any()
    assert not np.any(from_h5.jagged["part"].fields["pt"] == -999.0)
    assert (from_h5.weights < 0).any()  # gen_weight's negative entries survive


def test_h5_gives_the_same_splits_and_constants(files, contract) -> None:
    h5_path, pq_path = files
    modules = [
        SoADataModule(s, contract, weight=WEIGHT, split=(0.6, 0.2, 0.2), seed=5)
        for s in (H5Source(h5_path, step=50), ParquetSource(pq_path))
    ]
    for m in modules:
        m.setup()
    assert modules[0].contract == modules[1].contract
    for name in ("train", "val", "test"):
        a, b = modules[0].splits[name], modules[1].splits[name]
        for k in a.flat:
            np.testing.assert_array_equal(a.flat[k], b.flat[k])
        np.testing.assert_array_equal(a.jagged["part"].fields["dr"], b.jagged["part"].fields["dr"])
        np.testing.assert_array_equal(a.weights, b.weights)


def test_h5_config_composes(compose_train, tmp_path, files) -> None:
    h5_path, _ = files
    cfg = compose_train(["data=h5", f"data.source.files=[{h5_path}]"], tmp_path)
    from hydra.utils import instantiate

    datamodule = instantiate(cfg.data, _convert_="all")
    datamodule.setup()
    assert (
        len(datamodule.splits["train"])
        + len(datamodule.splits["val"])
        + len(datamodule.splits["test"])
        == N_JETS
    )


# --- bad files ---------------------------------------------------------------------------


def _jets(n: int = 4) -> np.ndarray:
    jets = np.zeros(n, dtype=[("jet_pt", np.float32), ("label", np.int64), ("name", "S4")])
    jets["jet_pt"] = np.arange(n) + 500
    return jets


def _read(path: Path, **kwargs) -> ColumnarData:
    from project.contract import Feature

    contract = InputContract(flat=(Feature("jet_pt"),), classes=("a", "b"))
    return load(H5Source(path, **kwargs), TableSpec(contract, labels=False))


def test_file_without_jets_dataset(tmp_path) -> None:
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("tracks", data=np.zeros(3))
    with pytest.raises(
        ContractError, match=r"other\.h5 has no dataset 'jets' \(its datasets: \['tracks'\]\)"
    ):
        _read(path)


def test_jets_that_are_not_a_compound_dataset(tmp_path) -> None:
    path = tmp_path / "plain.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("jets", data=np.zeros((3, 2), dtype=np.float32))
    with pytest.raises(
        ContractError, match=r"plain\.h5: dataset 'jets' has dtype float32 and shape \(3, 2\)"
    ):
        _read(path)


def test_collection_with_the_wrong_shape(tmp_path) -> None:
    path = tmp_path / "shape.h5"
    part = np.zeros((5, 3), dtype=[("pt", np.float32), ("valid", bool)])  # 5 rows for 4 jets
    with h5py.File(path, "w") as h5:
        h5.create_dataset("jets", data=_jets())
        h5.create_dataset("part", data=part)
    with pytest.raises(
        ContractError,
        match=r"dataset 'part' has .* shape \(5, 3\); expected a compound dataset of shape \(4, max_objects\)",
    ):
        _read(path)


def test_collection_without_or_with_a_non_boolean_valid_flag(tmp_path) -> None:
    path = tmp_path / "valid.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("jets", data=_jets())
        h5.create_dataset("part", data=np.zeros((4, 3), dtype=[("pt", np.float32)]))
    with pytest.raises(ContractError, match=r"dataset 'part' has no field 'valid'"):
        _read(path, collections=["part"])
    with h5py.File(path, "w") as h5:
        h5.create_dataset("jets", data=_jets())
        h5.create_dataset(
            "part", data=np.zeros((4, 3), dtype=[("pt", np.float32), ("valid", np.int8)])
        )
    with pytest.raises(ContractError, match=r"field part\.valid has dtype int8; expected bool"):
        _read(path)


def test_missing_collection_and_non_numeric_field(tmp_path) -> None:
    path = tmp_path / "fields.h5"
    with h5py.File(path, "w") as h5:
        h5.create_dataset("jets", data=_jets())
    with pytest.raises(ContractError, match=r"has no dataset 'tracks'.*data\.source\.collections"):
        _read(path, collections=["tracks"])
    from project.contract import Feature

    contract = InputContract(flat=(Feature("name"),), classes=("a", "b"))
    with pytest.raises(ContractError, match=r"field jets\.name has dtype \|S4; expected a number"):
        load(H5Source(path), TableSpec(contract, labels=False))


def test_not_an_hdf5_file(tmp_path) -> None:
    path = tmp_path / "broken.h5"
    path.write_bytes(b"not hdf5 at all")
    with pytest.raises(ContractError, match=r"broken\.h5 is not a readable HDF5 file"):
        _read(path)
