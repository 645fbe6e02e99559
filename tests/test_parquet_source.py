"""ParquetSource on small files written here: round trips, layouts and bad inputs."""

from __future__ import annotations

from pathlib import Path

import hydra
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from project.contract import ContractError, InputContract
from project.data.expressions import MissingFileError
from project.data.sources.parquet import ParquetSource
from project.data.sources.toy import ToyJetSource

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
PT = [[3.0, 2.0], [], [5.0], [1.0, 1.5, 0.5], [], [4.0]]
ETA = [[0.1, 0.2], [], [0.3], [0.4, 0.5, 0.6], [], [0.7]]


def table() -> pa.Table:
    """Six rows: flat columns, a label, a flavour code and two list columns with empty lists."""
    return pa.table(
        {
            "jet_pt": pa.array([10.0, 20.0, 30.0, 40.0, 50.0, 60.0], pa.float32()),
            "jet_n": pa.array([2, 0, 1, 3, 0, 1], pa.int64()),
            "flav": pa.array([5, 0, 4, 5, 0, 0], pa.int32()),
            "label": pa.array([1, 0, 1, 1, 0, 0], pa.int64()),
            "part_pt": pa.array(PT, pa.list_(pa.float32())),
            "part_eta": pa.array(ETA, pa.list_(pa.float32())),
        }
    )


def write(path: Path, tab: pa.Table, **kwargs: int) -> str:
    """Write ``tab`` to ``path`` and return the path as a string."""
    pq.write_table(tab, path, **kwargs)
    return str(path)


def flatten(lists: list[list[float]]) -> np.ndarray:
    """Concatenated values of a list of lists, as float32."""
    return np.array([v for row in lists for v in row], np.float32)


def offsets(lists: list[list[float]]) -> np.ndarray:
    """Offsets of a list of lists."""
    return np.concatenate([[0], np.cumsum([len(r) for r in lists])])


def test_round_trip_multi_chunk(tmp_path: Path, read_table) -> None:
    # Row groups of two rows: every column comes back in three chunks.
    path = write(tmp_path / "t.parquet", table(), row_group_size=2)
    assert pq.read_table(path).column("part_pt").num_chunks == 3
    data = read_table(
        ParquetSource(path),
        flat={"pt": "jet_pt", "n": "jet_n"},
        jagged={"part": ["pt", "eta"]},
        label="label",
    )
    assert len(data) == 6
    assert data.source == path
    np.testing.assert_array_equal(data.flat["pt"], [10, 20, 30, 40, 50, 60])
    np.testing.assert_array_equal(data.flat["n"], [2, 0, 1, 3, 0, 1])
    part = data.jagged["part"]
    np.testing.assert_array_equal(part.offsets, offsets(PT))
    np.testing.assert_array_equal(part.fields["pt"], flatten(PT))
    np.testing.assert_array_equal(part.fields["eta"], flatten(ETA))
    assert data.labels.dtype == np.int64
    np.testing.assert_array_equal(data.labels, [1, 0, 1, 1, 0, 0])


def test_sliced_and_concatenated_table(tmp_path: Path, read_table) -> None:
    # A slice of a two-chunk table: list offsets that do not start at 0 in memory.
    tab = pa.concat_tables([table(), table()]).slice(3, 7)
    path = write(tmp_path / "s.parquet", tab)
    data = read_table(ParquetSource(path), flat=["jet_pt"], jagged={"part": {"pt": "part_pt"}})
    lists = (PT + PT)[3:10]
    np.testing.assert_array_equal(data.flat["jet_pt"], tab.column("jet_pt").to_numpy())
    np.testing.assert_array_equal(data.jagged["part"].offsets, offsets(lists))
    np.testing.assert_array_equal(data.jagged["part"].fields["pt"], flatten(lists))


def test_selection_and_expressions(tmp_path: Path, read_table) -> None:
    data = read_table(
        ParquetSource(write(tmp_path / "t.parquet", table())),
        flat={"log_pt": "log(jet_pt)"},
        jagged={"part": {"pt": "part_pt", "rel": "part_pt / jet_pt"}},
        label="abs(flav) == 5",
        selection="jet_pt > 15 and num(part_pt) > 0",
    )
    keep = np.array([2, 3, 5])
    np.testing.assert_allclose(data.flat["log_pt"], np.log([30, 40, 60]), rtol=1e-6)
    lists = [PT[i] for i in keep]
    np.testing.assert_array_equal(data.jagged["part"].offsets, offsets(lists))
    pts = np.repeat([30.0, 40.0, 60.0], [len(r) for r in lists])
    np.testing.assert_allclose(data.jagged["part"].fields["rel"], flatten(lists) / pts, rtol=1e-6)
    np.testing.assert_array_equal(data.labels, [0, 1, 0])


def test_per_object_rows(tmp_path: Path, read_table) -> None:
    data = read_table(
        ParquetSource(write(tmp_path / "t.parquet", table())),
        per_object="part",
        flat=["part_pt", "jet_pt"],
        label="label",
    )
    counts = [len(r) for r in PT]
    assert len(data) == sum(counts)
    np.testing.assert_array_equal(data.flat["part_pt"], flatten(PT))
    np.testing.assert_array_equal(data.flat["jet_pt"], np.repeat([10, 20, 30, 40, 50, 60], counts))
    np.testing.assert_array_equal(data.labels, np.repeat([1, 0, 1, 1, 0, 0], counts))


def test_multiple_files_are_concatenated(tmp_path: Path, read_table) -> None:
    a = write(tmp_path / "a.parquet", table())
    b = write(tmp_path / "b.parquet", table().slice(0, 2))
    data = read_table(ParquetSource([a, b]), flat=["jet_pt"], jagged={"part": ["pt"]})
    assert len(data) == 8
    assert "+1 more" in data.source
    np.testing.assert_array_equal(data.jagged["part"].offsets, offsets(PT + PT[:2]))
    assert len(read_table(ParquetSource(str(tmp_path / "*.parquet")), flat=["jet_pt"])) == 8


def test_written_tables_read_back_and_config(tmp_path: Path, read_table) -> None:
    """The data layer's writer (flat columns, int64 label, list<float32> part_*) read back
    through the jets contract, then the data=parquet config down to a set-up DataModule."""
    from project.data.expressions import TableSpec
    from project.data.sources import load
    from project.data.writing import arrow_table, write_parquet

    compose_cfg = _jets_config(["data=toy"])
    contract = InputContract.from_dict(compose_cfg.data.contract)
    toy = load(ToyJetSource(n_jets=200, seed=1), TableSpec(contract))
    path = str(tmp_path / "jets.parquet")
    write_parquet(
        arrow_table({**toy.flat, "label": toy.labels}, toy.jagged), path, row_group_size=64
    )
    data = load(ParquetSource(path), TableSpec(contract))
    assert pq.ParquetFile(path).metadata.num_row_groups == 4
    np.testing.assert_array_equal(data.jagged["part"].offsets, toy.jagged["part"].offsets)
    np.testing.assert_array_equal(data.flat["jet_tau32"], toy.flat["jet_tau32"])
    np.testing.assert_array_equal(data.labels, toy.labels)

    cfg = _jets_config(["data=parquet", f"data.source.files=[{path}]"])
    dm = hydra.utils.instantiate(cfg.data)
    dm.setup()
    assert sum(len(s) for s in dm.splits.values()) == 200
    assert dm.contract.fitted


def _jets_config(overrides: list[str]) -> object:
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        cfg = compose("train", overrides=overrides)
    GlobalHydra.instance().clear()
    return cfg


# --- bad inputs ---------------------------------------------------------------------------
def test_missing_file(tmp_path: Path, read_table) -> None:
    with pytest.raises(MissingFileError, match=r"Parquet file '.*nope.parquet' does not exist"):
        read_table(ParquetSource(str(tmp_path / "nope.parquet")), flat=["x"])


def test_not_a_parquet_file(tmp_path: Path, read_table) -> None:
    bad = tmp_path / "bad.parquet"
    bad.write_text("text")
    with pytest.raises(ContractError, match="is not a readable Parquet file"):
        read_table(ParquetSource(str(bad)), flat=["x"])


def test_missing_column(tmp_path: Path, read_table) -> None:
    path = write(tmp_path / "t.parquet", table())
    with pytest.raises(ContractError, match=r"column 'jet_ptt' does not exist.*'jet_pt'"):
        read_table(ParquetSource(path), flat={"pt": "jet_ptt"}, jagged={})


def test_list_column_declared_flat(tmp_path: Path, read_table) -> None:
    path = write(tmp_path / "t.parquet", table())
    with pytest.raises(ContractError, match=r"'part_pt' is jagged.*`jagged`"):
        read_table(ParquetSource(path), flat=["part_pt"], jagged={})


def test_mismatched_list_lengths_in_one_collection(tmp_path: Path, read_table) -> None:
    tab = table().append_column("part_bad", pa.array([[1.0]] * 6, pa.list_(pa.float32())))
    path = write(tmp_path / "t.parquet", tab)
    with pytest.raises(ContractError, match=r"collection 'part' have different numbers of objects"):
        read_table(ParquetSource(path), flat=[], jagged={"part": ["pt", "bad"]})


def test_null_values(tmp_path: Path, read_table) -> None:
    tab = table().append_column("gap", pa.array([1.0, None, 2.0, 3.0, 4.0, 5.0]))
    path = write(tmp_path / "t.parquet", tab)
    with pytest.raises(ContractError, match=r"'gap' has type .*not a plain array of numbers"):
        read_table(ParquetSource(path), flat=["gap"], jagged={})


def test_selection_selecting_nothing(tmp_path: Path, read_table) -> None:
    path = write(tmp_path / "t.parquet", table())
    with pytest.raises(ContractError, match=r"keeps none of the 6 rows"):
        read_table(ParquetSource(path), flat=["jet_pt"], selection="jet_pt < 0")
