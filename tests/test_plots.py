"""The evaluation plots: drawn from the weighted numbers of project.training.metrics."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from project.contract import Feature, InputContract
from project.data.columnar import ColumnarData
from project.data.reweighting import fit_reweighting
from project.training.metrics import weighted_roc
from project.training.plots import (
    evaluation_figures,
    reweighting_figure,
    save_figures,
    style,
    working_point_cut,
)

PNG = b"\x89PNG\r\n\x1a\n"


def _record(n: int = 3000, classes: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    logits = rng.normal(0, 1, (n, classes)) + 1.5 * np.eye(classes)[labels]
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    truth = np.where(labels == 1, rng.normal(172, 20, n), rng.lognormal(4.2, 0.4, n))
    pt = 550 + rng.exponential(60, n)
    pred = truth * rng.normal(1.0, 0.05, n) * (1 + 0.0002 * (pt - 600))
    weights = np.where(rng.random(n) < 0.1, -1.0, 1.0) * rng.uniform(0.5, 2.0, n)
    return {
        "outputs": np.column_stack([probs, pred]),
        "labels": labels,
        "weights": weights,
        "targets": truth[:, None],
        "jet_pt": pt,
    }


def test_binary_and_regression_figures_are_written(tmp_path: Path) -> None:
    record = _record()
    figures = evaluation_figures(record, ["qcd", "top"], ["mass"], "jet_pt", 0.5, "CMS")
    assert set(figures) == {"roc", "scores", "efficiency_vs_pt", "regression_mass"}
    with style("CMS"):
        paths = save_figures(figures, tmp_path)
    for path in paths:
        assert path.parent == tmp_path / "plots"
        assert path.read_bytes()[:8] == PNG
        assert path.stat().st_size > 10_000  # drawn, not blank
    assert not list((tmp_path / "plots").glob(".*.tmp"))  # no temporary file left behind


def test_rejection_curve_is_the_weighted_roc() -> None:
    record = _record()
    probs, labels, weights = record["outputs"][:, :2], record["labels"], record["weights"]
    fig = evaluation_figures(record, ["qcd", "top"], ["mass"])["roc"]
    curve = fig.axes[0].lines[0]
    tpr, fpr, _ = weighted_roc(probs[:, 1], labels == 1, weights)
    keep = (fpr > 0) & (tpr > 0)
    np.testing.assert_allclose(curve.get_xdata(), tpr[keep])
    np.testing.assert_allclose(curve.get_ydata(), 1 / fpr[keep])
    plain_tpr, _, _ = weighted_roc(probs[:, 1], labels == 1)
    assert len(plain_tpr) != len(tpr[keep]) or not np.allclose(plain_tpr, tpr[keep])
    assert "AUC" in curve.get_label()


def test_score_histograms_are_weighted_and_normalised() -> None:
    record = _record()
    fig = evaluation_figures(record, ["qcd", "top"], [])["scores"]
    steps = fig.axes[0].patches
    assert len(steps) == 2  # one per true class
    for k, step in enumerate(steps):
        values, edges, _ = step.get_data()
        assert np.sum(values * np.diff(edges)) == pytest.approx(1.0)
        mine = record["labels"] == k
        counts, _ = np.histogram(record["outputs"][mine, 1], edges, weights=record["weights"][mine])
        np.testing.assert_allclose(values, counts / (counts.sum() * np.diff(edges)))


def test_efficiency_vs_pt_at_the_working_point() -> None:
    record = _record(n=6000)
    probs, labels, weights = record["outputs"][:, :2], record["labels"], record["weights"]
    fig = evaluation_figures(record, ["qcd", "top"], [], "jet_pt", working_point=0.7)[
        "efficiency_vs_pt"
    ]
    signal = labels == 1
    cut = working_point_cut(probs[signal, 1], weights[signal], 0.7)
    overall = np.sum(weights[signal] * (probs[signal, 1] >= cut)) / weights[signal].sum()
    assert overall == pytest.approx(0.7, abs=0.01)
    efficiency = fig.axes[0].containers[0].lines[0].get_ydata()
    assert len(efficiency) == 8
    assert np.all(np.abs(efficiency - 0.7) < 0.1)
    rejection = fig.axes[1].containers[0].lines[0].get_ydata()
    assert np.all(rejection > 1)


def test_multiclass_figures_have_a_panel_per_signal_class() -> None:
    record = _record(classes=3)
    record["outputs"] = record["outputs"][:, :3]
    figures = evaluation_figures(record, ["qcd", "top", "w"], [], "jet_pt")
    assert len(figures["roc"].axes) == 3
    assert [len(ax.lines) for ax in figures["roc"].axes] == [3, 3, 3]  # two backgrounds + random


def test_regression_figure_without_pt() -> None:
    record = _record()
    fig = evaluation_figures(record, ["qcd", "top"], ["mass"], pt_variable=None)["regression_mass"]
    assert len(fig.axes) == 2  # response and resolution against the truth only
    response = fig.axes[0].containers[0].lines[0].get_ydata()
    assert np.all(np.abs(response - 1) < 0.05)


def test_reweighting_figure_shows_the_classes_agreeing_after() -> None:
    rng = np.random.default_rng(1)
    n = 20_000
    labels = rng.integers(0, 2, n)
    pt = np.where(labels == 0, 500 + rng.exponential(100, n), rng.uniform(500, 900, n))
    data = ColumnarData(flat={"jet_pt": pt.astype(np.float32)}, labels=labels)
    contract = InputContract(flat=(Feature("jet_pt"),), classes=("qcd", "top"))
    cfg = {
        "variables": ["jet_pt"],
        "bins": {"jet_pt": {"n": 8, "range": [500, 900]}},
        "max_weight": 100,
    }
    fig = reweighting_figure(fit_reweighting(data, contract, cfg).to_dict())
    before, after = fig.axes
    qcd, top = (p.get_data().values for p in before.patches)
    assert np.ptp(qcd / top) > 1
    qcd, top, target = (p.get_data().values for p in after.patches)
    np.testing.assert_allclose(qcd, top, rtol=1e-6)
    np.testing.assert_allclose(qcd, target, rtol=1e-6)
