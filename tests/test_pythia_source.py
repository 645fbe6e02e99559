"""PythiaJetSource: schema, determinism, Parquet cache and physics sanity on tiny samples."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from project.contract import ContractError, Feature, InputContract, JaggedCollection
from project.data.columnar import ColumnarData
from project.data.expressions import TableSpec
from project.data.sources import load
from project.data.sources import pythia as jets_mod
from project.data.sources.nsubjettiness import nsubjettiness
from project.data.sources.parquet import ParquetSource
from project.data.sources.pythia import CLASSES, FLAT_COLUMNS, PART_FIELDS, PythiaJetSource
from project.data.writing import arrow_table, write_parquet

# Every stored column of the cache, as a contract reads it.
EVERYTHING = InputContract(
    flat=tuple(Feature(c) for c in FLAT_COLUMNS),
    jagged=(JaggedCollection("part", 64, tuple(Feature(f) for f in PART_FIELDS)),),
    classes=CLASSES,
)
SMALL = {"n_jets": 100, "seed": 3, "chunk_size": 25, "progress": False}
TINY = {"n_jets": 40, "chunk_size": 10, "progress": False}


def read(source: object) -> ColumnarData:
    """Every column of a jets source (or of a Parquet file written like its cache)."""
    return load(source, TableSpec(EVERYTHING))


def _assert_same(a: ColumnarData, b: ColumnarData) -> None:
    assert a.flat.keys() == b.flat.keys()
    for k in a.flat:
        np.testing.assert_array_equal(a.flat[k], b.flat[k], err_msg=k)
    np.testing.assert_array_equal(a.labels, b.labels)
    pa_, pb = a.jagged["part"], b.jagged["part"]
    np.testing.assert_array_equal(pa_.offsets, pb.offsets)
    for f in PART_FIELDS:
        np.testing.assert_array_equal(pa_.fields[f], pb.fields[f], err_msg=f)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[PythiaJetSource, ColumnarData]:
    src = PythiaJetSource(**SMALL, workers=1, cache_dir=str(tmp_path_factory.mktemp("jets")))
    return src, read(src)


def test_schema(small: tuple[PythiaJetSource, ColumnarData]) -> None:
    src, data = small
    assert len(data) == 100
    assert set(data.flat) == set(FLAT_COLUMNS)
    assert all(v.dtype == np.float32 for v in data.flat.values())
    assert data.labels.dtype == np.int64
    assert np.bincount(data.labels).tolist() == [50, 50]
    assert set(data.labels[:20].tolist()) == {0, 1}  # shuffled, not class-sorted
    assert data.source == str(src.cache_path)

    part = data.jagged["part"]
    assert set(part.fields) == set(PART_FIELDS)
    assert part.offsets.dtype == np.int64
    assert part.offsets[0] == 0
    assert np.all(np.diff(part.offsets) > 0)
    assert all(v.dtype == np.float32 and len(v) == part.offsets[-1] for v in part.fields.values())
    np.testing.assert_array_equal(data.flat["jet_n_constituents"], part.counts)

    pt = part.fields["pt"]
    jet_of = np.repeat(np.arange(len(data)), part.counts)
    # Decreasing pT within each jet: a drop may only happen across a jet boundary.
    rises = np.flatnonzero(np.diff(pt) > 0) + 1
    assert np.all(np.isin(rises, part.offsets[1:-1]))
    # Constituents add up to the jet (E-scheme) and ptrel is pt / jet pt.
    sum_e = np.bincount(jet_of, weights=part.fields["energy"].astype(np.float64))
    assert np.allclose(part.fields["energy"] / part.fields["erel"], sum_e[jet_of], rtol=1e-4)
    np.testing.assert_allclose(part.fields["ptrel"], pt / data.flat["jet_pt"][jet_of], rtol=1e-5)

    assert np.all((data.flat["jet_pt"] >= 550.0) & (data.flat["jet_pt"] <= 650.0))
    assert np.all(np.abs(data.flat["jet_eta"]) <= 2.0)
    assert np.all(np.abs(part.fields["eta"]) < 2.5)
    dphi, deta, dr = part.fields["dphi"], part.fields["deta"], part.fields["dr"]
    assert np.all((dphi >= -np.pi) & (dphi < np.pi))
    np.testing.assert_allclose(dr, np.hypot(deta, dphi), rtol=1e-5, atol=1e-6)
    # Anti-kt is conical for the hard part; only very soft particles stray beyond R.
    assert np.quantile(dr, 0.99) <= 0.9
    assert np.all(dr[part.fields["ptrel"] > 0.02] <= 0.9)

    taus = np.stack([data.flat[f"jet_tau{n}"] for n in (1, 2, 3)], axis=1)
    assert np.all(taus >= 0)
    # kt axes are not the minimising ones, so tau_N may exceed tau_(N-1) for a single jet,
    # but not on average.
    assert np.all(np.diff(taus.mean(axis=0)) < 0)
    np.testing.assert_allclose(data.flat["jet_tau32"], taus[:, 2] / taus[:, 1], rtol=1e-5)


def test_physics_sanity(small: tuple[PythiaJetSource, ColumnarData]) -> None:
    _, data = small
    top, qcd = data.labels == 1, data.labels == 0
    mass, tau32 = data.flat["jet_mass"], data.flat["jet_tau32"]
    assert mass[top].mean() > mass[qcd].mean() + 30.0
    assert 140.0 < np.median(mass[top]) < 200.0  # a top-mass peak, not a tail
    assert tau32[top].mean() < tau32[qcd].mean() - 0.1


def test_cache_is_read_back(
    small: tuple[PythiaJetSource, ColumnarData], monkeypatch: pytest.MonkeyPatch
) -> None:
    src, data = small
    path = src.cache_path
    assert path.exists()
    assert path.name.startswith("jets-")
    assert path.suffix == ".parquet"
    assert json.loads(path.with_suffix(".json").read_text())["seed"] == SMALL["seed"]
    # Only the cache and its sidecar (and the hidden generation lock): the temporary files
    # were renamed into place.
    visible = (p.name for p in path.parent.iterdir() if not p.name.startswith("."))
    assert sorted(visible) == sorted([path.name, path.with_suffix(".json").name])

    def boom(*args: object, **kwargs: object) -> None:
        raise AssertionError("generated although the cache exists")

    monkeypatch.setattr(jets_mod, "_generate_chunk", boom)
    monkeypatch.setattr(PythiaJetSource, "_generate", boom)
    again = PythiaJetSource(**SMALL, workers=2, cache_dir=str(path.parent))
    assert again.cache_path == path  # workers and progress are not part of the key
    _assert_same(data, read(again))

    schema = pq.read_schema(path)
    for f in PART_FIELDS:
        assert schema.field(f"part_{f}").type == pa.list_(pa.float32())
    assert schema.field("label").type == pa.int64()
    assert pq.read_metadata(path).num_rows == 100


def test_same_seed_same_output_any_workers(tmp_path) -> None:
    one = PythiaJetSource(**TINY, seed=11, workers=1, cache_dir=str(tmp_path / "a"))
    two = PythiaJetSource(**TINY, seed=11, workers=2, cache_dir=str(tmp_path / "b"))
    other = PythiaJetSource(**TINY, seed=12, workers=1, cache_dir=str(tmp_path / "c"))
    assert one.cache_path.name == two.cache_path.name != other.cache_path.name
    a, b, c = read(one), read(two), read(other)
    _assert_same(a, b)
    assert one.cache_path.read_bytes() == two.cache_path.read_bytes()
    assert not np.array_equal(a.flat["jet_pt"], c.flat["jet_pt"])


def test_class_split_and_chunks() -> None:
    tasks = PythiaJetSource(n_jets=101, chunk_size=25)._tasks()
    sizes = {label: [t.n_jets for t in tasks if t.label == label] for label in (0, 1)}
    assert sizes == {0: [25, 25, 1], 1: [25, 25]}
    seeds = [t.pythia_seed for t in tasks]
    assert len(set(seeds)) == len(seeds)
    assert all(0 < s <= 900_000_000 for s in seeds)
    # A chunk's seed depends on (seed, class, index) only, not on the total size.
    bigger = PythiaJetSource(n_jets=1000, chunk_size=25)._tasks()
    assert {(t.label, t.index): t.pythia_seed for t in bigger}.items() >= {
        (t.label, t.index): t.pythia_seed for t in tasks
    }.items()


def test_parquet_rejects_mismatched_offsets(
    small: tuple[PythiaJetSource, ColumnarData], tmp_path
) -> None:
    _, data = small
    good = tmp_path / "good.parquet"
    write_parquet(arrow_table({**data.flat, "label": data.labels}, data.jagged), good)
    _assert_same(data, read(ParquetSource(str(good))))
    table = pq.read_table(good)
    lists = table.column("part_pt").combine_chunks()
    offsets = np.asarray(lists.offsets).copy()
    offsets[1] += 1  # move one constituent into the next jet
    broken = pa.ListArray.from_arrays(pa.array(offsets), lists.values)
    table = table.set_column(table.schema.get_field_index("part_pt"), "part_pt", broken)
    bad = tmp_path / "bad.parquet"
    pq.write_table(table, bad)
    with pytest.raises(ContractError, match="collection 'part' have different numbers of objects"):
        read(ParquetSource(str(bad)))


def test_nsubjettiness_on_known_jets() -> None:
    # Jet 0: three hard, well-separated massless prongs -> tau3 = 0 < tau2 < tau1.
    # Jet 1: a single particle -> all zero.
    pt = np.array([300.0, 200.0, 100.0, 50.0])
    eta = np.array([0.0, 0.4, -0.3, 1.0])
    phi = np.array([0.0, 0.3, -0.4, 2.0])
    px, py, pz = pt * np.cos(phi), pt * np.sin(phi), pt * np.sinh(eta)
    e = np.sqrt(px**2 + py**2 + pz**2)
    taus = nsubjettiness(np.array([0, 3, 4]), px, py, pz, e, radius=0.8)
    assert taus.shape == (2, 3)
    assert taus[0, 0] > taus[0, 1] > 0
    assert taus[0, 2] == pytest.approx(0.0, abs=1e-9)
    np.testing.assert_array_equal(taus[1], 0.0)
    # kt merges prongs 0 and 2 first (smallest min(pT^2) dR^2), so the tau2 axes are
    # (p0 + p2) and p1; distances in (rapidity, phi) as in FastJet.
    ax_px, ax_py, ax_pz, ax_e = px[0] + px[2], py[0] + py[2], pz[0] + pz[2], e[0] + e[2]
    ax_y = 0.5 * np.log((ax_e + ax_pz) / (ax_e - ax_pz))
    ax_phi = np.arctan2(ax_py, ax_px)
    expected = sum(pt[i] * np.hypot(eta[i] - ax_y, phi[i] - ax_phi) for i in (0, 2)) / (600 * 0.8)
    assert taus[0, 1] == pytest.approx(expected, rel=1e-6)
    # tau1: one axis along the sum of the three prongs.
    sx, sy, sz, se = px[:3].sum(), py[:3].sum(), pz[:3].sum(), e[:3].sum()
    y1, phi1 = 0.5 * np.log((se + sz) / (se - sz)), np.arctan2(sy, sx)
    expected = sum(pt[i] * np.hypot(eta[i] - y1, phi[i] - phi1) for i in range(3)) / (600 * 0.8)
    assert taus[0, 0] == pytest.approx(expected, rel=1e-6)
