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
from project.data.expressions import MissingFileError
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
def test_per_event_flat_zmumu(read_table) -> None:
    data = read_table(RootSource(ZMUMU, "events"), flat=["M", "px1"], label="Q1 > 0")
    ref = branches(ZMUMU, "events", ["M", "px1", "Q1"])
    assert len(data) == 2304
    assert data.source == f"{ZMUMU}:events"
    np.testing.assert_array_equal(data.flat["M"], np.float32(ak.to_numpy(ref.M)))
    np.testing.assert_array_equal(data.flat["px1"], np.float32(ak.to_numpy(ref.px1)))
    assert data.labels.dtype == np.int64
    np.testing.assert_array_equal(data.labels, ak.to_numpy(ref.Q1 > 0).astype(np.int64))


def test_expressions_are_elementwise(read_table) -> None:
    data = read_table(
        RootSource(ZMUMU, "events"),
        flat={"pt": "hypot(px1, py1)", "m": "M"},
        selection="M > 80 and not M >= 100",
    )
    chained = read_table(RootSource(ZMUMU, "events"), flat={"m": "M"}, selection="80 < M < 100")
    ref = branches(ZMUMU, "events", ["px1", "py1", "M"])
    keep = ak.to_numpy((ref.M > 80) & (ref.M < 100))
    assert 0 < len(data) == keep.sum() == len(chained)
    pt = np.hypot(ak.to_numpy(ref.px1), ak.to_numpy(ref.py1))[keep]
    np.testing.assert_array_equal(data.flat["pt"], np.float32(pt))
    np.testing.assert_array_equal(data.flat["m"], np.float32(chained.flat["m"]))


def test_per_event_jagged_hzz(read_table) -> None:
    data = read_table(
        RootSource(HZZ, "events"),
        flat={"met": "hypot(MET_px, MET_py)"},
        jagged={
            "jet": {"px": "Jet_Px", "e": "Jet_E", "pt": "hypot(Jet_Px, Jet_Py)"},
            "Muon": ["E"],
        },
        label="NMuon >= 2",
    )
    ref = branches(HZZ, "events", ["NJet", "Jet_Px", "Jet_Py", "Jet_E", "Muon_E", "NMuon"])
    jet = data.jagged["jet"]
    assert len(data) == 2421
    np.testing.assert_array_equal(jet.offsets, np.concatenate([[0], np.cumsum(ref.NJet)]))
    np.testing.assert_array_equal(jet.fields["px"], np.float32(ak.to_numpy(ak.flatten(ref.Jet_Px))))
    np.testing.assert_array_equal(jet.fields["e"], np.float32(ak.to_numpy(ak.flatten(ref.Jet_E))))
    pt = np.hypot(ak.to_numpy(ak.flatten(ref.Jet_Px)), ak.to_numpy(ak.flatten(ref.Jet_Py)))
    np.testing.assert_allclose(jet.fields["pt"], pt, rtol=1e-6)
    # The list form names fields: {Muon: [E]} reads the branch Muon_E.
    np.testing.assert_array_equal(data.jagged["Muon"].counts, ak.to_numpy(ref.NMuon))
    np.testing.assert_array_equal(data.labels, ak.to_numpy(ref.NMuon >= 2))


def test_chunked_reading_matches_one_chunk(read_table) -> None:
    kwargs = dict(flat=["MET_px"], jagged={"jet": {"px": "Jet_Px"}}, selection="NJet >= 1")
    whole = read_table(RootSource(HZZ, "events"), **kwargs)
    chunked = read_table(RootSource(HZZ, "events", step_size=100), **kwargs)
    np.testing.assert_array_equal(whole.flat["MET_px"], np.float32(chunked.flat["MET_px"]))
    np.testing.assert_array_equal(whole.jagged["jet"].offsets, chunked.jagged["jet"].offsets)
    np.testing.assert_array_equal(
        whole.jagged["jet"].fields["px"], chunked.jagged["jet"].fields["px"]
    )


def test_per_object_nanoaod_one_row_per_jet(read_table) -> None:
    data = read_table(
        RootSource(NANO, "Events"),
        per_object="Jet",
        flat={"pt": "Jet_pt", "csv": "Jet_btagCSVV2", "met": "MET_pt", "n": "nJet"},
        label="abs(Jet_hadronFlavour) == 5",
    )
    ref = branches(
        NANO, "Events", ["nJet", "Jet_pt", "Jet_btagCSVV2", "MET_pt", "Jet_hadronFlavour"]
    )
    n_jet = ak.to_numpy(ref.nJet)
    assert len(data) == n_jet.sum() == 537
    np.testing.assert_array_equal(data.flat["pt"], np.float32(ak.to_numpy(ak.flatten(ref.Jet_pt))))
    np.testing.assert_array_equal(
        data.flat["csv"], np.float32(ak.to_numpy(ak.flatten(ref.Jet_btagCSVV2)))
    )
    # Event-level branches are repeated for each jet of their event.
    np.testing.assert_array_equal(
        data.flat["met"], np.float32(np.repeat(ak.to_numpy(ref.MET_pt), n_jet))
    )
    np.testing.assert_array_equal(data.flat["n"], np.float32(np.repeat(n_jet, n_jet)))
    flavour = ak.to_numpy(ak.flatten(ref.Jet_hadronFlavour))
    np.testing.assert_array_equal(data.labels, (np.abs(flavour) == 5).astype(np.int64))
    assert data.labels.sum() == 6


def test_per_object_selection(read_table) -> None:
    ref = branches(NANO, "Events", ["nJet", "Jet_pt", "Jet_eta"])
    pt = ak.to_numpy(ak.flatten(ref.Jet_pt))
    eta = ak.to_numpy(ak.flatten(ref.Jet_eta))
    n_event = np.repeat(ak.to_numpy(ref.nJet), ak.to_numpy(ref.nJet))
    data = read_table(RootSource(NANO, "Events"), per_object="Jet", flat={"pt": "Jet_pt"}, selection="Jet_pt > 30 and abs(Jet_eta) < 2.4 and nJet >= 3")  # fmt: skip
    keep = (pt > 30) & (np.abs(eta) < 2.4) & (n_event >= 3)
    assert 0 < len(data) == keep.sum() < 537
    np.testing.assert_array_equal(data.flat["pt"], np.float32(pt[keep]))


def test_per_object_rows_carry_their_events_collections(read_table) -> None:
    data = read_table(
        RootSource(NANO, "Events"),
        per_object="Jet",
        flat={"pt": "Jet_pt"},
        jagged={"muon": {"pt": "Muon_pt"}},
    )
    ref = branches(NANO, "Events", ["nJet", "nMuon", "Muon_pt"])
    n_jet = ak.to_numpy(ref.nJet)
    np.testing.assert_array_equal(
        data.jagged["muon"].counts, np.repeat(ak.to_numpy(ref.nMuon), n_jet)
    )
    first_jet = np.concatenate([[0], np.cumsum(n_jet)[:-1]])[n_jet > 0]
    muons = data.take(first_jet).jagged["muon"].fields["pt"]
    np.testing.assert_array_equal(muons, ak.to_numpy(ak.flatten(ref.Muon_pt[n_jet > 0])))


def test_multiple_files_are_concatenated(read_table) -> None:
    one = read_table(RootSource(ZMUMU, "events"), flat=["M"], label="Q1 > 0")
    two = read_table(RootSource([ZMUMU, ZMUMU], "events"), flat=["M"], label="Q1 > 0")
    assert len(two) == 2 * len(one)
    np.testing.assert_array_equal(two.flat["M"], np.float32(np.concatenate([one.flat["M"]] * 2)))
    np.testing.assert_array_equal(two.labels, np.concatenate([one.labels] * 2))
    assert "+1 more" in two.source
    globbed = read_table(RootSource(str(SHARED / "uproot-Zm*.root"), "events"), flat=["M"])
    assert len(globbed) == len(one)


def test_reduction_selection_per_event(read_table) -> None:
    data = read_table(RootSource(HZZ, "events"), flat=["NJet"], selection="any(Jet_Px > 0)")
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
def test_missing_file(read_table) -> None:
    with pytest.raises(MissingFileError, match=r"nope\.root' does not exist.*paths") as info:
        read_table(RootSource([ZMUMU, "nope.root"], "events"), flat=["M"])
    assert isinstance(info.value, FileNotFoundError)


def test_not_a_root_file(tmp_path: Path, read_table) -> None:
    bad = tmp_path / "bad.root"
    bad.write_text("not root")
    with pytest.raises(ContractError, match=r"bad\.root is not a readable ROOT file"):
        read_table(RootSource(str(bad), "events"), flat=["M"])


def test_missing_tree_lists_trees(read_table) -> None:
    with pytest.raises(ContractError, match=r"no TTree named 'Evts'.*\['Events'\]"):
        read_table(RootSource(NANO, "Evts"), flat=["nJet"])


def test_missing_branch_lists_close_matches(read_table) -> None:
    with pytest.raises(ContractError, match=r"branch 'Jet_ptt' does not exist.*'Jet_pt'"):
        read_table(RootSource(NANO, "Events"), per_object="Jet", flat={"pt": "Jet_ptt"})


def test_unknown_function(read_table) -> None:
    with pytest.raises(ContractError, match="unknown function 'foo'"):
        read_table(RootSource(ZMUMU, "events"), flat={"x": "foo(M)"})


@pytest.mark.parametrize(
    ("label", "message"),
    [
        ("Jet_pt +", r"label = 'Jet_pt \+' is neither a branch.*nor a valid expression"),
        ("Jet_pt + Muon_pt > 0", r"label = 'Jet_pt \+ Muon_pt > 0' could not be evaluated"),
        ("Jet_pt", r"label = 'Jet_pt' gives float32 values; expected integer"),
        ("Jet_partonFlavour", r"label = 'Jet_partonFlavour' gives negative values"),
    ],
)
def test_bad_label(label: str, message: str, read_table) -> None:
    with pytest.raises(ContractError, match=message):
        read_table(RootSource(NANO, "Events"), per_object="Jet", flat={"pt": "Jet_pt"}, label=label)


def test_jagged_branch_declared_flat(read_table) -> None:
    with pytest.raises(ContractError, match=r"'Jet_Px' is jagged.*`jagged`.*`per_object`"):
        read_table(RootSource(HZZ, "events"), flat={"px": "Jet_Px"})


def test_flat_branch_declared_jagged(read_table) -> None:
    with pytest.raises(ContractError, match=r"field jet.n = 'NJet' is not jagged"):
        read_table(RootSource(HZZ, "events"), jagged={"jet": {"n": "NJet"}})


def test_other_collection_in_per_object_mode(read_table) -> None:
    with pytest.raises(
        ContractError, match=r"'Muon_pt' has a different number.*another collection"
    ):
        read_table(RootSource(NANO, "Events"), per_object="Jet", flat={"mu": "Muon_pt"})


def test_unknown_per_object_prefix(read_table) -> None:
    with pytest.raises(
        ContractError, match=r"no jagged branch whose name starts with 'Jett_'.*'Jet'"
    ):
        read_table(RootSource(NANO, "Events"), per_object="Jett", flat={"pt": "Jet_pt"})


def test_selection_selecting_nothing(read_table) -> None:
    with pytest.raises(ContractError, match=r"selection = 'M < 0' keeps none of the 2304 rows"):
        read_table(RootSource(ZMUMU, "events"), flat=["M"], selection="M < 0")


@pytest.mark.parametrize(
    ("selection", "message"),
    [("M", "gives float64 values; expected booleans"), ("Jet_Px > 0", "reduce it per event")],
)
def test_selection_of_wrong_kind(selection: str, message: str, read_table) -> None:
    path = ZMUMU if selection == "M" else HZZ
    with pytest.raises(ContractError, match=message):
        read_table(
            RootSource(path, "events"),
            flat={"x": "M" if path == ZMUMU else "NJet"},
            selection=selection,
        )


def test_fields_of_one_collection_with_different_counts(read_table) -> None:
    with pytest.raises(ContractError, match=r"collection 'jet' have different numbers of objects"):
        read_table(RootSource(HZZ, "events"), jagged={"jet": {"px": "Jet_Px", "mu": "Muon_Px"}})


def test_string_branch(read_table) -> None:
    with pytest.raises(ContractError, match=r"'Type' holds <U\d+ values; expected numbers"):
        read_table(RootSource(ZMUMU, "events"), flat=["Type"])


def test_bad_declarations_fail_before_reading(read_table, contract_of) -> None:
    with pytest.raises(ContractError, match="no flat columns and no jagged collections"):
        contract_of()
    with pytest.raises(ContractError, match="Attribute is not allowed"):
        read_table(RootSource(ZMUMU, "events"), flat={"x": "M.__class__"})


def test_declared_counts_are_checked(read_table) -> None:
    """A collection's counts column must agree with its fields' object numbers."""
    from project.contract import Feature, InputContract, JaggedCollection
    from project.data.expressions import TableSpec
    from project.data.sources import load

    def read(counts: str) -> object:
        jet = JaggedCollection("jet", 4, (Feature("px", expr="Jet_Px"),), counts=counts)
        contract = InputContract(flat=(Feature("n", expr="NJet"),), jagged=(jet,))
        return load(RootSource(HZZ, "events"), TableSpec(contract, labels=False))

    ref = branches(HZZ, "events", ["NJet"])
    np.testing.assert_array_equal(read("NJet").jagged["jet"].counts, ak.to_numpy(ref.NJet))
    with pytest.raises(ContractError, match=r"counts = 'NMuon' of collection 'jet' does not match"):
        read("NMuon")


@pytest.mark.filterwarnings("ignore:invalid value encountered in log")
def test_non_finite_values_are_named_or_dropped(read_table) -> None:
    """A NaN feature names the file, the column and the count; nan_policy=drop drops the rows."""
    expr = "where(M > 100, log(M - 200), M)"  # NaN where 100 < M < 200
    ref = ak.to_numpy(branches(ZMUMU, "events", ["M"]).M)
    n_bad = int(np.sum((ref > 100) & (ref < 200)))
    assert n_bad > 0
    with pytest.raises(
        ContractError,
        match=rf"uproot-Zmumu.root:events \(entries 0-2304\): flat column 'x' has {n_bad} NaN",
    ):
        read_table(RootSource(ZMUMU, "events"), flat={"x": expr})
    data = read_table(RootSource(ZMUMU, "events"), flat={"x": expr}, nan_policy="drop")
    assert len(data) == len(ref) - n_bad
    assert data.dropped == n_bad
    assert np.isfinite(data.flat["x"]).all()


def test_boolean_feature_needs_declaring(read_table) -> None:
    with pytest.raises(
        ContractError, match=r"gives booleans: declare the feature with `boolean: true`"
    ):
        read_table(RootSource(ZMUMU, "events"), flat={"positive": "Q1 > 0"})


def test_corrupt_basket_names_file_and_entries(tmp_path: Path, read_table) -> None:
    """A ROOT file whose compressed basket is damaged: the error names the file and the
    entry range instead of a bare zlib error."""
    damaged = tmp_path / "damaged.root"
    payload = bytearray(Path(ZMUMU).read_bytes())
    with uproot.open(ZMUMU) as f:
        branch = f["events"]["M"]
        start = branch.member("fBasketSeek")[0]
    # Flip bytes inside the first basket's compressed payload (past its key header).
    for i in range(start + 120, start + 160):
        payload[i] ^= 0xFF
    damaged.write_bytes(bytes(payload))
    with pytest.raises(
        ContractError, match=r"damaged\.root:events \(entries 0-\d+\) cannot be read"
    ):
        read_table(RootSource(str(damaged), "events"), flat=["M"])
