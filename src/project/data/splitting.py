"""Which rows are training, validation and test rows.

``data.split_by`` chooses how:

- ``rows``: a seeded permutation of the rows of the table loaded in memory (the rows' places
  in it, so the split changes with the order of the files); in memory only.
- ``hash``: a hash of each row's event identifiers (``data.split_ids``: ``run``,
  ``luminosityBlock``, ``event``, or ``entry``, the entry number of the row's event in its
  file) and the seed. The same event lands in the same split whatever the file order, the
  path (in memory or streaming) or the number of ranks; all rows of one event share its
  split. With ``entry`` alone, the entries at the same place in different files share a
  split, and re-writing the files into other shards moves rows between splits; event
  numbers do not.
- ``file``: whole files, ordered by a hash of their names (without the directory) and cut
  at the fractions of the number of files (at least one file each for validation and test):
  independent of the file order, but adding or removing a file can move others.

The fractions of ``hash`` are met on average (a binomial draw per row), those of ``rows``
exactly, those of ``file`` in numbers of files.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePath

import numpy as np

from project.contract import ContractError
from project.data.columnar import ColumnarData

SPLITS = ("train", "val", "test")
SPLIT_BY = ("rows", "hash", "file")
ENTRY = "entry"  # ``ColumnarData.ids["entry"]``: every source gives it

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _mix(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser, element-wise on uint64 (wrapping arithmetic)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def split_rows(n_rows: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split ``range(n_rows)`` into disjoint index arrays, one per fraction, shuffled by ``seed``
    (``split_by=rows``).

    The same ``(n_rows, fractions, seed)`` always gives the same split; each part is sorted so
    evaluation batches keep the source's row order.
    """
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.ndim != 1 or np.any(fractions <= 0) or abs(fractions.sum() - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be positive and sum to 1, got {fractions.tolist()}")
    order = np.random.default_rng(seed).permutation(n_rows)
    bounds = np.round(np.cumsum(fractions) * n_rows).astype(np.int64)
    bounds[-1] = n_rows
    return [np.sort(part) for part in np.split(order, bounds[:-1])]


def _name_hash(file: str, seed: int) -> int:
    name = PurePath(file).name or file
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little")


@dataclass(frozen=True)
class Splitting:
    """How rows are assigned to the splits (see the module docstring).

    Parameters
    ----------
    by
        ``rows``, ``hash`` or ``file``.
    fractions
        Train, validation and test fractions, positive and summing to 1.
    seed
        Seed of the assignment.
    ids
        With ``hash``: the identifier columns hashed (``entry`` or stored columns).
    """

    by: str = "rows"
    fractions: tuple[float, float, float] = (0.7, 0.15, 0.15)
    seed: int = 42
    ids: tuple[str, ...] = (ENTRY,)

    def __post_init__(self) -> None:
        if self.by not in SPLIT_BY:
            raise ContractError(f"data.split_by must be one of {list(SPLIT_BY)}, got {self.by!r}")
        fractions = np.asarray(self.fractions, dtype=np.float64)
        if fractions.shape != (3,) or np.any(fractions <= 0) or abs(fractions.sum() - 1) > 1e-6:
            raise ContractError(
                f"split fractions must be positive and sum to 1, got {list(self.fractions)} "
                "(train, validation, test), for instance data.split=[0.7,0.15,0.15]"
            )
        ids = (self.ids,) if isinstance(self.ids, str) else tuple(self.ids)
        if not ids or not all(isinstance(i, str) and i for i in ids):
            raise ContractError(
                f"data.split_ids must name identifier columns (e.g. [run, luminosityBlock, "
                f"event], or [entry]), got {self.ids!r}"
            )
        object.__setattr__(self, "ids", ids)
        object.__setattr__(self, "fractions", tuple(float(f) for f in fractions))

    @property
    def stored_ids(self) -> list[str]:
        """The identifier columns a source must read (``TableSpec(ids=...)``): those hashed
        other than ``entry``, which every table has."""
        return [i for i in self.ids if i != ENTRY] if self.by == "hash" else []

    def describe(self) -> str:
        """The assignment in messages."""
        what = {"rows": "rows of the loaded table", "file": "whole files"}
        return what.get(self.by, f"a hash of {list(self.ids)}") + f", seed {self.seed}"

    def file_splits(self, files: Sequence[str]) -> dict[str, int]:
        """With ``by="file"``: the split index (0 train, 1 val, 2 test) of each file.

        Raises ``ContractError`` for fewer than three files.
        """
        n = len(files)
        if n < 3:
            raise ContractError(
                f"data.split_by=file needs at least three files (one per split), got {n}: "
                f"{list(files)}; use data.split_by=hash"
            )
        order = sorted(files, key=lambda f: (_name_hash(f, self.seed), f))
        n_val = max(1, round(self.fractions[1] * n))
        n_test = max(1, round(self.fractions[2] * n))
        n_train = n - n_val - n_test
        if n_train < 1:
            raise ContractError(
                f"data.split_by=file: {n} files leave none for training with fractions "
                f"{list(self.fractions)}; use more files or data.split_by=hash"
            )
        index = np.repeat([0, 1, 2], [n_train, n_val, n_test])
        return {f: int(k) for f, k in zip(order, index, strict=True)}

    def row_splits(self, part: ColumnarData, file_split: int | None = None) -> np.ndarray:
        """The split index of every row of ``part`` ``(n_rows,)`` int8, for ``hash`` (from its
        ids) or ``file`` (``file_split``, the part's file's index)."""
        if self.by == "file":
            if file_split is None:
                raise ValueError("split_by=file needs the part's file's split")
            return np.full(len(part), file_split, dtype=np.int8)
        if self.by != "hash":
            raise ValueError(f"split_by={self.by} assigns rows of a whole table, not of a part")
        h = _mix(np.full(len(part), self.seed, dtype=np.uint64))
        for name in self.ids:
            values = part.ids[name]
            if values.dtype.kind not in "iub":
                raise ContractError(
                    f"{part.source}: split identifier {name!r} holds {values.dtype} values; "
                    "data.split_ids takes integer columns (run, luminosityBlock, event, entry)"
                )
            h = _mix(h ^ values.astype(np.uint64))
        uniform = (h >> np.uint64(11)).astype(np.float64) * 2.0**-53
        edges = np.cumsum(self.fractions)[:-1]
        return np.searchsorted(edges, uniform, side="right").astype(np.int8)
