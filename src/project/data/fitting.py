"""What is fitted on the training split, accumulated part by part.

The in-memory path fits on the whole training split at once, the streaming path chunk by
chunk over a sample of it (``project.data.stream_index``); both go through these
accumulators, so they fit the same constants (up to float rounding) on the same rows. A fit
takes ``update(part)`` for every part (a ``ColumnarData``) and gives its result at the end.
"""

from __future__ import annotations

import math

import numpy as np

from project.contract import LOG_FLOOR, ContractError, Feature, InputContract
from project.data.columnar import ColumnarData, gather_objects


class Moments:
    """Count, mean and sum of squared deviations of values seen in parts, in float64.

    Parts are merged with the pairwise update of Chan, Golub and LeVeque, which stays
    accurate where a running sum of squares would cancel.
    """

    def __init__(self) -> None:
        self.n = 0
        self.mean = 0.0
        self.m2 = 0.0

    def update(self, values: np.ndarray) -> None:
        """Add the values of one part, shape ``(n,)``."""
        n = len(values)
        if n == 0:
            return
        values = values.astype(np.float64)
        mean = float(values.mean())
        m2 = float(np.square(values - mean).sum())
        total = self.n + n
        delta = mean - self.mean
        self.mean += delta * n / total
        self.m2 += m2 + delta * delta * self.n * n / total
        self.n = total

    def result(self) -> tuple[float, float]:
        """``(mean, scale)``: the mean and population standard deviation; ``(0, 1)`` without
        values, and a scale of 1 for a constant."""
        if self.n == 0:
            return 0.0, 1.0
        scale = math.sqrt(self.m2 / self.n)
        return self.mean, scale if math.isfinite(scale) and scale > 1e-12 else 1.0


def _transformed(values: np.ndarray, feature: Feature) -> np.ndarray:
    if feature.transform == "log":
        return np.log(np.maximum(values.astype(np.float64), LOG_FLOOR))
    return values


class StandardizerFit:
    """Mean and scale of every feature and regression target of ``contract``.

    Jagged fields are fitted on the objects the model sees (the first ``max_length`` of each
    row), features after their transform.
    """

    def __init__(self, contract: InputContract) -> None:
        self.contract = contract
        self.rows = 0
        self.flat = {f.name: Moments() for f in contract.flat}
        self.jagged = {c.name: {f.name: Moments() for f in c.fields} for c in contract.jagged}
        self.targets = {t.name: Moments() for t in contract.regression}

    def update(self, part: ColumnarData) -> None:
        """Add the rows of ``part``."""
        for feat in self.contract.flat:
            self.flat[feat.name].update(_transformed(part.flat[feat.name], feat))
        for coll in self.contract.jagged:
            src = part.jagged[coll.name]
            _, seen = gather_objects(src.offsets, np.arange(len(part)), coll.max_length)
            for feat in coll.fields:
                values = _transformed(src.fields[feat.name][seen], feat)
                self.jagged[coll.name][feat.name].update(values)
        for target in self.contract.regression:
            self.targets[target.name].update(part.targets[target.name])
        self.rows += len(part)

    def result(self) -> InputContract:
        """The contract with the fitted constants."""
        return self.contract.with_constants(
            {k: m.result() for k, m in self.flat.items()},
            {c: {k: m.result() for k, m in fields.items()} for c, fields in self.jagged.items()},
            {k: m.result() for k, m in self.targets.items()},
        )


class LabelCheck:
    """Labels within ``[0, n_classes)`` in every part, and every class with a positive total
    weight over all of them; the errors name the source and the classes."""

    def __init__(self, contract: InputContract) -> None:
        self.contract = contract
        self.rows = 0
        self.totals = np.zeros(contract.n_classes)
        self.counts = np.zeros(contract.n_classes, dtype=np.int64)

    def update(self, part: ColumnarData) -> None:
        """Check the labels of ``part`` and add its weight per class."""
        self.rows += len(part)
        contract = self.contract
        if not contract.classes:
            return
        if part.labels is None:
            raise ContractError(
                f"{part.source}: the source gives no labels; set its label expression"
            )
        bad = (part.labels < 0) | (part.labels >= contract.n_classes)
        if bad.any():
            found = sorted(set(np.unique(part.labels[bad]).tolist()))[:10]
            raise ContractError(
                f"{part.source}: labels {found} are outside 0..{contract.n_classes - 1} for "
                f"classes {list(contract.classes)}; fix the label expression or the contract's "
                "classes"
            )
        weights = None if part.weights is None else part.weights.astype(np.float64)
        self.totals += np.bincount(part.labels, weights=weights, minlength=contract.n_classes)
        self.counts += np.bincount(part.labels, minlength=contract.n_classes)

    def check(self, source: str) -> None:
        """Raise ``ContractError`` if no rows were seen, or a class has no positive total."""
        if self.rows == 0:
            raise ContractError(f"{source}: no rows (check the selection)")
        for k, total in enumerate(self.totals):
            if not total > 0:
                raise ContractError(
                    f"{source}: class {self.contract.classes[k]!r} has total weight "
                    f"{total:.6g} after the selection ({int(self.counts[k])} rows); a class needs "
                    "rows with a positive sum of weights: check the label, selection and weight "
                    "expressions"
                )
