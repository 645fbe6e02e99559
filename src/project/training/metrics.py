"""Weighted evaluation: ROC and AUC, accuracy, and the regression figures of merit.

Simulated events carry weights, some negative (NLO generators), and a reweighted training
split carries more; the figures of merit must count a row by its weight. torchmetrics (1.9)
takes no sample weights in ``AUROC``, ``ROC`` or ``Accuracy``, so the weighted versions are
here: the maths as numpy functions (also what the plots call, so a plotted curve and a
logged number cannot disagree), wrapped in small torchmetrics ``Metric`` classes with ``cat``
and ``sum`` states, which torchmetrics gathers across DDP ranks.

Every metric takes ``update(outputs, batch)``: ``outputs`` ``(batch, n_outputs)`` are the
deployed model's named outputs in contract order (class probabilities, then the regression
targets in physical units, ``DeployableModel.outputs`` stacked), ``batch`` the SoA batch with
``label``, ``targets`` and ``weight`` (absent: every weight is 1).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection
from torchmetrics.utilities import dim_zero_cat

from project.contract import InputContract
from project.data.batching import LABEL, TARGETS, WEIGHT

# The interval of the resolution: half the 16-84% quantile range (one sigma for a Gaussian).
RESOLUTION_QUANTILES = (0.16, 0.84)


def _weights(weights: np.ndarray | None, n: int) -> np.ndarray:
    return np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)


def weighted_roc(
    scores: np.ndarray, positive: np.ndarray, weights: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The ROC curve with per-row weights: signal and background efficiency per threshold.

    Parameters
    ----------
    scores
        ``(n,)``: higher means more signal-like.
    positive
        ``(n,)`` booleans: the signal rows.
    weights
        ``(n,)`` event weights; negative ones enter as they come (``None``: 1).

    Returns
    -------
    tpr, fpr, thresholds
        Signal efficiency and background efficiency (the weighted fraction of each class with
        a score at or above the threshold), from ``(0, 0)`` to ``(1, 1)``, one point per
        distinct score in decreasing order (tied scores form one point, so a tie counts half,
        as in the rank statistic); ``thresholds[0]`` is ``+inf``. With negative weights the
        efficiencies need not be monotonic. No signal (or no background) weight gives NaN.
    """
    scores = np.asarray(scores, dtype=np.float64)
    w = _weights(weights, len(scores))
    order = np.argsort(-scores, kind="stable")
    s, y, w = scores[order], np.asarray(positive, dtype=bool)[order], w[order]
    last_of_tie = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1] if len(s) else np.zeros(0, int)
    tp = np.r_[0.0, np.cumsum(np.where(y, w, 0.0))[last_of_tie]]
    fp = np.r_[0.0, np.cumsum(np.where(y, 0.0, w))[last_of_tie]]
    with np.errstate(divide="ignore", invalid="ignore"):
        tpr = tp / tp[-1] if tp[-1] != 0 else np.full_like(tp, np.nan)
        fpr = fp / fp[-1] if fp[-1] != 0 else np.full_like(fp, np.nan)
    return tpr, fpr, np.r_[np.inf, s[last_of_tie]]


def weighted_auc(
    scores: np.ndarray, positive: np.ndarray, weights: np.ndarray | None = None
) -> float:
    """Area under ``weighted_roc`` by the trapezoid rule over the cumulative weights.

    That trapezoid is exactly the weighted rank (Mann-Whitney) statistic,
    ``sum_ij w_i w_j ([s_i > s_j] + [s_i = s_j] / 2) / (W_signal W_background)`` over signal
    rows ``i`` and background rows ``j``, because each tie group adds a bilinear term. Negative
    weights are taken as they come, so the estimate stays unbiased for the physical mix (a
    negative-weight row cancels what its positive partner added); on a small sample it can
    leave [0, 1]. NaN without signal or background weight.
    """
    tpr, fpr, _ = weighted_roc(scores, positive, weights)
    return float(np.sum(np.diff(fpr) * (tpr[1:] + tpr[:-1]) / 2))


def weighted_quantile(
    values: np.ndarray, weights: np.ndarray | None, q: Sequence[float] | float
) -> np.ndarray:
    """Quantiles ``q`` (in [0, 1]) of ``values`` with per-row weights.

    The ``q`` quantile is the smallest value whose cumulative weight (values sorted, weights
    as they come, negative ones included) reaches ``q`` of the total; NaN for no values or a
    total weight that is not positive.
    """
    values = np.asarray(values, dtype=np.float64)
    q = np.atleast_1d(np.asarray(q, dtype=np.float64))
    w = _weights(weights, len(values))
    if len(values) == 0 or not w.sum() > 0:
        return np.full(q.shape, np.nan)
    order = np.argsort(values, kind="stable")
    cumulative = np.cumsum(w[order])
    # The running maximum keeps the search well defined where negative weights make the
    # cumulative sum dip.
    reach = np.maximum.accumulate(cumulative)
    index = np.searchsorted(reach, q * cumulative[-1], side="left")
    return values[order][np.clip(index, 0, len(values) - 1)]


def response_resolution(
    pred: np.ndarray, truth: np.ndarray, weights: np.ndarray | None = None
) -> tuple[float, float]:
    """Response and resolution of ``pred / truth``: its weighted median, and half its weighted
    16-84% interval. Rows with ``truth == 0`` have no ratio and are left out."""
    pred, truth = np.asarray(pred, np.float64), np.asarray(truth, np.float64)
    w = _weights(weights, len(pred))
    keep = truth != 0
    ratio = pred[keep] / truth[keep]
    median, lo, hi = weighted_quantile(ratio, w[keep], (0.5, *RESOLUTION_QUANTILES))
    return float(median), float((hi - lo) / 2)


def regression_summary(
    pred: np.ndarray, truth: np.ndarray, weights: np.ndarray | None = None
) -> dict[str, float]:
    """Weighted mean absolute error ``mae``, coefficient of determination ``r2``, ``response``
    and ``resolution`` (``response_resolution``) of one target, in its physical units."""
    pred, truth = np.asarray(pred, np.float64), np.asarray(truth, np.float64)
    w = _weights(weights, len(pred))
    total = w.sum()
    mae = float(np.sum(w * np.abs(pred - truth)) / total)
    mean = np.sum(w * truth) / total
    spread = np.sum(w * (truth - mean) ** 2)
    r2 = float(1.0 - np.sum(w * (pred - truth) ** 2) / spread) if spread > 0 else float("nan")
    response, resolution = response_resolution(pred, truth, w)
    return {"mae": mae, "r2": r2, "response": response, "resolution": resolution}


def _batch_weights(batch: Mapping[str, Tensor], n: int, like: Tensor) -> Tensor:
    weights = batch.get(WEIGHT)
    if weights is None:
        return torch.ones(n, dtype=torch.float32, device=like.device)
    return weights.float()


def _filled(state: list[Tensor] | Tensor) -> bool:
    """Whether a ``cat`` state holds rows: a list of batches before a DDP sync, one tensor
    after it."""
    return len(state) > 0 if isinstance(state, list) else state.numel() > 0


def _numpy(t: Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


class WeightedAUROC(Metric):
    """Weighted area under the ROC curve (``weighted_auc``) of the class probabilities.

    Binary: the second class's probability against the first. More classes: each class
    against the rest, averaged over the classes (torchmetrics' ``macro``). torchmetrics' own
    ``AUROC`` takes no sample weights; this keeps the rows (``cat`` states, gathered across
    ranks) and computes the curve once, at ``compute``.
    """

    full_state_update = False

    def __init__(self, n_classes: int) -> None:
        super().__init__()
        self.n_classes = int(n_classes)
        self.add_state("probs", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        self.add_state("weights", default=[], dist_reduce_fx="cat")

    def update(self, outputs: Tensor, batch: Mapping[str, Tensor]) -> None:
        """Keep the batch's probabilities, labels and weights."""
        self.probs.append(outputs[:, : self.n_classes].detach().float())
        self.labels.append(batch[LABEL].detach())
        self.weights.append(_batch_weights(batch, len(outputs), outputs).detach())

    def compute(self) -> Tensor:
        """The AUC (a 0-d tensor)."""
        probs = _numpy(dim_zero_cat(self.probs))
        labels = dim_zero_cat(self.labels).cpu().numpy()
        weights = _numpy(dim_zero_cat(self.weights))
        if self.n_classes == 2:
            value = weighted_auc(probs[:, 1], labels == 1, weights)
        else:
            value = float(
                np.mean(
                    [weighted_auc(probs[:, c], labels == c, weights) for c in range(self.n_classes)]
                )
            )
        return torch.tensor(value, dtype=torch.float32)


class WeightedAccuracy(Metric):
    """Weighted fraction of rows whose most probable class is the true one (binary: the
    second class's probability at or above 0.5, as torchmetrics' binary threshold).

    Over all rows (``micro``): torchmetrics' multiclass ``Accuracy`` defaults to the mean of
    per-class recalls instead, and takes no sample weights.
    """

    full_state_update = False

    def __init__(self, n_classes: int) -> None:
        super().__init__()
        self.n_classes = int(n_classes)
        self.add_state(
            "correct", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state(
            "total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum"
        )

    def update(self, outputs: Tensor, batch: Mapping[str, Tensor]) -> None:
        """Add the batch's correct and total weight."""
        probs = outputs[:, : self.n_classes].detach().float()
        predicted = (probs[:, 1] >= 0.5).long() if self.n_classes == 2 else probs.argmax(dim=1)
        weights = _batch_weights(batch, len(outputs), outputs).double()
        self.correct += torch.sum(weights * (predicted == batch[LABEL]).double())
        self.total += weights.sum()

    def compute(self) -> Tensor:
        """The accuracy (a 0-d tensor)."""
        return (self.correct / self.total).float()


class RegressionMetrics(Metric):
    """Per regression target, ``regression_summary`` in physical units: ``mae_<target>``,
    ``r2_<target>``, ``response_<target>`` and ``resolution_<target>``.

    The medians and quantiles need every row, so the predictions, truths and weights are kept
    (``cat`` states) and summarised once, at ``compute``.
    """

    full_state_update = False

    def __init__(self, n_classes: int, targets: Sequence[str]) -> None:
        super().__init__()
        self.n_classes, self.names = int(n_classes), list(targets)
        self.add_state("preds", default=[], dist_reduce_fx="cat")
        self.add_state("truth", default=[], dist_reduce_fx="cat")
        self.add_state("weights", default=[], dist_reduce_fx="cat")

    def update(self, outputs: Tensor, batch: Mapping[str, Tensor]) -> None:
        """Keep the batch's predictions, truths and weights."""
        self.preds.append(outputs[:, self.n_classes :].detach().float())
        self.truth.append(batch[TARGETS].detach().float())
        self.weights.append(_batch_weights(batch, len(outputs), outputs).detach())

    def compute(self) -> dict[str, Tensor]:
        """The figures by name, each a 0-d tensor."""
        preds, truth = _numpy(dim_zero_cat(self.preds)), _numpy(dim_zero_cat(self.truth))
        weights = _numpy(dim_zero_cat(self.weights))
        out = {}
        for i, name in enumerate(self.names):
            for key, value in regression_summary(preds[:, i], truth[:, i], weights).items():
                out[f"{key}_{name}"] = torch.tensor(value, dtype=torch.float32)
        return out


class EvaluationRecord(Metric):
    """Every evaluated row, kept for the plots: outputs, labels, weights, targets and named
    raw input columns (``variables``, such as ``jet_pt``), gathered across ranks."""

    full_state_update = False

    def __init__(self, variables: Sequence[str] = ()) -> None:
        super().__init__()
        self.variables = list(variables)
        for name in ("outputs", "labels", "weights", "targets", "columns"):
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, outputs: Tensor, batch: Mapping[str, Tensor]) -> None:
        """Keep the batch's rows."""
        n = len(outputs)
        self.outputs.append(outputs.detach().float())
        self.weights.append(_batch_weights(batch, n, outputs).detach())
        if LABEL in batch:
            self.labels.append(batch[LABEL].detach())
        if TARGETS in batch:
            self.targets.append(batch[TARGETS].detach().float())
        columns = [batch[v].detach().float() for v in self.variables]
        self.columns.append(torch.stack(columns, 1) if columns else outputs.new_zeros((n, 0)))

    def compute(self) -> dict[str, np.ndarray]:
        """The rows as numpy arrays: ``outputs`` ``(n, n_outputs)``, ``weights`` ``(n,)``,
        ``labels`` ``(n,)`` and ``targets`` ``(n, n_targets)`` where the batches had them, and
        each variable ``(n,)`` by its name."""
        out = {
            "outputs": _numpy(dim_zero_cat(self.outputs)),
            "weights": _numpy(dim_zero_cat(self.weights)),
        }
        if _filled(self.labels):
            out["labels"] = dim_zero_cat(self.labels).cpu().numpy()
        if _filled(self.targets):
            out["targets"] = _numpy(dim_zero_cat(self.targets))
        columns = _numpy(dim_zero_cat(self.columns))
        out.update({v: columns[:, i] for i, v in enumerate(self.variables)})
        return out


def evaluation_metrics(contract: InputContract, prefix: str) -> MetricCollection:
    """The weighted metrics of a contract's outputs: ``auroc`` and ``accuracy`` for classes,
    ``RegressionMetrics`` for targets; names start with ``prefix`` (``val/``)."""
    metrics: dict[str, Metric] = {}
    if contract.n_classes:
        metrics["auroc"] = WeightedAUROC(contract.n_classes)
        metrics["accuracy"] = WeightedAccuracy(contract.n_classes)
    if contract.regression:
        metrics["regression"] = RegressionMetrics(
            contract.n_classes, [t.name for t in contract.regression]
        )
    # Each metric keeps its own states: compute groups would try to share them.
    return MetricCollection(metrics, prefix=prefix, compute_groups=False)


__all__ = [
    "RESOLUTION_QUANTILES",
    "EvaluationRecord",
    "RegressionMetrics",
    "WeightedAUROC",
    "WeightedAccuracy",
    "evaluation_metrics",
    "regression_summary",
    "response_resolution",
    "weighted_auc",
    "weighted_quantile",
    "weighted_roc",
]
