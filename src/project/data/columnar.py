"""An in-memory Structure-of-Arrays table: the one form every source produces.

Flat columns are 1-D arrays of length ``n_rows``; a jagged collection is ``offsets``
(``(n_rows + 1,)`` int64) plus one 1-D array per field of length ``offsets[-1]``. Nothing here
loops over rows in Python: selections and batches are index gathers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from project.contract import ContractError, InputContract


@dataclass
class Jagged:
    """One jagged collection: ``offsets`` ``(n_rows + 1,)`` int64 and field arrays ``(n_objects,)``."""

    offsets: np.ndarray
    fields: dict[str, np.ndarray]

    @property
    def counts(self) -> np.ndarray:
        """Number of objects per row, ``(n_rows,)``."""
        return np.diff(self.offsets)

    @classmethod
    def from_counts(cls, counts: np.ndarray, fields: dict[str, np.ndarray]) -> Jagged:
        """Build from per-row counts instead of offsets."""
        offsets = np.zeros(len(counts) + 1, dtype=np.int64)
        np.cumsum(counts, out=offsets[1:])
        return cls(offsets=offsets, fields=fields)


@dataclass
class ColumnarData:
    """A SoA table: flat columns, jagged collections, and what training needs beside them.

    ``labels`` are integer class indices, ``targets`` the regression targets' true values
    (float32, physical units), ``weights`` the event weights (float32; ``None`` means 1).
    ``ids`` holds identifier columns carried along untouched: ``entry`` (the entry number of
    each row's event in its file) and any requested event identifiers. ``source`` is a
    human-readable origin (a file path, a generator's settings) used in errors; ``dropped``
    counts rows dropped for non-finite values.
    """

    flat: dict[str, np.ndarray] = field(default_factory=dict)
    jagged: dict[str, Jagged] = field(default_factory=dict)
    labels: np.ndarray | None = None
    source: str = "<memory>"
    weights: np.ndarray | None = None
    targets: dict[str, np.ndarray] = field(default_factory=dict)
    ids: dict[str, np.ndarray] = field(default_factory=dict)
    dropped: int = 0

    def __len__(self) -> int:
        if self.flat:
            return len(next(iter(self.flat.values())))
        if self.jagged:
            return len(next(iter(self.jagged.values())).offsets) - 1
        return 0 if self.labels is None else len(self.labels)

    def nbytes(self) -> int:
        """Memory the arrays occupy."""
        arrays = [*self.flat.values(), *self.targets.values(), *self.ids.values()]
        for coll in self.jagged.values():
            arrays += [coll.offsets, *coll.fields.values()]
        arrays += [a for a in (self.labels, self.weights) if a is not None]
        return sum(a.nbytes for a in arrays)

    def _per_row(self) -> dict[str, np.ndarray]:
        out = {f"column {k!r}": v for k, v in self.flat.items()}
        out.update({f"target {k!r}": v for k, v in self.targets.items()})
        out.update({f"id {k!r}": v for k, v in self.ids.items()})
        if self.labels is not None:
            out["labels"] = self.labels
        if self.weights is not None:
            out["weights"] = self.weights
        return out

    def validate(self) -> ColumnarData:
        """Check shapes and offsets; raise ``ContractError`` naming the offending column."""
        n = len(self)
        for name, col in self._per_row().items():
            if col.ndim != 1 or len(col) != n:
                raise ContractError(
                    f"{self.source}: {name} has shape {col.shape}, expected ({n},) like the flat "
                    "columns"
                )
        for cname, coll in self.jagged.items():
            off = coll.offsets
            if off.ndim != 1 or len(off) != n + 1:
                raise ContractError(
                    f"{self.source}: collection {cname!r} offsets have shape {off.shape}, "
                    f"expected ({n + 1},)"
                )
            if len(off) and (off[0] != 0 or np.any(np.diff(off) < 0)):
                raise ContractError(
                    f"{self.source}: collection {cname!r} offsets must start at 0 and never decrease"
                )
            total = int(off[-1]) if len(off) else 0
            for fname, arr in coll.fields.items():
                if arr.ndim != 1 or len(arr) != total:
                    raise ContractError(
                        f"{self.source}: field {cname}.{fname} has shape {arr.shape}, expected "
                        f"({total},) = offsets[-1]"
                    )
        return self

    def take(self, rows: np.ndarray) -> ColumnarData:
        """Rows ``rows`` (an index array) as a new table; jagged objects are gathered along."""
        rows = np.asarray(rows, dtype=np.int64)
        jagged = {}
        for cname, coll in self.jagged.items():
            offsets, obj = gather_objects(coll.offsets, rows)
            jagged[cname] = Jagged(offsets, {k: v[obj] for k, v in coll.fields.items()})
        return ColumnarData(
            flat={k: v[rows] for k, v in self.flat.items()},
            jagged=jagged,
            labels=None if self.labels is None else self.labels[rows],
            source=self.source,
            weights=None if self.weights is None else self.weights[rows],
            targets={k: v[rows] for k, v in self.targets.items()},
            ids={k: v[rows] for k, v in self.ids.items()},
        )

    @staticmethod
    def concatenate(parts: list[ColumnarData]) -> ColumnarData:
        """Stack tables with the same columns row-wise."""
        if not parts:
            raise ValueError("nothing to concatenate")
        first = parts[0]
        if len(parts) == 1:
            return first
        jagged = {}
        for cname, coll in first.jagged.items():
            counts = np.concatenate([p.jagged[cname].counts for p in parts])
            fields = {
                f: np.concatenate([p.jagged[cname].fields[f] for p in parts]) for f in coll.fields
            }
            jagged[cname] = Jagged.from_counts(counts, fields)

        def joined(get: object) -> np.ndarray | None:
            arrays = [get(p) for p in parts]  # type: ignore[operator]
            return None if arrays[0] is None else np.concatenate(arrays)

        return ColumnarData(
            flat={k: np.concatenate([p.flat[k] for p in parts]) for k in first.flat},
            jagged=jagged,
            labels=joined(lambda p: p.labels),
            source=first.source,
            weights=joined(lambda p: p.weights),
            targets={k: np.concatenate([p.targets[k] for p in parts]) for k in first.targets},
            ids={k: np.concatenate([p.ids[k] for p in parts]) for k in first.ids},
            dropped=sum(p.dropped for p in parts),
        )

    @classmethod
    def from_soa(cls, columns: dict[str, np.ndarray], contract: InputContract) -> ColumnarData:
        """The table of the deployed graph's inputs ``columns`` (as ``to_soa`` gives them, e.g.
        an export's golden rows), the inverse of ``to_soa``; other columns are left out. The
        arrays are taken as they are (``validate`` checks them)."""
        jagged = {
            coll.name: Jagged(
                columns[coll.offsets_name],
                {f.name: columns[coll.field_input_name(f.name)] for f in coll.fields},
            )
            for coll in contract.jagged
        }
        return cls(flat={name: columns[name] for name in contract.flat_names}, jagged=jagged)

    def to_soa(self, contract: InputContract) -> dict[str, np.ndarray]:
        """The deployed graph's inputs by name (see ``InputContract.input_names``)."""
        out = {name: self.flat[name] for name in contract.flat_names}
        for coll in contract.jagged:
            out[coll.offsets_name] = self.jagged[coll.name].offsets
            for f in coll.fields:
                out[coll.field_input_name(f.name)] = self.jagged[coll.name].fields[f.name]
        return out


def gather_objects(
    offsets: np.ndarray, rows: np.ndarray, max_length: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Offsets and object indices of ``rows`` of a jagged collection, vectorised.

    Returns ``(new_offsets, object_index)`` where ``object_index`` indexes the original field
    arrays. With ``max_length`` only the first ``max_length`` objects of each row are kept.
    """
    starts = offsets[:-1][rows]
    counts = offsets[1:][rows] - starts
    if max_length is not None:
        counts = np.minimum(counts, max_length)
    new_offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum(counts, out=new_offsets[1:])
    total = int(new_offsets[-1])
    obj = np.repeat(starts - new_offsets[:-1], counts) + np.arange(total, dtype=np.int64)
    return new_offsets, obj
