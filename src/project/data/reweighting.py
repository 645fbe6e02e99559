"""Kinematic reweighting: every class given the same spectrum in a few variables.

A tagger trained on classes with different jet pT (or eta) spectra learns the kinematics
instead of the substructure. Reweighting removes that handle, as weaver's
``reweight_method: flat`` does: each class is histogrammed in the reweighting variables (1-D or
N-D, weighted by the event weights), and a row's weight becomes its event weight times

    target density / its class's density, in the row's bin,

clipped at ``max_weight``, then scaled so that the classes carry the totals that ``normalise``
asks for. The target is ``flat`` (uniform per unit of the variables) or one class's own
spectrum. Everything is fitted on the training split only; ``Reweighting.apply`` then gives the
weights of any split.

The histograms are numpy's (``np.histogramdd``); densities are per unit bin volume, so
unequal bins (a log-spaced pT axis) reweight to a spectrum flat in the variable, not in the
bin index.

An empty bin (no positive weight of a class where the target has some) cannot be filled: its
ratio is clipped at ``max_weight`` and it is counted in the log, which is not an error. A row
outside the bin range is taken into the first or last bin (counted in the log too).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from project.contract import ContractError, InputContract
from project.data.columnar import ColumnarData

log = logging.getLogger(__name__)

FLAT = "flat"
# How the class totals come out: every class gets the same total (the training split's total
# event weight shared equally), every class keeps its total from before, or no rescaling.
NORMALISATIONS = ("equal_class_totals", "class_totals", "none")
SPLITS = ("train", "val", "test")
_KEYS = {"variables", "bins", "target", "max_weight", "normalise", "splits"}


@dataclass(frozen=True)
class ReweightConfig:
    """What ``data.reweight`` asks for, checked against the contract.

    Parameters
    ----------
    variables
        Flat features of the contract to reweight in (physical units, before any transform),
        for instance ``("jet_pt", "jet_eta")``.
    edges
        Bin edges per variable, strictly increasing.
    target
        ``"flat"`` or the name of a class whose spectrum the others are given.
    max_weight
        Upper bound of the density ratio (before the normalisation).
    normalise
        One of ``NORMALISATIONS``.
    splits
        The splits whose weights are multiplied (``train`` and ``val`` by default, so that the
        validation loss and the checkpoint choice see what training optimises; the test split
        keeps the event weights and measures the physical mix).
    """

    variables: tuple[str, ...]
    edges: tuple[tuple[float, ...], ...]
    target: str = FLAT
    max_weight: float = 10.0
    normalise: str = "equal_class_totals"
    splits: tuple[str, ...] = ("train", "val")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], contract: InputContract) -> ReweightConfig:
        """Read ``data.reweight`` (a mapping) and check it against ``contract``.

        ``bins`` maps each variable to its edges (a list) or to ``{n: 20, range: [lo, hi]}``
        (``n`` equal bins).

        Raises
        ------
        ContractError
            Naming the key that is wrong and what to give: a variable that is not a flat
            feature of the contract, missing or unordered bins, an unknown target class or
            normalisation, a contract without classes.
        """
        if not isinstance(d, Mapping):
            raise ContractError(f"data.reweight must be a mapping, got {d!r}")
        unknown = set(d) - _KEYS
        if unknown:
            raise ContractError(
                f"data.reweight: unknown keys {sorted(unknown)}; expected {sorted(_KEYS)}"
            )
        if not contract.classes:
            raise ContractError(
                "data.reweight needs classes to reweight, and the contract has none "
                "(a regression-only model); remove data.reweight"
            )
        variables = d.get("variables")
        if isinstance(variables, str):
            variables = [variables]
        if not variables:
            raise ContractError(
                "data.reweight.variables: give at least one flat feature, e.g. [jet_pt]"
            )
        flat = contract.flat_names
        for name in variables:
            if name not in flat:
                raise ContractError(
                    f"data.reweight.variables: {name!r} is not a flat feature of the contract "
                    f"(flat features: {flat}); reweight in declared features only, or add it "
                    "to data.contract.flat"
                )
        if len(set(variables)) != len(variables):
            raise ContractError(f"data.reweight.variables repeats a name: {list(variables)}")
        bins = d.get("bins") or {}
        if not isinstance(bins, Mapping):
            raise ContractError(
                f"data.reweight.bins must map each variable to its bins, got {bins!r}"
            )
        extra = set(bins) - set(variables)
        if extra:
            raise ContractError(
                f"data.reweight.bins names {sorted(extra)}, which are not among the variables "
                f"{list(variables)}"
            )
        edges = tuple(_edges(name, bins.get(name)) for name in variables)
        target = str(d.get("target", FLAT))
        if target != FLAT and target not in contract.classes:
            raise ContractError(
                f"data.reweight.target = {target!r}: give 'flat' or one of the classes "
                f"{list(contract.classes)}"
            )
        max_weight = d.get("max_weight", 10.0)
        try:
            max_weight = float(max_weight)
        except (TypeError, ValueError):
            raise ContractError(
                f"data.reweight.max_weight must be a number, got {max_weight!r}"
            ) from None
        if not (math.isfinite(max_weight) and max_weight > 0):
            raise ContractError(
                f"data.reweight.max_weight must be finite and > 0, got {max_weight}"
            )
        normalise = str(d.get("normalise", "equal_class_totals"))
        if normalise not in NORMALISATIONS:
            raise ContractError(
                f"data.reweight.normalise = {normalise!r}: choose one of {list(NORMALISATIONS)}"
            )
        splits = d.get("splits", ("train", "val"))
        splits = (splits,) if isinstance(splits, str) else tuple(splits)
        if "train" not in splits or any(s not in SPLITS for s in splits):
            raise ContractError(
                f"data.reweight.splits = {list(splits)}: a subset of {list(SPLITS)} that includes "
                "train"
            )
        return cls(tuple(variables), edges, target, max_weight, normalise, splits)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (the edges written out)."""
        return {
            "variables": list(self.variables),
            "bins": {v: list(e) for v, e in zip(self.variables, self.edges, strict=True)},
            "target": self.target,
            "max_weight": self.max_weight,
            "normalise": self.normalise,
            "splits": list(self.splits),
        }


def _edges(name: str, spec: Any) -> tuple[float, ...]:
    what = f"data.reweight.bins.{name}"
    if spec is None:
        raise ContractError(
            f"{what} is missing: give edges ([550, 575, 600, 650]) or {{n: 20, range: [lo, hi]}}"
        )
    if isinstance(spec, Mapping):
        if set(spec) != {"n", "range"}:
            raise ContractError(f"{what}: expected {{n: ..., range: [lo, hi]}}, got {dict(spec)}")
        n, lo_hi = spec["n"], spec["range"]
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise ContractError(f"{what}.n must be a whole number >= 1, got {n!r}")
        if not isinstance(lo_hi, Sequence) or len(lo_hi) != 2:
            raise ContractError(f"{what}.range must be [lo, hi], got {lo_hi!r}")
        values = np.linspace(float(lo_hi[0]), float(lo_hi[1]), n + 1)
    elif isinstance(spec, Sequence) and not isinstance(spec, str):
        try:
            values = np.asarray([float(v) for v in spec])
        except (TypeError, ValueError):
            raise ContractError(f"{what}: edges must be numbers, got {list(spec)}") from None
    else:
        raise ContractError(f"{what}: expected a list of edges or {{n, range}}, got {spec!r}")
    if len(values) < 2 or not np.all(np.isfinite(values)) or np.any(np.diff(values) <= 0):
        raise ContractError(
            f"{what}: need at least two finite, strictly increasing edges, got {values.tolist()}"
        )
    return tuple(float(v) for v in values)


@dataclass(frozen=True)
class Reweighting:
    """A fitted reweighting: the histograms of the training split and the weight per bin.

    Arrays are ``(n_classes, *n_bins)`` (one axis per variable) unless said otherwise.

    Attributes
    ----------
    config
        What was asked for.
    classes
        Class names, in label order.
    before
        Each class's weighted histogram (sum of event weights per bin) of the training split.
    target
        ``(*n_bins,)``: the target's density per unit bin volume (integrating to 1).
    factors
        The factor a row's event weight is multiplied by, per class and bin: the clipped
        density ratio times the class's normalisation.
    after
        Each class's weighted histogram of the training split after reweighting.
    empty, clipped, outside
        Per class: bins where the class has no positive weight but the target has (ratio
        clipped at ``max_weight``), other bins whose ratio was clipped, and training rows
        outside the bin range (taken into the edge bins).
    """

    config: ReweightConfig
    classes: tuple[str, ...]
    before: np.ndarray
    target: np.ndarray
    factors: np.ndarray
    after: np.ndarray
    empty: tuple[int, ...]
    clipped: tuple[int, ...]
    outside: tuple[int, ...]

    def row_factors(self, data: ColumnarData) -> np.ndarray:
        """The factor of each row of ``data`` ``(n_rows,)``, float64, from its label and bin."""
        index, _ = _bin_index(data, self.config)
        return self.factors[(data.labels, *index)]

    def apply(self, data: ColumnarData) -> ColumnarData:
        """``data`` with its event weights (1 where it has none) multiplied by the factors."""
        weights = np.ones(len(data)) if data.weights is None else data.weights.astype(np.float64)
        new = (weights * self.row_factors(data)).astype(np.float32)
        return replace(data, weights=new)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form for ``reweighting.json`` and the checkpoint's hyperparameters
        (lists of floats; loads with ``torch.load(weights_only=True)``)."""

        def per_class(a: np.ndarray) -> dict[str, Any]:
            return {c: a[k].tolist() for k, c in enumerate(self.classes)}

        return {
            **self.config.to_dict(),
            "classes": list(self.classes),
            "histograms_before": per_class(self.before),
            "histograms_after": per_class(self.after),
            "target_density": self.target.tolist(),
            "weights": per_class(self.factors),
            "empty_bins": dict(zip(self.classes, self.empty, strict=True)),
            "clipped_bins": dict(zip(self.classes, self.clipped, strict=True)),
            "rows_outside_range": dict(zip(self.classes, self.outside, strict=True)),
        }


def reweighting_from_dict(d: Mapping[str, Any], contract: InputContract) -> Reweighting:
    """A fitted reweighting from its plain-dict form (``Reweighting.to_dict``)."""
    classes = tuple(d["classes"])
    keys = ("variables", "bins", "target", "max_weight", "normalise", "splits")
    config = ReweightConfig.from_dict({k: d[k] for k in keys}, contract)

    def stacked(key: str) -> np.ndarray:
        return np.asarray([d[key][c] for c in classes], dtype=np.float64)

    return Reweighting(
        config, classes, stacked("histograms_before"), np.asarray(d["target_density"]),
        stacked("weights"), stacked("histograms_after"),
        tuple(int(d["empty_bins"][c]) for c in classes),
        tuple(int(d["clipped_bins"][c]) for c in classes),
        tuple(int(d["rows_outside_range"][c]) for c in classes),
    )  # fmt: skip


def _bin_index(
    data: ColumnarData, config: ReweightConfig
) -> tuple[tuple[np.ndarray, ...], np.ndarray]:
    """Each row's bin along every variable (out-of-range rows in the edge bins), and a mask of
    the rows outside the range of any variable."""
    index, outside = [], np.zeros(len(data), dtype=bool)
    for name, edges in zip(config.variables, config.edges, strict=True):
        values = data.flat[name]
        e = np.asarray(edges)
        outside |= (values < e[0]) | (values > e[-1])
        # side="right" puts a value equal to an inner edge in the bin above, as np.histogram.
        i = np.searchsorted(e, values, side="right") - 1
        index.append(np.clip(i, 0, len(e) - 2))
    return tuple(index), outside


def fit_reweighting(
    data: ColumnarData, contract: InputContract, config: ReweightConfig | Mapping[str, Any]
) -> Reweighting:
    """Fit the reweighting on ``data`` (the training split) with its event weights.

    Parameters
    ----------
    data
        The training split: ``flat`` holds the variables in physical units, ``labels`` the
        classes, ``weights`` the event weights (``None``: 1).
    contract
        The (raw) contract: classes and flat features.
    config
        ``ReweightConfig`` or the ``data.reweight`` mapping.

    Raises
    ------
    ContractError
        For a bad config, or a class whose total weight after reweighting is not positive
        (negative weights dominating its bins): no weight can then make it count.
    """
    fit = ReweightFit(contract, config)
    fit.update(data)
    return fit.result(data.source)


class ReweightFit:
    """The reweighting fitted part by part (the streaming pass's chunks, or one whole table).

    Each class's weighted histogram and its rows outside the bin range are summed over the
    parts; everything else follows from them (a class's total weight is the sum of its
    histogram, after reweighting the sum of histogram times factor), so a fit over parts and
    one over their joined table agree up to rounding.
    """

    def __init__(self, contract: InputContract, config: ReweightConfig | Mapping[str, Any]) -> None:
        if not isinstance(config, ReweightConfig):
            config = ReweightConfig.from_dict(config, contract)
        self.contract, self.config = contract, config
        self.shape = tuple(len(e) - 1 for e in config.edges)
        self.before = np.zeros((contract.n_classes, *self.shape))
        self.outside = np.zeros(contract.n_classes, dtype=np.int64)

    def update(self, data: ColumnarData) -> None:
        """Add the rows of ``data`` (labels, event weights and the variables)."""
        n_classes = self.contract.n_classes
        weights = np.ones(len(data)) if data.weights is None else data.weights.astype(np.float64)
        index, out_of_range = _bin_index(data, self.config)
        labels = data.labels
        cells = (
            np.ravel_multi_index(index, self.shape) if len(data) else np.zeros(0, dtype=np.int64)
        )
        n_cells = int(np.prod(self.shape))
        self.before += np.stack(
            [
                np.bincount(cells[labels == k], weights[labels == k], n_cells)
                for k in range(n_classes)
            ]
        ).reshape((n_classes, *self.shape))
        self.outside += np.bincount(labels[out_of_range], minlength=n_classes)

    def result(self, source: str = "the training split") -> Reweighting:
        """The fitted reweighting (``source`` names the data in errors)."""
        contract, config, shape, before = self.contract, self.config, self.shape, self.before
        n_classes = contract.n_classes
        n_cells = int(np.prod(shape))
        volume = np.ones(shape)
        for axis, e in enumerate(config.edges):
            widths = np.diff(np.asarray(e)).reshape(
                [-1 if a == axis else 1 for a in range(len(shape))]
            )
            volume = volume * widths

        def density(h: np.ndarray) -> np.ndarray:
            positive = np.clip(h, 0.0, None)
            total = positive.sum()
            return positive / (total * volume) if total > 0 else np.zeros_like(h)

        if config.target == FLAT:
            target = np.full(shape, 1.0 / volume.sum())
        else:
            target = density(before[contract.classes.index(config.target)])
        factors = np.zeros((n_classes, *shape))
        empty, clipped = [], []
        for k in range(n_classes):
            own = density(before[k])
            has_target = target > 0
            is_empty = has_target & (own <= 0)
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = np.where(own > 0, target / own, 0.0)
            too_large = ratio > config.max_weight
            ratio = np.where(is_empty | too_large, config.max_weight, ratio)
            factors[k] = ratio
            empty.append(int(is_empty.sum()))
            clipped.append(int((too_large & ~is_empty).sum()))
        totals_before = before.reshape(n_classes, -1).sum(axis=1)
        totals = (before * factors).reshape(n_classes, -1).sum(axis=1)
        for k, total in enumerate(totals):
            if not total > 0:
                raise ContractError(
                    f"{source}: class {contract.classes[k]!r} has total weight {total:.6g} after "
                    f"reweighting in {list(config.variables)} (negative event weights dominate "
                    "its bins); use coarser bins (data.reweight.bins) or check the weight "
                    "expression"
                )
        if config.normalise == "equal_class_totals":
            norms = totals_before.sum() / n_classes / totals
        elif config.normalise == "class_totals":
            norms = totals_before / totals
        else:
            norms = np.ones(n_classes)
        factors = factors * norms.reshape((n_classes,) + (1,) * len(shape))
        after = before * factors
        outside = tuple(int(n) for n in self.outside)
        fitted = Reweighting(
            config, tuple(contract.classes), before.copy(), target, factors, after,
            tuple(empty), tuple(clipped), outside,
        )  # fmt: skip
        for k, name in enumerate(contract.classes):
            say = log.warning if empty[k] else log.info
            say(
                f"reweighting {name!r} in {list(config.variables)} to {config.target}: "
                f"{empty[k]} of {n_cells} bins empty (clipped at max_weight={config.max_weight:g}), "
                f"{clipped[k]} more clipped, {outside[k]} rows outside the bin range; total weight "
                f"{totals_before[k]:.6g} -> {float(after[k].sum()):.6g}"
            )
        return fitted


__all__ = [
    "FLAT",
    "NORMALISATIONS",
    "ReweightConfig",
    "ReweightFit",
    "Reweighting",
    "fit_reweighting",
    "reweighting_from_dict",
]
