"""Test-set plots: ROC curves and score distributions per class, as PNG and figures."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # runs on headless batch nodes
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure


def roc_curve(scores: np.ndarray, is_signal: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Signal efficiency, background efficiency and AUC of a score, ties handled by grouping.

    Returns ``(tpr, fpr, auc)`` with both rates starting at 0 and ending at 1.
    """
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], is_signal[order].astype(np.float64)
    last_of_tie = np.r_[np.nonzero(np.diff(s))[0], len(s) - 1]
    tp = np.r_[0.0, np.cumsum(y)[last_of_tie]]
    fp = np.r_[0.0, np.cumsum(1 - y)[last_of_tie]]
    tpr = tp / max(tp[-1], 1.0)
    fpr = fp / max(fp[-1], 1.0)
    auc = float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))
    return tpr, fpr, auc


def write_classifier_plots(
    probs: np.ndarray, labels: np.ndarray, classes: Sequence[str], out_dir: str | Path
) -> dict[str, Figure]:
    """Draw one-vs-rest ROC curves and per-class score histograms.

    Parameters
    ----------
    probs
        ``(n_rows, n_classes)`` predicted probabilities.
    labels
        ``(n_rows,)`` true class indices.
    classes
        Class names.
    out_dir
        Run directory; PNGs go to ``out_dir/plots/``.

    Returns
    -------
    The figures by name (``roc``, ``scores``), e.g. for TensorBoard.
    """
    plot_dir = Path(out_dir) / "plots"
    plot_dir.mkdir(parents=True, exist_ok=True)
    signal_classes = range(1, len(classes)) if len(classes) == 2 else range(len(classes))

    roc_fig, ax = plt.subplots(figsize=(5, 4.5))
    for c in signal_classes:
        tpr, fpr, auc = roc_curve(probs[:, c], labels == c)
        with np.errstate(divide="ignore"):
            ax.plot(tpr, 1.0 / fpr, label=f"{classes[c]} vs rest, AUC={auc:.4f}")
    ax.set(xlabel="signal efficiency", ylabel="background rejection (1/eff)", yscale="log")
    ax.legend()
    ax.grid(alpha=0.3)
    roc_fig.tight_layout()

    score_fig, axes = plt.subplots(1, len(signal_classes), figsize=(5 * len(signal_classes), 4))
    for ax, c in zip(np.atleast_1d(axes), signal_classes, strict=True):
        bins = np.linspace(0, 1, 41)
        for k, name in enumerate(classes):
            ax.hist(
                probs[labels == k, c],
                bins=bins,
                histtype="step",
                density=True,
                label=f"true {name}",
            )
        ax.set(xlabel=f"p({classes[c]})", ylabel="density", yscale="log")
        ax.legend()
    score_fig.tight_layout()

    figures = {"roc": roc_fig, "scores": score_fig}
    for name, fig in figures.items():
        fig.savefig(plot_dir / f"{name}.png", dpi=120)
        plt.close(fig)
    return figures
