"""The input contract: serialisation round trips, input names and dtypes, and its errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from project.contract import (
    SCHEMA_VERSION,
    ContractError,
    Feature,
    InputContract,
    JaggedCollection,
)

ROOT = Path(__file__).resolve().parents[1]


def make_contract(**overrides) -> InputContract:
    """Two flat columns and two jagged collections (one with a log field)."""
    kwargs = dict(
        flat=(Feature("jet_pt", "log"), Feature("jet_eta")),
        jagged=(
            JaggedCollection("part", 16, (Feature("deta"), Feature("pt", "log"))),
            JaggedCollection("trk", 4, (Feature("d0"),)),
        ),
        classes=("qcd", "top", "w"),
    )
    kwargs.update(overrides)
    return InputContract(**kwargs)


def fitted_contract() -> InputContract:
    return make_contract().with_constants(
        {"jet_pt": (6.3, 0.05), "jet_eta": (0.01, 1.2)},
        {"part": {"deta": (0.0, 0.3), "pt": (2.5, 1.5)}, "trk": {"d0": (-0.1, 0.02)}},
    )


# --- round trips -----------------------------------------------------------------------------
def test_dict_round_trip_keeps_everything() -> None:
    contract = fitted_contract()
    d = contract.to_dict()
    assert d["schema_version"] == SCHEMA_VERSION
    back = InputContract.from_dict(d)
    assert back == contract
    assert back.fitted
    # Each field's source expression is written out: <collection>_<field> by default.
    assert back.jagged[0].fields[1] == Feature("pt", "log", 2.5, 1.5, expr="part_pt")
    assert d["flat"][0]["expr"] == "jet_pt"
    assert back.outputs == ("prob_qcd", "prob_top", "prob_w")
    # A plain dict survives json (what checkpoints and manifests hold) unchanged.
    assert json.loads(json.dumps(d)) == d


def test_json_round_trip_via_string_and_file(tmp_path: Path) -> None:
    contract = fitted_contract()
    text = contract.to_json()
    assert InputContract.from_json(text) == contract
    assert InputContract.from_json("  \n" + text) == contract  # leading whitespace
    path = tmp_path / "contract.json"
    assert contract.to_json(path) == text
    assert json.loads(path.read_text()) == contract.to_dict()
    assert InputContract.from_json(path) == contract
    assert InputContract.from_json(str(path)) == contract


def test_unfitted_round_trip_and_bare_names() -> None:
    contract = InputContract.from_dict(
        {"flat": ["a", {"name": "b", "transform": "log"}], "classes": ["x", "y"]}
    )
    assert contract.flat == (Feature("a", expr="a"), Feature("b", "log", expr="b"))
    assert not contract.fitted
    assert InputContract.from_json(contract.to_json()) == contract
    assert InputContract.from_dict(contract) is contract


def test_omegaconf_container_and_repo_contract() -> None:
    """The contract as written in the data config builds and round-trips."""
    cfg = OmegaConf.load(ROOT / "configs" / "data" / "contract" / "jets.yaml")
    contract = InputContract.from_dict(OmegaConf.to_container(cfg, resolve=True))
    assert contract.classes == ("qcd", "top")
    assert contract.input_names[0] == "jet_pt"
    assert "part_offsets" in contract.input_names
    assert InputContract.from_dict(json.loads(contract.to_json())) == contract


def test_with_constants_sets_every_feature() -> None:
    contract = make_contract()
    assert not contract.fitted
    fitted = fitted_contract()
    assert fitted.fitted
    assert fitted.flat[0].mean == pytest.approx(6.3)
    assert fitted.flat[0].scale == pytest.approx(0.05)
    assert fitted.jagged[1].fields[0].mean == pytest.approx(-0.1)
    # The original is frozen and untouched.
    assert contract.flat[0].mean is None


# --- names, dtypes, dims --------------------------------------------------------------------
def test_input_names_and_dtypes_order() -> None:
    contract = make_contract()
    expected = [
        "jet_pt", "jet_eta",
        "part_offsets", "part_deta", "part_pt",
        "trk_offsets", "trk_d0",
    ]  # fmt: skip
    assert contract.input_names == expected
    dtypes = contract.input_dtypes
    assert list(dtypes) == expected
    assert dtypes == {
        "jet_pt": "float32", "jet_eta": "float32",
        "part_offsets": "int64", "part_deta": "float32", "part_pt": "float32",
        "trk_offsets": "int64", "trk_d0": "float32",
    }  # fmt: skip
    assert contract.model_dims() == {
        "n_flat": 2,
        "n_fields": [2, 1],
        "max_lengths": [16, 4],
        "n_outputs": 3,
    }


def test_flat_only_and_jagged_only_names() -> None:
    flat_only = InputContract(flat=(Feature("a"),))
    assert flat_only.input_names == ["a"]
    assert flat_only.outputs == ("prob_background", "prob_signal")
    jagged_only = InputContract(jagged=(JaggedCollection("c", 3, (Feature("x"),)),))
    assert jagged_only.input_names == ["c_offsets", "c_x"]
    assert jagged_only.model_dims()["n_flat"] == 0


# --- errors ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"flat": (Feature("a"), Feature("a"))}, "collide"),
        # flat column "part_x" collides with field x of collection part
        (
            {
                "flat": (Feature("part_x"),),
                "jagged": (JaggedCollection("part", 4, (Feature("x"),)),),
            },
            r"collide: \['part_x'\]",
        ),
        # a flat column named like a collection's offsets
        (
            {
                "flat": (Feature("part_offsets"),),
                "jagged": (JaggedCollection("part", 4, (Feature("x"),)),),
            },
            "part_offsets",
        ),
        ({"flat": (Feature("a"),), "classes": ("only",)}, "at least two classes"),
        ({"flat": (Feature("a"),), "classes": ("a", "b"), "outputs": ("p",)}, "1 output names"),
        ({"flat": (Feature("a"),), "outputs": ("p a", "q")}, "not a valid identifier"),
        ({}, "no flat columns and no jagged"),
    ],
)
def test_contract_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(ContractError, match=match):
        InputContract(**kwargs)


@pytest.mark.parametrize("name", ["jet-pt", "1st", "class", "a b", ""])
def test_non_identifier_names(name: str) -> None:
    with pytest.raises(ContractError, match="not a valid identifier"):
        Feature(name)
    with pytest.raises(ContractError, match="not a valid identifier"):
        JaggedCollection(name, 4, (Feature("x"),))


def test_feature_and_collection_errors() -> None:
    with pytest.raises(ContractError, match="unknown transform 'sqrt'"):
        Feature("a", "sqrt")
    with pytest.raises(ContractError, match="scale must be finite and > 0"):
        Feature("a", mean=0.0, scale=0.0)
    with pytest.raises(ContractError, match="scale must be finite"):
        Feature("a", mean=0.0, scale=float("nan"))
    with pytest.raises(ContractError, match="max_length must be >= 1"):
        JaggedCollection("c", 0, (Feature("x"),))
    with pytest.raises(ContractError, match="has no fields"):
        JaggedCollection("c", 4, ())


def test_unknown_keys_are_refused() -> None:
    good = make_contract().to_dict()
    with pytest.raises(ContractError, match=r"unknown contract keys \['flats'\]"):
        InputContract.from_dict({**good, "flats": []})
    bad_feature = json.loads(json.dumps(good))
    bad_feature["flat"][0]["tranform"] = "log"
    with pytest.raises(ContractError, match=r"feature 'jet_pt': unknown keys \['tranform'\]"):
        InputContract.from_dict(bad_feature)
    bad_coll = json.loads(json.dumps(good))
    bad_coll["jagged"][1]["maxlen"] = 3
    with pytest.raises(ContractError, match=r"collection 'trk': unknown keys \['maxlen'\]"):
        InputContract.from_dict(bad_coll)
    bad_transform = json.loads(json.dumps(good))
    bad_transform["jagged"][0]["fields"][0]["transform"] = "exp"
    with pytest.raises(ContractError, match="unknown transform 'exp'"):
        InputContract.from_dict(bad_transform)


def test_schema_version_mismatch() -> None:
    d = make_contract().to_dict()
    d["schema_version"] = SCHEMA_VERSION + 1
    with pytest.raises(
        ContractError, match=f"schema version {SCHEMA_VERSION + 1} is not supported"
    ):
        InputContract.from_dict(d)
    with pytest.raises(ContractError, match="schema version"):
        InputContract.from_json(json.dumps(d))


def test_dict_errors_for_classes_and_outputs() -> None:
    d = make_contract().to_dict()
    with pytest.raises(ContractError, match="at least two classes"):
        InputContract.from_dict({**d, "classes": ["one"], "outputs": []})
    with pytest.raises(ContractError, match="2 output names for 3 classes"):
        InputContract.from_dict({**d, "outputs": ["a", "b"]})
