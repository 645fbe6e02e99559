"""RootSource on the real ROOT files of ../shared/data: layouts, expressions and bad inputs."""

from __future__ import annotations

from pathlib import Path

import awkward as ak
import hydra
import numpy as np
import pytest
import uproot
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig

from project.contract import ContractError
from project.data.sources._expressions import MissingFileError
from project.data.sources.root import RootSource

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
NANO = str(SHARED / "nanoAOD_2015_CMS_Open_Data_ttbar.root")
HZZ = str(SHARED / "uproot-HZZ.root")
ZMUMU = str(SHARED / "uproot-Zmumu.root")
CONFIGS = Path(__file__).resolve().parents[1] / "configs"

pytestmark = pytest.mark.skipif(not SHARED.is_dir(), reason=f"no shared data at {SHARED}")


def compose_data(name: str, overrides: tuple[str, ...] = ()) -> DictConfig:
    """The training config with ``data=name`` (only its data group is used)."""
    GlobalHydra.instance().clear()
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIGS)):
        cfg = compose(config_name="train", overrides=[f"data={name}", *overrides])
    GlobalHydra.instance().clear()
    return cfg


def branches(path: str, tree: str, names: list[str]) -> ak.Array:
    """The named branches, read directly with uproot, for comparison."""
    with uproot.open(path) as f:
        return f[tree].arrays(names, library="ak")


# --- layouts -----------------------------------------------------------------------------
def test_per_event_flat_zmumu() -> None:
    data = RootSource(ZMUMU, "events", flat=["M", "px1"], label="Q1 > 0").load()
    ref = branches(ZMUMU, "events", ["M", "px1", "Q1"])
    assert len(data) == 2304
    assert data.source == f"{ZMUMU}:events"
    np.testing.assert_array_equal(data.flat["M"], ak.to_numpy(ref.M))
    np.testing.assert_array_equal(data.flat["px1"], ak.to_numpy(ref.px1))
    assert data.labels.dtype == np.int64
    np.testing.assert_array_equal(data.labels, ak.to_numpy(ref.Q1 > 0).astype(np.int64))


def test_expressions_are_elementwise() -> None:
    src = RootSource(
        ZMUMU,
        "events",
        flat={"pt": "hypot(px1, py1)", "m": "M"},
        selection="M > 80 and not M >= 100",
    )
    chained = RootSource(ZMUMU, "events", flat={"m": "M"}, selection="80 < M < 100").load()
    data = src.load()
    ref = branches(ZMUMU, "events", ["px1", "py1", "M"])
    keep = ak.to_numpy((ref.M > 80) & (ref.M < 100))
    assert 0 < len(data) == keep.sum() == len(chained)
    pt = np.hypot(ak.to_numpy(ref.px1), ak.to_numpy(ref.py1))[keep]
    np.testing.assert_array_equal(data.flat["pt"], pt)
    np.testing.assert_array_equal(data.flat["m"], chained.flat["m"])


def test_per_event_jagged_hzz() -> None:
    data = RootSource(
        HZZ,
        "events",
        flat={"met": "hypot(MET_px, MET_py)"},
        jagged={
            "jet": {"px": "Jet_Px", "e": "Jet_E", "pt": "hypot(Jet_Px, Jet_Py)"},
            "Muon": ["E"],
        },
        label="NMuon >= 2",
    ).load()
    ref = branches(HZZ, "events", ["NJet", "Jet_Px", "Jet_Py", "Jet_E", "Muon_E", "NMuon"])
    jet = data.jagged["jet"]
    assert len(data) == 2421
    np.testing.assert_array_equal(jet.offsets, np.concatenate([[0], np.cumsum(ref.NJet)]))
    np.testing.assert_array_equal(jet.fields["px"], ak.to_numpy(ak.flatten(ref.Jet_Px)))
    np.testing.assert_array_equal(jet.fields["e"], ak.to_numpy(ak.flatten(ref.Jet_E)))
    pt = np.hypot(ak.to_numpy(ak.flatten(ref.Jet_Px)), ak.to_numpy(ak.flatten(ref.Jet_Py)))
    np.testing.assert_allclose(jet.fields["pt"], pt, rtol=1e-6)
    # The list form names fields: {Muon: [E]} reads the branch Muon_E.
    np.testing.assert_array_equal(data.jagged["Muon"].counts, ak.to_numpy(ref.NMuon))
    np.testing.assert_array_equal(data.labels, ak.to_numpy(ref.NMuon >= 2))


def test_chunked_reading_matches_one_chunk() -> None:
    kwargs = dict(flat=["MET_px"], jagged={"jet": {"px": "Jet_Px"}}, selection="NJet >= 1")
    whole = RootSource(HZZ, "events", **kwargs).load()
    chunked = RootSource(HZZ, "events", step_size=100, **kwargs).load()
    np.testing.assert_array_equal(whole.flat["MET_px"], chunked.flat["MET_px"])
    np.testing.assert_array_equal(whole.jagged["jet"].offsets, chunked.jagged["jet"].offsets)
    np.testing.assert_array_equal(
        whole.jagged["jet"].fields["px"], chunked.jagged["jet"].fields["px"]
    )


def test_per_object_nanoaod_one_row_per_jet() -> None:
    data = RootSource(
        NANO,
        "Events",
        per_object="Jet",
        flat={"pt": "Jet_pt", "csv": "Jet_btagCSVV2", "met": "MET_pt", "n": "nJet"},
        label="abs(Jet_hadronFlavour) == 5",
    ).load()
    ref = branches(
        NANO, "Events", ["nJet", "Jet_pt", "Jet_btagCSVV2", "MET_pt", "Jet_hadronFlavour"]
    )
    n_jet = ak.to_numpy(ref.nJet)
    assert len(data) == n_jet.sum() == 537
    np.testing.assert_array_equal(data.flat["pt"], ak.to_numpy(ak.flatten(ref.Jet_pt)))
    np.testing.assert_array_equal(data.flat["csv"], ak.to_numpy(ak.flatten(ref.Jet_btagCSVV2)))
    # Event-level branches are repeated for each jet of their event.
    np.testing.assert_array_equal(data.flat["met"], np.repeat(ak.to_numpy(ref.MET_pt), n_jet))
    np.testing.assert_array_equal(data.flat["n"], np.repeat(n_jet, n_jet))
    flavour = ak.to_numpy(ak.flatten(ref.Jet_hadronFlavour))
    np.testing.assert_array_equal(data.labels, (np.abs(flavour) == 5).astype(np.int64))
    assert data.labels.sum() == 6


def test_per_object_selection() -> None:
    ref = branches(NANO, "Events", ["nJet", "Jet_pt", "Jet_eta"])
    pt = ak.to_numpy(ak.flatten(ref.Jet_pt))
    eta = ak.to_numpy(ak.flatten(ref.Jet_eta))
    n_event = np.repeat(ak.to_numpy(ref.nJet), ak.to_numpy(ref.nJet))
    data = RootSource(
        NANO, "Events", per_object="Jet", flat={"pt": "Jet_pt"},
        selection="Jet_pt > 30 and abs(Jet_eta) < 2.4 and nJet >= 3",
    ).load()  # fmt: skip
    keep = (pt > 30) & (np.abs(eta) < 2.4) & (n_event >= 3)
    assert 0 < len(data) == keep.sum() < 537
    np.testing.assert_array_equal(data.flat["pt"], pt[keep])


def test_per_object_rows_carry_their_events_collections() -> None:
    data = RootSource(
        NANO, "Events", per_object="Jet", flat={"pt": "Jet_pt"}, jagged={"muon": {"pt": "Muon_pt"}}
    ).load()
    ref = branches(NANO, "Events", ["nJet", "nMuon", "Muon_pt"])
    n_jet = ak.to_numpy(ref.nJet)
    np.testing.assert_array_equal(
        data.jagged["muon"].counts, np.repeat(ak.to_numpy(ref.nMuon), n_jet)
    )
    first_jet = np.concatenate([[0], np.cumsum(n_jet)[:-1]])[n_jet > 0]
    muons = data.take(first_jet).jagged["muon"].fields["pt"]
    np.testing.assert_array_equal(muons, ak.to_numpy(ak.flatten(ref.Muon_pt[n_jet > 0])))


def test_multiple_files_are_concatenated() -> None:
    one = RootSource(ZMUMU, "events", flat=["M"], label="Q1 > 0").load()
    two = RootSource([ZMUMU, ZMUMU], "events", flat=["M"], label="Q1 > 0").load()
    assert len(two) == 2 * len(one)
    np.testing.assert_array_equal(two.flat["M"], np.concatenate([one.flat["M"]] * 2))
    np.testing.assert_array_equal(two.labels, np.concatenate([one.labels] * 2))
    assert "+1 more" in two.source
    globbed = RootSource(str(SHARED / "uproot-Zm*.root"), "events", flat=["M"]).load()
    assert len(globbed) == len(one)


def test_reduction_selection_per_event() -> None:
    data = RootSource(HZZ, "events", flat=["NJet"], selection="any(Jet_Px > 0)").load()
    ref = branches(HZZ, "events", ["Jet_Px"])
    assert len(data) == int(ak.sum(ak.any(ref.Jet_Px > 0, axis=1)))


# --- the configs --------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "rows"), [("root", 537), ("hzz", 2421)])
def test_data_configs_set_up(name: str, rows: int) -> None:
    dm = hydra.utils.instantiate(compose_data(name).data)
    dm.setup()
    assert sum(len(s) for s in dm.splits.values()) == rows
    assert dm.contract.fitted


# --- bad inputs ---------------------------------------------------------------------------
def test_missing_file() -> None:
    with pytest.raises(MissingFileError, match=r"nope\.root' does not exist.*paths") as info:
        RootSource([ZMUMU, "nope.root"], "events", flat=["M"]).load()
    assert isinstance(info.value, FileNotFoundError)


def test_not_a_root_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.root"
    bad.write_text("not root")
    with pytest.raises(ContractError, match=r"bad\.root is not a readable ROOT file"):
        RootSource(str(bad), "events", flat=["M"]).load()


def test_missing_tree_lists_trees() -> None:
    with pytest.raises(ContractError, match=r"no TTree named 'Evts'.*\['Events'\]"):
        RootSource(NANO, "Evts", flat=["nJet"]).load()


def test_missing_branch_lists_close_matches() -> None:
    with pytest.raises(ContractError, match=r"branch 'Jet_ptt' does not exist.*'Jet_pt'"):
        RootSource(NANO, "Events", per_object="Jet", flat={"pt": "Jet_ptt"}).load()


def test_unknown_function() -> None:
    with pytest.raises(ContractError, match="unknown function 'foo'"):
        RootSource(ZMUMU, "events", flat={"x": "foo(M)"}).load()


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("Jet_pt +", r"label = 'Jet_pt \+' is neither a branch.*nor a valid expression"),
        ("Jet_pt + Muon_pt > 0", r"label = 'Jet_pt \+ Muon_pt > 0' could not be evaluated"),
        ("Jet_pt", r"label = 'Jet_pt' gives float32 values; expected integer"),
        ("Jet_partonFlavour", r"label = 'Jet_partonFlavour' gives negative values"),
    ],
)
def test_bad_label(label: str, message: str) -> None:
    with pytest.raises(ContractError, match=message):
        RootSource(NANO, "Events", per_object="Jet", flat={"pt": "Jet_pt"}, label=label).load()


def test_jagged_branch_declared_flat() -> None:
    with pytest.raises(ContractError, match=r"'Jet_Px' is jagged.*`jagged`.*`per_object`"):
        RootSource(HZZ, "events", flat={"px": "Jet_Px"}).load()


def test_flat_branch_declared_jagged() -> None:
    with pytest.raises(ContractError, match=r"field jet.n = 'NJet' is not jagged"):
        RootSource(HZZ, "events", jagged={"jet": {"n": "NJet"}}).load()


def test_other_collection_in_per_object_mode() -> None:
    with pytest.raises(
        ContractError, match=r"'Muon_pt' has a different number.*another collection"
    ):
        RootSource(NANO, "Events", per_object="Jet", flat={"mu": "Muon_pt"}).load()


def test_unknown_per_object_prefix() -> None:
    with pytest.raises(
        ContractError, match=r"no jagged branch whose name starts with 'Jett_'.*'Jet'"
    ):
        RootSource(NANO, "Events", per_object="Jett", flat={"pt": "Jet_pt"}).load()


def test_selection_selecting_nothing() -> None:
    with pytest.raises(ContractError, match=r"selection = 'M < 0' keeps none of the 2304 rows"):
        RootSource(ZMUMU, "events", flat=["M"], selection="M < 0").load()


@pytest.mark.parametrize(
    ("selection", "message"),
    [("M", "gives float64 values; expected booleans"), ("Jet_Px > 0", "reduce it per event")],
)
def test_selection_of_wrong_kind(selection: str, message: str) -> None:
    path = ZMUMU if selection == "M" else HZZ
    with pytest.raises(ContractError, match=message):
        RootSource(
            path, "events", flat={"x": "M" if path == ZMUMU else "NJet"}, selection=selection
        ).load()


def test_fields_of_one_collection_with_different_counts() -> None:
    with pytest.raises(ContractError, match=r"collection 'jet' have different numbers of objects"):
        RootSource(HZZ, "events", jagged={"jet": {"px": "Jet_Px", "mu": "Muon_Px"}}).load()


def test_string_branch() -> None:
    with pytest.raises(ContractError, match=r"'Type' holds <U\d+ values; expected numbers"):
        RootSource(ZMUMU, "events", flat=["Type"]).load()


def test_bad_declarations_fail_at_construction() -> None:
    with pytest.raises(ContractError, match="declare at least one"):
        RootSource(ZMUMU, "events")
    with pytest.raises(ContractError, match="Attribute is not allowed"):
        RootSource(ZMUMU, "events", flat={"x": "M.__class__"})
