"""Column expressions and the table builder shared by every source.

The contract declares each value as an expression over the names of stored columns (ROOT
branches, Parquet columns, HDF5 fields): a bare name (``Jet_pt``) or a Python expression over
names and the functions in ``FUNCTIONS`` (``abs(Jet_hadronFlavour) == 5``,
``hypot(MET_px, MET_py)``). Expressions are evaluated once per chunk on whole arrays (numpy for
per-event values, awkward for jagged ones), never per row. ``and``/``or``/``not`` and chained
comparisons (``0 < x < 1``) are rewritten to their element-wise forms, because Python's own
versions ask an array for a single truth value.

``TableSpec`` holds what to build (from the contract, plus the training-side weight);
``TableSpec.bind`` checks it against one file's columns and says which columns to read;
``Binding.build`` turns the arrays of one chunk into a ``ColumnarData`` part; ``assemble``
joins the parts and checks that the selection kept rows.
"""

from __future__ import annotations

import ast
import difflib
import glob
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import awkward as ak
import numpy as np

from project.contract import ContractError, Feature, InputContract
from project.data.columnar import ColumnarData, Jagged, gather_objects


class MissingFileError(ContractError, FileNotFoundError):
    """A declared input file does not exist (catchable as ``FileNotFoundError`` too)."""


def _over_objects(reducer: Any) -> Any:
    # Reductions run over the objects of each row (the innermost axis), never over all rows.
    def reduce(x: Any) -> Any:
        return reducer(x, axis=-1)

    return reduce


_UFUNCS = (
    "abs", "sqrt", "log", "log10", "log1p", "log2", "exp", "expm1", "sin", "cos", "tan",
    "arcsin", "arccos", "arctan", "arctan2", "sinh", "cosh", "tanh", "arcsinh", "arccosh",
    "arctanh", "hypot", "minimum", "maximum", "sign", "floor", "ceil", "isnan", "isfinite",
    "logical_and", "logical_or", "logical_not",
)  # fmt: skip
# numpy ufuncs act on numpy and awkward arrays alike; the reductions act per row.
FUNCTIONS: dict[str, Any] = {
    **{name: getattr(np, name) for name in _UFUNCS},
    "where": ak.where,
    "clip": lambda x, lo, hi: np.minimum(np.maximum(x, lo), hi),
    "num": lambda x: ak.num(x, axis=1),
    "sum": _over_objects(ak.sum),
    "any": _over_objects(ak.any),
    "all": _over_objects(ak.all),
    "pi": np.pi,
}
# Targets of the rewritten and/or/not: names no column or function can take.
_LOGIC = {"__and": np.logical_and, "__or": np.logical_or, "__not": np.logical_not}
_FORBIDDEN = (
    ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp, ast.NamedExpr,
    ast.Await, ast.Yield, ast.YieldFrom,
)  # fmt: skip


class _Elementwise(ast.NodeTransformer):
    """Rewrite ``and``/``or``/``not`` and chained comparisons into element-wise calls."""

    @staticmethod
    def _fold(name: str, values: list[ast.expr]) -> ast.expr:
        out = values[0]
        for value in values[1:]:
            out = ast.Call(func=ast.Name(name, ast.Load()), args=[out, value], keywords=[])
        return out

    def visit_BoolOp(self, node: ast.BoolOp) -> ast.expr:
        self.generic_visit(node)
        return self._fold("__and" if isinstance(node.op, ast.And) else "__or", node.values)

    def visit_UnaryOp(self, node: ast.UnaryOp) -> ast.expr:
        self.generic_visit(node)
        if isinstance(node.op, ast.Not):
            return ast.Call(func=ast.Name("__not", ast.Load()), args=[node.operand], keywords=[])
        return node

    def visit_Compare(self, node: ast.Compare) -> ast.expr:
        self.generic_visit(node)
        if len(node.ops) == 1:
            return node
        lefts = [node.left, *node.comparators[:-1]]
        parts: list[ast.expr] = [
            ast.Compare(left=left, ops=[op], comparators=[right])
            for left, op, right in zip(lefts, node.ops, node.comparators, strict=True)
        ]
        return self._fold("__and", parts)


class Expression:
    """One declared value: a stored column's name, or a Python expression over column names.

    Parameters
    ----------
    text
        The column name or expression as written in the config.
    what
        What it declares (``"label"``, ``"flat column 'jet_pt'"``), used in error messages.
    """

    def __init__(self, text: str | float, what: str) -> None:
        if isinstance(text, (int, float)) and not isinstance(text, bool):
            text = repr(text)
        if not isinstance(text, str) or not text.strip():
            raise ContractError(f"{what}: expected a column name or an expression, got {text!r}")
        self.text, self.what = text.strip(), what
        self._tree: ast.Expression | None = None
        self._syntax: str | None = None
        self._code: Any = None
        try:
            self._tree = ast.parse(self.text, mode="eval")
        except SyntaxError as err:
            # Not fatal yet: a stored column may have a name that is no Python identifier.
            self._syntax = err.msg
            return
        for node in ast.walk(self._tree):
            bad = isinstance(node, _FORBIDDEN)
            bad |= isinstance(node, ast.Name) and node.id.startswith("__")
            bad |= isinstance(node, ast.Attribute) and node.attr.startswith("_")
            if bad:
                raise ContractError(
                    f"{what} = {self.text!r}: {type(node).__name__} is not allowed; use names, "
                    "numbers, operators and the functions " + ", ".join(sorted(FUNCTIONS))
                )

    def __getstate__(self) -> dict[str, Any]:
        # The compiled code cannot be pickled (DataLoader workers started by ``spawn`` get a
        # pickled copy); it is compiled again on first use.
        return {**self.__dict__, "_code": None}

    def columns(self, available: Collection[str], where: str, kind: str = "column") -> list[str]:
        """The stored columns this expression reads, checked against ``available``.

        Parameters
        ----------
        available
            Column names of the file.
        where
            The file (and tree) for messages.
        kind
            What a column is called there (``"branch"``, ``"column"``).

        Returns
        -------
        list of str
            The names the expression reads, sorted.

        Raises
        ------
        ContractError
            For an unknown column (listing close matches), an unknown function or a syntax error.
        """
        if self.text in available:
            return [self.text]
        if self._tree is None:
            raise ContractError(
                f"{self.what} = {self.text!r} is neither a {kind} of {where} nor a valid "
                f"expression ({self._syntax})"
            )
        called = {
            n.func.id
            for n in ast.walk(self._tree)
            if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)
        }
        used = []
        names = {n.id for n in ast.walk(self._tree) if isinstance(n, ast.Name)}
        for name in sorted(names):
            if name in available:
                used.append(name)
            elif name in called and name not in FUNCTIONS:
                raise ContractError(
                    f"{self.what} = {self.text!r}: unknown function {name!r}; available: "
                    + ", ".join(sorted(FUNCTIONS))
                )
            elif name not in FUNCTIONS:
                close = difflib.get_close_matches(name, list(available), n=5, cutoff=0.6)
                raise ContractError(
                    f"{self.what} = {self.text!r}: {kind} {name!r} does not exist in {where}; "
                    f"close matches: {close or 'none'}"
                )
        return used

    def evaluate(self, arrays: Mapping[str, Any], where: str) -> Any:
        """Evaluate over ``arrays`` (column name -> array), whole arrays at once.

        Returns a numpy or awkward array (or a scalar for a constant). A failure is re-raised as
        ``ContractError`` showing ``where``, the expression and the original error.
        """
        if self.text in arrays:
            return arrays[self.text]
        if self._code is None:
            tree = ast.fix_missing_locations(_Elementwise().visit(self._tree))
            self._code = compile(tree, f"<{self.what}>", "eval")
        namespace = {"__builtins__": {}, **FUNCTIONS, **_LOGIC, **arrays}
        try:
            return eval(self._code, namespace)  # builtins are off: only columns and FUNCTIONS
        except Exception as err:
            message = str(err).strip().splitlines()[0] if str(err).strip() else ""
            raise ContractError(
                f"{where}: {self.what} = {self.text!r} could not be evaluated: "
                f"{type(err).__name__}: {message}"
            ) from err


def _depth(value: Any) -> int:
    """0 for a scalar, 1 for one value per row, 2 for a list per row, and so on."""
    if isinstance(value, ak.Array):
        return value.ndim
    return np.ndim(value)


def _numeric(value: Any, what: str) -> np.ndarray:
    """A plain numeric or boolean numpy array, or a ``ContractError`` saying what it is."""
    if isinstance(value, ak.Array):
        try:
            arr = ak.to_numpy(value, allow_missing=False)
        except Exception as err:
            raise ContractError(
                f"{what} has type {value.type}, which is not a plain array of numbers "
                f"(missing values or records?): {type(err).__name__}"
            ) from err
    else:
        arr = np.asarray(value)
    if arr.dtype.kind not in "biuf":
        raise ContractError(f"{what} holds {arr.dtype} values; expected numbers or booleans")
    return arr


NAN_POLICIES = ("raise", "drop")


class TableSpec:
    """What to build from a source: the contract's columns, labels, selection and rows, plus
    the training-side event weight and any identifier columns to carry along.

    Parameters
    ----------
    contract
        The input contract: each feature's ``expr``, the jagged collections (with their
        optional ``counts`` column), ``per_object``, ``selection``, ``label`` and the regression
        targets' expressions.
    weight
        Expression for each row's event weight (``genWeight * xsec / sum_w``); ``None`` gives
        unit weights. Negative weights are allowed.
    ids
        Stored columns copied to ``ColumnarData.ids`` as they are (event identifiers).
    labels
        Build labels and regression targets (training); ``False`` for scoring, where the truth
        may not exist.
    apply_selection
        Apply the contract's selection; ``False`` keeps every row (scoring).
    nan_policy
        ``"raise"``: NaN or Inf in a feature, target or weight is an error naming the file,
        the column and the count; ``"drop"``: such rows are dropped (and counted in
        ``ColumnarData.dropped``).
    """

    def __init__(
        self,
        contract: InputContract,
        weight: str | None = None,
        ids: Sequence[str] = (),
        labels: bool = True,
        apply_selection: bool = True,
        nan_policy: str = "raise",
    ) -> None:
        if nan_policy not in NAN_POLICIES:
            raise ContractError(f"nan_policy must be one of {NAN_POLICIES}, got {nan_policy!r}")
        self.contract = contract
        self.flat = {
            f.name: (f, Expression(f.expr, f"flat column {f.name!r}")) for f in contract.flat
        }
        self.jagged: dict[str, dict[str, tuple[Feature, Expression]]] = {
            c.name: {f.name: (f, Expression(f.expr, f"field {c.name}.{f.name}")) for f in c.fields}
            for c in contract.jagged
        }
        self.counts = {
            c.name: Expression(c.counts, f"counts of collection {c.name!r}")
            for c in contract.jagged
            if c.counts is not None
        }
        self.label = (
            Expression(contract.label, "label") if labels and contract.label is not None else None
        )
        self.targets = (
            {
                t.name: Expression(t.expr, f"regression target {t.name!r}")
                for t in contract.regression
            }
            if labels
            else {}
        )
        self.weight = None if weight is None else Expression(weight, "weight")
        selection = contract.selection if apply_selection else None
        self.selection = None if selection is None else Expression(selection, "selection")
        self.per_object = contract.per_object
        self.ids = list(ids)
        self.nan_policy = nan_policy

    def expressions(self) -> list[Expression]:
        """Every expression to evaluate."""
        out = [e for _, e in self.flat.values()]
        out += [e for fields in self.jagged.values() for _, e in fields.values()]
        out += [*self.counts.values(), *self.targets.values()]
        return out + [e for e in (self.label, self.weight, self.selection) if e is not None]

    @property
    def unit(self) -> str:
        """What one row is, for messages."""
        return "rows" if self.per_object is None else f"rows ({self.per_object} objects)"

    def bind(
        self, available: Sequence[str], jagged_columns: Collection[str], where: str, kind: str
    ) -> Binding:
        """Check the declarations against one file's columns; say which columns to read.

        Parameters
        ----------
        available
            Column names of the file, in stored order.
        jagged_columns
            Those holding a list per event; with ``per_object`` the rows are counted from one
            of them named ``<prefix>_*`` (preferably one the expressions read anyway).
        where, kind
            The file for messages, and what its columns are called (``"branch"``).

        Returns
        -------
        Binding
            The columns to read and how to build table parts from them.
        """
        names = set(available)
        columns = {c for e in self.expressions() for c in e.columns(names, where, kind)}
        for name in self.ids:
            if name not in names:
                raise ContractError(
                    f"{where}: identifier {kind} {name!r} does not exist; "
                    f"close matches: {difflib.get_close_matches(name, list(names), n=5) or 'none'}"
                )
            columns.add(name)
        reference = None
        if self.per_object is not None:
            prefix = f"{self.per_object}_"
            candidates = [c for c in available if c.startswith(prefix) and c in jagged_columns]
            if not candidates:
                prefixes = sorted({c.split("_", 1)[0] for c in jagged_columns if "_" in c})
                raise ContractError(
                    f"per_object = {self.per_object!r}: {where} has no jagged {kind} whose name "
                    f"starts with {prefix!r}; prefixes of its jagged collections: {prefixes}"
                )
            # Prefer a column read anyway; otherwise read one more to count the objects.
            reference = next((c for c in candidates if c in columns), candidates[0])
            columns.add(reference)
        if not columns:
            raise ContractError(f"{where}: the declared expressions read no {kind}s")
        return Binding(self, sorted(columns), reference, where)


@dataclass
class Binding:
    """A ``TableSpec`` checked against one file: the columns to read and how to count rows."""

    spec: TableSpec
    columns: list[str]
    reference: str | None
    where: str

    def build(self, arrays: Mapping[str, Any], start: int = 0) -> tuple[ColumnarData, int]:
        """One chunk's arrays to a table part.

        Per event, a flat value must be one number per event. Per object, values with one
        number per object of the ``per_object`` collection are flattened and per-event values
        are repeated for each object of their event. Jagged collections are built per event (a
        row then carries its event's collection).

        Parameters
        ----------
        arrays
            Column name -> array with events along the first axis, for ``self.columns``.
        start
            The chunk's first entry in its file: rows record their event's entry number
            (``ids["entry"]``) and messages name entries.

        Returns
        -------
        tuple of (ColumnarData, int)
            The part, and its number of rows before the selection.
        """
        spec, where = self.spec, self.where
        n_events = len(arrays[self.columns[0]])
        counts = None
        row_event = np.arange(n_events)
        if self.reference is not None:
            counts = _numeric(ak.num(arrays[self.reference], axis=1), self.reference)
            counts = counts.astype(np.int64)
            row_event = np.repeat(row_event, counts)
        n_rows = len(row_event)
        chunk = f"{where} (entries {start}-{start + n_events})"

        def rows(expr: Expression) -> np.ndarray:
            value = expr.evaluate(arrays, where)
            depth = _depth(value)
            what = f"{where}: {expr.what} = {expr.text!r}"
            if depth == 0:
                return np.full(n_rows, value)
            if depth == 1:
                return _numeric(value, what)[row_event]
            if depth == 2 and counts is None:
                hint = (
                    "declare it under `jagged`"
                    if any(expr is e for _, e in spec.flat.values())
                    else "reduce it per event with any(), all(), sum() or num()"
                )
                raise ContractError(
                    f"{what} is jagged (a variable number of values per event): {hint}, or set "
                    "`per_object` to make one row per object"
                )
            if depth == 2:
                n = _numeric(ak.num(value, axis=1), what)
                if not np.array_equal(n, counts):
                    raise ContractError(
                        f"{what} has a different number of values per event than the "
                        f"{spec.per_object} objects (the rows, counted from "
                        f"{self.reference!r}): it belongs to another collection; declare it "
                        "under `jagged` as a collection of its own"
                    )
                return _numeric(ak.flatten(value, axis=1), what)
            raise ContractError(f"{what} is nested {depth} levels deep; expected 1 or 2")

        keep = np.ones(n_rows, dtype=bool)
        if spec.selection is not None:
            mask = rows(spec.selection)
            if mask.dtype != np.bool_:
                raise ContractError(
                    f"{where}: selection = {spec.selection.text!r} gives {mask.dtype} values; "
                    "expected booleans (a comparison such as `Jet_pt > 20`)"
                )
            keep &= mask
        flat = {
            name: _feature(feat, rows(expr), f"{where}: flat column {name!r} = {expr.text!r}")
            for name, (feat, expr) in spec.flat.items()
        }
        labels = None if spec.label is None else self._labels(rows(spec.label))
        targets = {
            name: _floats(rows(expr), f"{where}: {expr.what} = {expr.text!r}")
            for name, expr in spec.targets.items()
        }
        weights = None
        if spec.weight is not None:
            weights = _floats(rows(spec.weight), f"{where}: weight = {spec.weight.text!r}")
        ids = {name: _numeric(arrays[name], name)[row_event] for name in spec.ids}
        ids["entry"] = start + row_event
        jagged = {
            cname: self._collection(cname, fields, arrays, start)
            for cname, fields in spec.jagged.items()
        }
        # Non-finite values: per row of this chunk, in the features it sees, targets, weights.
        finite = np.ones(n_rows, dtype=bool)
        checked: list[tuple[str, np.ndarray, np.ndarray]] = []
        for name, values in flat.items():
            checked.append((f"flat column {name!r}", values, np.isfinite(values)))
        for name, values in targets.items():
            checked.append((f"regression target {name!r}", values, np.isfinite(values)))
        if weights is not None:
            checked.append(("weight", weights, np.isfinite(weights)))
        for cname, coll in jagged.items():
            owner = np.repeat(np.arange(n_events), coll.counts)
            for fname, values in coll.fields.items():
                ok = np.isfinite(values)
                per_event = np.ones(n_events, dtype=bool)
                per_event[owner[~ok]] = False
                checked.append((f"field {cname}.{fname}", values, per_event[row_event]))
        for what, values, ok in checked:
            if ok.all():
                continue
            if spec.nan_policy == "raise":
                bad = ~np.isfinite(values)
                raise ContractError(
                    f"{chunk}: {what} has {int(np.isnan(values).sum())} NaN and "
                    f"{int(bad.sum() - np.isnan(values).sum())} Inf values (first at entry "
                    f"{start + int(row_event[np.flatnonzero(~ok)[0]])}); fix the input, or set "
                    "data.nan_policy=drop to drop those rows"
                )
            finite &= ok
        keep &= finite
        dropped = int(n_rows - finite.sum())
        kept = np.flatnonzero(keep)
        kept_events = row_event[kept]
        part = ColumnarData(
            flat={k: v[kept] for k, v in flat.items()},
            jagged={k: _gather(v, kept_events) for k, v in jagged.items()},
            labels=None if labels is None else labels[kept],
            source=where,
            weights=None if weights is None else weights[kept],
            targets={k: v[kept] for k, v in targets.items()},
            ids={k: v[kept] for k, v in ids.items()},
            dropped=dropped,
        )
        return part, n_rows

    def _labels(self, values: np.ndarray) -> np.ndarray:
        text = self.spec.label.text
        if values.dtype.kind not in "biu":
            raise ContractError(
                f"{self.where}: label = {text!r} gives {values.dtype} values; expected integer "
                "class indices or booleans (for instance `abs(Jet_hadronFlavour) == 5`)"
            )
        if values.dtype.kind == "i" and len(values) and values.min() < 0:
            raise ContractError(
                f"{self.where}: label = {text!r} gives negative values (minimum "
                f"{values.min()}); class indices start at 0 (wrap it, e.g. `abs(...)` or `x == k`)"
            )
        return values.astype(np.int64)

    def _collection(
        self,
        cname: str,
        fields: Mapping[str, tuple[Feature, Expression]],
        arrays: Mapping[str, Any],
        start: int,
    ) -> Jagged:
        counts, first, values = None, "", {}
        for fname, (feat, expr) in fields.items():
            value = expr.evaluate(arrays, self.where)
            what = f"{self.where}: {expr.what} = {expr.text!r}"
            depth = _depth(value)
            if depth != 2:
                shape = "one value per event" if depth < 2 else f"nested {depth} levels deep"
                raise ContractError(
                    f"{what} is not jagged ({shape}); a jagged field needs a list per event "
                    "(declare per-event values under `flat`)"
                )
            n = _numeric(ak.num(value, axis=1), what).astype(np.int64)
            if counts is None:
                counts, first = n, fname
            elif not np.array_equal(n, counts):
                i = int(np.flatnonzero(n != counts)[0])
                raise ContractError(
                    f"{self.where}: the fields of collection {cname!r} have different numbers of "
                    f"objects: {first!r} has {counts[i]} and {fname!r} has {n[i]} in entry "
                    f"{start + i}; all fields of one collection must come from one collection"
                )
            values[fname] = _feature(feat, _numeric(ak.flatten(value, axis=1), what), what)
        declared = self.spec.counts.get(cname)
        if declared is not None:
            stored = _numeric(declared.evaluate(arrays, self.where), declared.what)
            if stored.shape != counts.shape or not np.array_equal(stored, counts):
                i = int(np.flatnonzero(stored != counts)[0]) if stored.shape == counts.shape else 0
                raise ContractError(
                    f"{self.where}: counts = {declared.text!r} of collection {cname!r} does not "
                    f"match its fields ({first!r}): entry {start + i} has "
                    f"{stored[i] if stored.shape == counts.shape else stored.shape} against "
                    f"{counts[i]} objects; the counts column belongs to another collection"
                )
        return Jagged.from_counts(counts, values)


def _floats(values: np.ndarray, what: str) -> np.ndarray:
    """A target or weight as float32 (numbers and booleans only)."""
    if values.dtype.kind not in "biuf":
        raise ContractError(f"{what} gives {values.dtype} values; expected numbers")
    return np.ascontiguousarray(values, dtype=np.float32)


def _feature(feat: Feature, values: np.ndarray, what: str) -> np.ndarray:
    """A feature's values as float32; booleans only where the contract declares them."""
    if values.dtype == np.bool_ and not feat.boolean:
        raise ContractError(
            f"{what} gives booleans: declare the feature with `boolean: true` if a 0/1 flag is "
            "meant, or give an expression with numbers"
        )
    return _floats(values, what)


def _gather(coll: Jagged, events: np.ndarray) -> Jagged:
    """The collection of each row's event, rows given as event indices."""
    offsets, objects = gather_objects(coll.offsets, events)
    return Jagged(offsets, {k: v[objects] for k, v in coll.fields.items()})


def assemble(
    parts: Iterable[tuple[ColumnarData, int]], spec: TableSpec, source: str
) -> ColumnarData:
    """Join the parts of ``Binding.build`` into one validated table named ``source``.

    Raises ``ContractError`` when there is nothing to read or the selection kept no row.
    """
    parts = list(parts)
    before = sum(n for _, n in parts)
    check_kept(before, sum(len(p) for p, _ in parts), spec, source)
    data = ColumnarData.concatenate([p for p, _ in parts])
    data.source = source
    return data.validate()


def check_kept(before: int, kept: int, spec: TableSpec, source: str) -> None:
    """Raise ``ContractError`` when ``source`` had no rows (``before``, rows before the
    selection) or the selection and NaN policy kept none (``kept``)."""
    if before == 0:
        raise ContractError(f"{source}: no {spec.unit} to read (empty files or trees)")
    if kept == 0:
        what = (
            f"selection = {spec.selection.text!r}"
            if spec.selection is not None
            else "the NaN policy"
        )
        raise ContractError(
            f"{source}: {what} keeps none of the {before} {spec.unit}; loosen it or check the "
            "columns it uses"
        )


def resolve_files(files: str | Sequence[str], kind: str) -> list[str]:
    """The declared file list, with glob patterns expanded; every local file must exist.

    Parameters
    ----------
    files
        A path, a glob pattern, or a sequence of them (URLs with ``://`` are passed through).
    kind
        The format for messages (``"ROOT"``).

    Raises
    ------
    MissingFileError
        Naming the first path that does not exist and matches no file.
    """
    if isinstance(files, (str, Path)):
        files = [files]
    if not isinstance(files, Sequence) or not files:
        raise ContractError(f"files: expected a path or a non-empty list of paths, got {files!r}")
    out: list[str] = []
    for f in map(str, files):
        if "://" in f or Path(f).is_file():  # remote URLs are left to the reader
            out.append(f)
            continue
        matches = sorted(glob.glob(f)) if glob.has_magic(f) else []
        if not matches:
            raise MissingFileError(
                f"{kind} file {f!r} does not exist (absolute: {Path(f).absolute()}); check the "
                "path and the `paths` config (paths.shared_data_dir, paths.data_dir)"
            )
        out += matches
    return out


def describe(files: Sequence[str]) -> str:
    """A short readable name of a file list for messages and ``ColumnarData.source``."""
    return files[0] if len(files) == 1 else f"{files[0]} (+{len(files) - 1} more)"
