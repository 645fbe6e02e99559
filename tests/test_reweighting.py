"""Kinematic reweighting (project.data.reweighting) on tables with known spectra."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from project.contract import ContractError, Feature, InputContract
from project.data.columnar import ColumnarData
from project.data.reweighting import ReweightConfig, fit_reweighting

CONTRACT = InputContract(
    flat=(Feature("jet_pt", "log"), Feature("jet_eta"), Feature("jet_mass")),
    classes=("qcd", "top"),
)
PT_EDGES = [500.0, 550.0, 600.0, 700.0, 850.0, 1000.0]  # unequal widths on purpose


def spectra(n: int = 40_000, seed: int = 0, negative: float = 0.1) -> ColumnarData:
    """QCD falling steeply in pT, top nearly flat, different eta widths, some negative weights."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    pt = np.where(labels == 0, 500 + rng.exponential(120, n), rng.uniform(500, 1000, n))
    eta = np.where(labels == 0, rng.normal(0, 1.2, n), rng.normal(0, 0.8, n)).clip(-2.4, 2.4)
    weights = np.where(rng.random(n) < negative, -1.0, 1.0) * rng.uniform(0.5, 1.5, n)
    return ColumnarData(
        flat={
            "jet_pt": pt.astype(np.float32),
            "jet_eta": eta.astype(np.float32),
            "jet_mass": rng.uniform(20, 200, n).astype(np.float32),
        },
        labels=labels.astype(np.int64),
        weights=weights.astype(np.float32),
        source="spectra",
    )


def weighted_hist(data: ColumnarData, k: int, edges, name: str = "jet_pt") -> np.ndarray:
    mine = data.labels == k
    values = np.clip(data.flat[name][mine], edges[0], edges[-1])
    return np.histogram(values, bins=edges, weights=data.weights[mine].astype(np.float64))[0]


def test_pt_flat_makes_the_class_spectra_agree_bin_by_bin() -> None:
    train = spectra()
    fitted = fit_reweighting(
        train, CONTRACT, {"variables": ["jet_pt"], "bins": {"jet_pt": PT_EDGES}, "max_weight": 1e3}
    )
    out = fitted.apply(train)
    qcd, top = weighted_hist(out, 0, PT_EDGES), weighted_hist(out, 1, PT_EDGES)
    before = weighted_hist(train, 0, PT_EDGES) / weighted_hist(train, 1, PT_EDGES)
    assert np.ptp(before) > 1  # the spectra differed a lot
    np.testing.assert_allclose(qcd, top, rtol=0.05)
    # Flat per unit pT (not per bin): the contents follow the bin widths.
    widths = np.diff(PT_EDGES)
    np.testing.assert_allclose(qcd / widths, (qcd / widths).mean(), rtol=0.05)
    # Equal class totals, the training split's total weight shared out.
    assert qcd.sum() == pytest.approx(top.sum(), rel=1e-5)
    assert qcd.sum() + top.sum() == pytest.approx(
        float(train.weights.astype(np.float64).sum()), rel=1e-5
    )
    # Reweighting multiplies the event weights: the sign of each row stays.
    assert np.array_equal(np.sign(out.weights), np.sign(train.weights))
    # What was fitted is what is stored.
    np.testing.assert_allclose(
        np.asarray(fitted.to_dict()["histograms_after"]["qcd"]), qcd, rtol=1e-5
    )


def test_2d_reweighting_to_a_class_agrees_on_held_out_rows_within_errors() -> None:
    """Fitted on one sample, applied to another: the pT and eta marginals of qcd follow top's
    within the statistical error of the reweighted histogram."""
    bins = {"jet_pt": {"n": 10, "range": [500, 1000]}, "jet_eta": [-2.4, -1.2, -0.4, 0.4, 1.2, 2.4]}
    cfg = {"variables": ["jet_pt", "jet_eta"], "bins": bins, "target": "top", "max_weight": 50}
    fitted = fit_reweighting(spectra(seed=1, negative=0.0), CONTRACT, cfg)
    held_out = fitted.apply(spectra(seed=2, negative=0.0))
    for name, edges in (
        ("jet_pt", np.linspace(500, 1000, 11)),
        ("jet_eta", np.asarray(bins["jet_eta"])),
    ):
        qcd, top = weighted_hist(held_out, 0, edges, name), weighted_hist(held_out, 1, edges, name)
        mine = held_out.labels == 0
        w2 = np.histogram(
            np.clip(held_out.flat[name][mine], edges[0], edges[-1]),
            bins=edges,
            weights=held_out.weights[mine].astype(np.float64) ** 2,
        )[0]
        error = np.sqrt(w2 + np.histogram(held_out.flat[name][~mine], bins=edges)[0])
        assert np.all(np.abs(qcd - top) < 4 * error), (name, qcd, top, error)
    # The target class is left as it is, up to the common normalisation.
    factors = np.asarray(fitted.to_dict()["weights"]["top"])
    assert np.ptp(factors) < 1e-9 * factors.max()


def test_empty_bins_are_clipped_and_counted(caplog) -> None:
    train = spectra()
    # Bins below 500 GeV hold no jets: empty for both classes.
    edges = [300.0, 400.0, *PT_EDGES]
    with caplog.at_level(logging.INFO, logger="project.data.reweighting"):
        fitted = fit_reweighting(
            train, CONTRACT, {"variables": ["jet_pt"], "bins": {"jet_pt": edges}, "max_weight": 7}
        )
    assert fitted.empty == (2, 2)
    summary = fitted.to_dict()
    assert summary["empty_bins"] == {"qcd": 2, "top": 2}
    # QCD's tail above 1000 GeV is taken into the last bin, and counted.
    assert fitted.outside == (int(np.sum(train.flat["jet_pt"] > 1000)), 0)
    # The empty bins' factors are the clipped ratio (times the class's normalisation).
    factors = np.asarray(summary["weights"]["qcd"])
    assert factors[0] == factors[1] > 0
    assert "2 of 7 bins empty (clipped at max_weight=7)" in caplog.text
    out = fitted.apply(train)
    assert np.isfinite(out.weights).all()


def test_max_weight_clips_the_ratio() -> None:
    train = spectra()
    fitted = fit_reweighting(
        train,
        CONTRACT,
        {
            "variables": ["jet_pt"],
            "bins": {"jet_pt": PT_EDGES},
            "max_weight": 2.0,
            "normalise": "none",
        },
    )
    factors = np.asarray(fitted.to_dict()["weights"]["qcd"])
    assert factors.max() == pytest.approx(2.0)  # the high-pT QCD tail wanted far more
    assert sum(fitted.clipped) >= 1


def test_class_totals_normalisation_keeps_each_class_total() -> None:
    train = spectra()
    fitted = fit_reweighting(
        train,
        CONTRACT,
        {"variables": ["jet_pt"], "bins": {"jet_pt": PT_EDGES}, "normalise": "class_totals"},
    )
    out = fitted.apply(train)
    for k in (0, 1):
        mine = train.labels == k
        assert out.weights[mine].astype(np.float64).sum() == pytest.approx(
            train.weights[mine].astype(np.float64).sum(), rel=1e-5
        )


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (
            {"variables": ["jet_phi"], "bins": {"jet_phi": [0, 1]}},
            r"'jet_phi' is not a flat feature of the contract \(flat features: \['jet_pt', 'jet_eta', 'jet_mass'\]\)",
        ),
        ({"variables": ["jet_pt"]}, r"data\.reweight\.bins\.jet_pt is missing"),
        ({"variables": ["jet_pt"], "bins": {"jet_pt": [3, 2, 1]}}, r"strictly increasing"),
        (
            {"variables": ["jet_pt"], "bins": {"jet_pt": [1, 2]}, "target": "higgs"},
            r"target = 'higgs': give 'flat' or one of the classes \['qcd', 'top'\]",
        ),
        (
            {"variables": ["jet_pt"], "bins": {"jet_pt": [1, 2]}, "normalise": "sum"},
            r"normalise = 'sum': choose one of",
        ),
        (
            {"variables": ["jet_pt"], "bins": {"jet_pt": [1, 2]}, "mode": 1},
            r"unknown keys \['mode'\]",
        ),
        ({"variables": ["jet_pt"], "bins": {"jet_pt": {"n": 0, "range": [1, 2]}}}, r"\.n must be"),
    ],
)
def test_bad_reweighting_configs(cfg, message) -> None:
    with pytest.raises(ContractError, match=message):
        ReweightConfig.from_dict(cfg, CONTRACT)


def test_class_with_no_positive_weight_after_reweighting() -> None:
    train = spectra(n=2000)
    # Top's weights above 750 GeV are negative and dominate: its bins there hold no positive
    # weight (empty, clipped at max_weight), and its total after reweighting is negative.
    top = train.labels == 1
    high = train.flat["jet_pt"] > 750
    train.weights[top & ~high] = 0.01
    train.weights[top & high] = -1.0
    with pytest.raises(
        ContractError, match=r"class 'top' has total weight -?[\d.e+-]+ after reweighting"
    ):
        fit_reweighting(
            train,
            CONTRACT,
            {"variables": ["jet_pt"], "bins": {"jet_pt": PT_EDGES}, "max_weight": 1e3},
        )


def test_datamodule_reweights_the_training_split(repo_root) -> None:
    """Through the DataModule on toy jets with event weights: fitted on the training split,
    multiplying the event weights of train and val, the test split left alone, the fit kept
    in the hyperparameters that Lightning stores in the checkpoint."""
    from omegaconf import OmegaConf

    from project.data.datamodule import SoADataModule
    from project.data.sources.toy import ToyJetSource

    contract = OmegaConf.to_container(OmegaConf.load(repo_root / "configs/data/contract/jets.yaml"))
    contract["jagged"] = []
    edges = {"jet_pt": {"n": 8, "range": [550, 650]}, "jet_eta": [-2, -1, 0, 1, 2]}
    reweight = {"variables": ["jet_pt", "jet_eta"], "bins": edges, "max_weight": 100}

    def module(reweight):
        dm = SoADataModule(
            ToyJetSource(n_jets=3000, seed=4),
            contract,
            weight="gen_weight * xsec",
            reweight=reweight,
        )
        dm.setup()
        return dm

    plain, reweighted = module(None), module(reweight)
    pt_edges = np.linspace(550, 650, 9)
    for dm, agrees in ((plain, False), (reweighted, True)):
        train = dm.splits["train"]
        qcd, top = weighted_hist(train, 0, pt_edges), weighted_hist(train, 1, pt_edges)
        assert np.all(np.abs(qcd / top - 1) < 0.05) == agrees, (qcd, top)
    for name in ("train", "val", "test"):
        ratio = reweighted.splits[name].weights / plain.splits[name].weights
        assert np.allclose(ratio, 1.0) == (name == "test")
    stored = reweighted.hparams["reweighting"]
    assert stored["variables"] == ["jet_pt", "jet_eta"]
    assert np.asarray(stored["histograms_before"]["top"]).shape == (8, 4)
    assert reweighted.reweighting.config.splits == ("train", "val")


def test_datamodule_refuses_a_reweighting_variable_missing_from_the_contract() -> None:
    from project.data.datamodule import SoADataModule
    from project.data.sources.toy import ToyJetSource

    reweight = {"variables": ["jet_phi"], "bins": {"jet_phi": {"n": 4, "range": [-3.2, 3.2]}}}
    with pytest.raises(
        ContractError, match=r"data\.reweight\.variables: 'jet_phi' is not a flat feature"
    ):
        SoADataModule(ToyJetSource(n_jets=100), CONTRACT, reweight=reweight)
