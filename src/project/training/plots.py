"""Evaluation plots in the field's idiom, drawn with mplhep's style, as PNG and figures.

- ``roc``: background rejection (1 / background efficiency, log scale) against signal
  efficiency, one curve per background class;
- ``scores``: each class's distribution of the signal probability (weighted, normalised);
- ``efficiency_vs_pt``: signal efficiency and background rejection in bins of jet pT at a
  fixed signal-efficiency working point;
- ``regression_<target>``: response (median of prediction / truth) and resolution (half the
  16-84% interval) against the true value and against pT;
- ``reweighting``: each class's spectra in the reweighting variables before and after.

Every figure counts rows by their weights and takes its numbers from
``project.training.metrics`` (the logged AUC and the plotted curve are one computation). An
experiment label (``CMS``, ``ATLAS``, ...) is optional; with one, the figures take that
experiment's mplhep style, without one ROOT's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # runs on headless batch nodes
import matplotlib.pyplot as plt
import mplhep as hep
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from project.training.metrics import (
    regression_summary,
    response_resolution,
    weighted_auc,
    weighted_quantile,
    weighted_roc,
)
from project.utils import atomic_path

STYLES = {"CMS": "CMS", "ATLAS": "ATLAS", "LHCb": "LHCb2", "ALICE": "ALICE"}
SCORE_BINS = 40
VARIABLE_BINS = 8  # equal-population bins of pT and of a regression target
# Inches per panel: mplhep's styles are drawn for 10 x 10 inch figures (fonts ~ 26 pt).
PANEL = (9.0, 8.0)


@contextlib.contextmanager
def style(experiment: str | None = None) -> Iterator[None]:
    """mplhep's style of ``experiment`` (one of ``STYLES``), else ROOT's, for the block."""
    name = STYLES.get(experiment or "", "ROOT")
    with plt.style.context(getattr(hep.style, name)):
        yield


def label(ax: Axes, experiment: str | None, text: str = "Simulation") -> None:
    """The experiment label (``CMS Simulation``) on ``ax``, if an experiment is given."""
    if experiment:
        hep.label.exp_label(exp=experiment, llabel=text, data=False, ax=ax, fontsize="small")


def _figure(n_rows: int, n_cols: int) -> tuple[Figure, np.ndarray]:
    fig, axes = plt.subplots(
        n_rows, n_cols, figsize=(PANEL[0] * n_cols, PANEL[1] * n_rows), squeeze=False
    )
    return fig, axes


def signal_classes(classes: Sequence[str]) -> list[int]:
    """The classes taken as signal: the second of two, every class of more."""
    return [1] if len(classes) == 2 else list(range(len(classes)))


def rejection_figure(
    probs: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray,
    classes: Sequence[str],
    experiment: str | None = None,
) -> Figure:
    """Background rejection against signal efficiency, per signal class a panel and per
    background class a curve (rows of the signal and that background class only, scored by
    the signal probability); the dashed line is a random guess (rejection 1 / efficiency).

    ``probs`` ``(n, n_classes)``, ``labels`` ``(n,)``, ``weights`` ``(n,)``.
    """
    signals = signal_classes(classes)
    with style(experiment):
        fig, axes = _figure(1, len(signals))
        for ax, s in zip(axes[0], signals, strict=True):
            for b in range(len(classes)):
                if b == s:
                    continue
                pair = (labels == s) | (labels == b)
                tpr, fpr, _ = weighted_roc(probs[pair, s], labels[pair] == s, weights[pair])
                auc = weighted_auc(probs[pair, s], labels[pair] == s, weights[pair])
                keep = (fpr > 0) & (tpr > 0)
                ax.plot(tpr[keep], 1.0 / fpr[keep], label=f"{classes[b]} (AUC = {auc:.3f})")
            eff = np.linspace(0.01, 1, 100)
            ax.plot(eff, 1.0 / eff, "k--", lw=1, label="random")
            ax.set(xlabel=f"{classes[s]} efficiency", ylabel="background rejection", yscale="log")
            ax.set_xlim(0, 1)
            ax.legend(
                title=f"{classes[s]} vs",
                loc="upper right",
                fontsize="small",
                title_fontsize="small",
            )
            label(ax, experiment)
        fig.tight_layout()
    return fig


def _density(values: np.ndarray, weights: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """The weighted histogram per unit of the variable, integrating to 1."""
    counts, _ = np.histogram(values, bins=edges, weights=weights)
    total = counts.sum()
    return counts / (total * np.diff(edges)) if total > 0 else counts * 0.0


def score_figure(
    probs: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray,
    classes: Sequence[str],
    experiment: str | None = None,
) -> Figure:
    """Per signal class, the distribution of its probability for the rows of each true
    class, weighted and normalised to unit area (log scale)."""
    signals = signal_classes(classes)
    edges = np.linspace(0.0, 1.0, SCORE_BINS + 1)
    with style(experiment):
        fig, axes = _figure(1, len(signals))
        for ax, s in zip(axes[0], signals, strict=True):
            for k, name in enumerate(classes):
                mine = labels == k
                h = _density(probs[mine, s], weights[mine], edges)
                hep.histplot(h, edges, ax=ax, label=f"true {name}", lw=2)
            ax.set(xlabel=f"p({classes[s]})", ylabel="normalised (weighted)", yscale="log")
            ax.set_xlim(0, 1)
            ax.legend(fontsize="small")
            label(ax, experiment)
        fig.tight_layout()
    return fig


def _edges(values: np.ndarray, n_bins: int = VARIABLE_BINS) -> np.ndarray:
    """Equal-population bin edges of ``values`` (fewer where values repeat)."""
    return np.unique(np.quantile(values, np.linspace(0.0, 1.0, n_bins + 1)))


def _fraction(passed: np.ndarray, weights: np.ndarray) -> tuple[float, float, float]:
    """Weighted fraction of ``passed``, its binomial error, and the effective number of rows
    ``(sum w)^2 / sum w^2`` the error is computed with."""
    total = weights.sum()
    if not total > 0:
        return np.nan, np.nan, np.nan
    eff = float(np.sum(weights * passed) / total)
    n_eff = float(total**2 / np.sum(weights**2))
    return eff, float(np.sqrt(max(eff * (1 - eff), 0.0) / n_eff)), n_eff


def _rejection(
    eff: np.ndarray, err: np.ndarray, n_eff: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rejection ``1 / eff`` with its asymmetric interval ``1 / (eff +- err)`` (open above,
    drawn to ten times the value, where ``eff - err <= 0``), NaN where nothing passed; and
    there the 68% lower limit ``1 / (1 - 0.32^(1 / n_eff))`` (no passing row in ``n_eff``)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        value = np.where(eff > 0, 1.0 / eff, np.nan)
        low = value - 1.0 / (eff + err)
        high = np.where(eff > err, 1.0 / (eff - err), 10 * value) - value
        limit = np.where(eff == 0, 1.0 / (1.0 - 0.32 ** (1.0 / n_eff)), np.nan)
    return value, np.vstack([low, np.minimum(high, 9 * value)]), limit


def working_point_cut(scores: np.ndarray, weights: np.ndarray, efficiency: float) -> float:
    """The score threshold that keeps ``efficiency`` of the (weighted) signal rows given."""
    return float(weighted_quantile(scores, weights, 1.0 - efficiency)[0])


def efficiency_vs_pt_figure(
    probs: np.ndarray,
    labels: np.ndarray,
    weights: np.ndarray,
    pt: np.ndarray,
    classes: Sequence[str],
    working_point: float = 0.5,
    pt_label: str = "jet $p_T$ [GeV]",
    experiment: str | None = None,
) -> Figure:
    """At the cut on each signal class's probability that keeps ``working_point`` of it
    overall: its efficiency (left) and each background's rejection (right) in equal-population
    bins of ``pt``, with binomial errors from the weights."""
    signals = signal_classes(classes)
    edges = _edges(pt)
    centres, half = (edges[1:] + edges[:-1]) / 2, np.diff(edges) / 2
    bin_of = np.clip(np.searchsorted(edges, pt, side="right") - 1, 0, len(edges) - 2)
    with style(experiment):
        fig, axes = _figure(len(signals), 2)
        for row, s in zip(axes, signals, strict=True):
            cut = working_point_cut(probs[labels == s, s], weights[labels == s], working_point)
            passed = probs[:, s] >= cut
            for k, name in enumerate(classes):
                points = [
                    _fraction(
                        passed[(labels == k) & (bin_of == b)],
                        weights[(labels == k) & (bin_of == b)],
                    )
                    for b in range(len(centres))
                ]
                eff, err, n_eff = np.asarray(points, dtype=np.float64).T
                if k == s:
                    row[0].errorbar(centres, eff, yerr=err, xerr=half, fmt="o", label=name)
                    continue
                rejection, interval, limit = _rejection(eff, err, n_eff)
                drawn = row[1].errorbar(
                    centres, rejection, yerr=interval, xerr=half, fmt="o", label=name
                )
                if np.isfinite(limit).any():
                    row[1].plot(
                        centres, limit, "^", color=drawn.lines[0].get_color(),
                        label=f"{name}: none passes (68% lower limit)",
                    )  # fmt: skip
            title = f"{working_point:.0%} {classes[s]} eff. (p > {cut:.3f})"
            row[0].set(xlabel=pt_label, ylabel=f"{classes[s]} efficiency")
            row[0].set_ylim(0, 1.1)
            row[0].axhline(working_point, color="k", ls="--", lw=1)
            row[1].set(xlabel=pt_label, ylabel="background rejection", yscale="log")
            for ax in row:
                ax.set_xlim(edges[0], edges[-1])
                ax.legend(title=title, fontsize="small", title_fontsize="small")
                label(ax, experiment)
        fig.tight_layout()
    return fig


def _binned_response(
    x: np.ndarray, pred: np.ndarray, truth: np.ndarray, weights: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Bin centres, half-widths, response and resolution in equal-population bins of ``x``."""
    edges = _edges(x)
    bin_of = np.clip(np.searchsorted(edges, x, side="right") - 1, 0, len(edges) - 2)
    figures = np.asarray(
        [
            response_resolution(pred[bin_of == b], truth[bin_of == b], weights[bin_of == b])
            for b in range(len(edges) - 1)
        ]
    )
    return (edges[1:] + edges[:-1]) / 2, np.diff(edges) / 2, figures[:, 0], figures[:, 1]


def regression_figure(
    pred: np.ndarray,
    truth: np.ndarray,
    weights: np.ndarray,
    name: str,
    pt: np.ndarray | None = None,
    pt_label: str = "jet $p_T$ [GeV]",
    experiment: str | None = None,
) -> Figure:
    """Response (top: the median of ``pred / truth``) and resolution (bottom: half its 16-84%
    interval) in equal-population bins of the true value and, given ``pt``, of pT; the
    overall figures (MAE, R², response, resolution) in the first legend's title."""
    summary = regression_summary(pred, truth, weights)
    title = (
        f"MAE {summary['mae']:.3g}, $R^2$ {summary['r2']:.3f}\nresponse "
        f"{summary['response']:.3f}, resolution {summary['resolution']:.3f}"
    )
    columns = [(truth, f"true {name}")] + ([(pt, pt_label)] if pt is not None else [])
    with style(experiment):
        fig, axes = _figure(2, len(columns))
        for col, (x, xlabel) in enumerate(columns):
            centres, half, response, resolution = _binned_response(x, pred, truth, weights)
            top, bottom = axes[0, col], axes[1, col]
            top.errorbar(centres, response, xerr=half, fmt="o", label="median")
            top.axhline(1.0, color="k", ls="--", lw=1)
            top.set(xlabel=xlabel, ylabel="response")
            bottom.errorbar(centres, resolution, xerr=half, fmt="o", label="half 16-84%")
            bottom.set(xlabel=xlabel, ylabel="resolution")
            bottom.set_ylim(bottom=0)
            top.legend(title=title if col == 0 else None, fontsize="small", title_fontsize="small")
            bottom.legend(fontsize="small")
            for ax in (top, bottom):
                label(ax, experiment)
        fig.tight_layout()
    return fig


def reweighting_figure(summary: Mapping[str, Any], experiment: str | None = None) -> Figure:
    """Each class's spectrum in every reweighting variable (the marginal of the fitted
    histograms, per unit of the variable, normalised) before (top) and after (bottom)
    reweighting the training split, with the target (dashed) below.

    ``summary`` is ``Reweighting.to_dict()`` (what ``reweighting.json`` holds).
    """
    variables, classes = summary["variables"], summary["classes"]
    with style(experiment):
        fig, axes = _figure(2, len(variables))
        for col, var in enumerate(variables):
            edges = np.asarray(summary["bins"][var])
            width = np.diff(edges)
            others = tuple(a for a in range(len(variables)) if a != col)

            def marginal(
                h: Any, others: tuple[int, ...] = others, width: np.ndarray = width
            ) -> np.ndarray:
                m = np.asarray(h, dtype=np.float64).sum(axis=others) if others else np.asarray(h)
                total = m.sum()
                return m / (total * width) if total > 0 else m * 0.0

            for row, key in enumerate(("histograms_before", "histograms_after")):
                ax = axes[row, col]
                for i, name in enumerate(classes):
                    # Decreasing widths: after reweighting the classes coincide, and each
                    # stays visible under the next.
                    lw = 1.5 + 1.5 * (len(classes) - 1 - i)
                    hep.histplot(marginal(summary[key][name]), edges, ax=ax, label=name, lw=lw)
                if row == 1:
                    target = np.asarray(summary["target_density"]) * _volume(summary, variables)
                    hep.histplot(
                        marginal(target), edges, ax=ax, color="k", ls="--", lw=1,
                        label=f"target ({summary['target']})",
                    )  # fmt: skip
                ax.set(xlabel=var, ylabel="weighted density (normalised)")
                ax.legend(
                    title="before reweighting" if row == 0 else "after reweighting",
                    fontsize="small",
                    title_fontsize="small",
                )
                label(ax, experiment)
        fig.tight_layout()
    return fig


def _volume(summary: Mapping[str, Any], variables: Sequence[str]) -> np.ndarray:
    """The volume of every bin of the fitted histograms."""
    volume = np.ones(())
    for var in variables:
        volume = np.multiply.outer(volume, np.diff(np.asarray(summary["bins"][var])))
    return volume


def save_figures(figures: Mapping[str, Figure], out_dir: str | Path) -> list[Path]:
    """Write each figure to ``out_dir/plots/<name>.png``, atomically, and close it (the
    figure object stays usable for TensorBoard). Returns the paths. Call it in the ``style``
    the figures were made in: their math text is drawn with the fonts in force when saved."""
    plot_dir = Path(out_dir) / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, fig in figures.items():
        path = plot_dir / f"{name}.png"
        # A unique temporary file renamed into place: a reader never sees half a PNG.
        with atomic_path(path) as tmp:
            fig.savefig(tmp, dpi=72, format="png")
        plt.close(fig)
        paths.append(path)
    return paths


def evaluation_figures(
    record: Mapping[str, np.ndarray],
    classes: Sequence[str],
    targets: Sequence[str],
    pt_variable: str | None = None,
    working_point: float = 0.5,
    experiment: str | None = None,
) -> dict[str, Figure]:
    """The test split's figures by name (see the module docstring).

    Parameters
    ----------
    record
        ``EvaluationRecord.compute()``: ``outputs`` ``(n, n_outputs)`` (probabilities, then
        targets in physical units), ``weights``, ``labels`` and ``targets`` where present, and
        the ``pt_variable`` column.
    classes, targets
        The contract's class and regression target names.
    pt_variable
        The flat input to plot against (raw, physical units); ``None``: no pT plots.
    working_point
        Signal efficiency of the cut in ``efficiency_vs_pt``.
    experiment
        Experiment label and style, or ``None``.
    """
    outputs, weights = record["outputs"], record["weights"]
    pt = record.get(pt_variable) if pt_variable else None
    k = len(classes)
    figures: dict[str, Figure] = {}
    if k:
        probs, labels = outputs[:, :k], record["labels"]
        figures["roc"] = rejection_figure(probs, labels, weights, classes, experiment)
        figures["scores"] = score_figure(probs, labels, weights, classes, experiment)
        if pt is not None:
            figures["efficiency_vs_pt"] = efficiency_vs_pt_figure(
                probs, labels, weights, pt, classes, working_point, pt_variable, experiment
            )
    for i, name in enumerate(targets):
        figures[f"regression_{name}"] = regression_figure(
            outputs[:, k + i], record["targets"][:, i], weights, name, pt, str(pt_variable),
            experiment,
        )  # fmt: skip
    return figures
