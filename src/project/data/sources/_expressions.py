"""Column expressions and the table builder shared by the file sources (ROOT, Parquet).

A source declares what it wants as expressions over the names of stored columns (ROOT branches,
Parquet columns): a bare name (``Jet_pt``) or a Python expression over names and the functions
in ``FUNCTIONS`` (``abs(Jet_hadronFlavour) == 5``, ``hypot(MET_px, MET_py)``). Expressions are
evaluated once per chunk on whole arrays (numpy for per-event values, awkward for jagged ones),
never per row. ``and``/``or``/``not`` and chained comparisons (``0 < x < 1``) are rewritten to
their element-wise forms, because Python's own versions ask an array for a single truth value.

``TableSpec`` holds a source's declarations; ``TableSpec.bind`` checks them against one file's
columns and says which columns to read; ``Binding.build`` turns the arrays of one chunk into a
``ColumnarData`` part; ``assemble`` joins the parts and checks that the selection kept rows.
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

from project.data.columnar import ColumnarData, Jagged, gather_objects
from project.data.contract import ContractError


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


def _names(value: Any, what: str) -> dict[str, Any]:
    """A YAML ``name -> expression`` mapping, or a list meaning ``name -> name``."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return {str(v): str(v) for v in value}
    raise ContractError(
        f"{what}: expected a mapping name -> expression or a list of names, got {value!r}"
    )


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


class TableSpec:
    """A file source's declarations: flat columns, jagged collections, label, selection, rows.

    Parameters
    ----------
    flat
        Output column name -> stored column or expression; a list means identical names.
    jagged
        Collection name -> {field name -> stored column or expression}; a list of field names
        means the stored columns ``<collection>_<field>``.
    label
        Expression giving the class index of each row (integers >= 0 or booleans).
    selection
        Boolean expression; only rows where it is true are kept.
    per_object
        Collection prefix (``Jet`` for ``Jet_*``): one row per object of that collection instead
        of one row per event; see ``Binding.build``.
    """

    def __init__(
        self,
        flat: Mapping[str, Any] | Sequence[str] | None = None,
        jagged: Mapping[str, Any] | None = None,
        label: str | None = None,
        selection: str | None = None,
        per_object: str | None = None,
    ) -> None:
        self.flat = {
            k: Expression(v, f"flat column {k!r}") for k, v in _names(flat, "flat").items()
        }
        self.jagged: dict[str, dict[str, Expression]] = {}
        if jagged is not None and not isinstance(jagged, Mapping):
            raise ContractError(f"jagged: expected a mapping collection -> fields, got {jagged!r}")
        for cname, fields in (jagged or {}).items():
            pairs = _names(fields, f"jagged collection {cname!r}")
            if isinstance(fields, Sequence):  # the list form names fields, not stored columns
                pairs = {f: f"{cname}_{f}" for f in pairs}
            if not pairs:
                raise ContractError(f"jagged collection {cname!r} declares no fields")
            self.jagged[str(cname)] = {
                f: Expression(e, f"field {cname}.{f}") for f, e in pairs.items()
            }
        if not self.flat and not self.jagged:
            raise ContractError("declare at least one flat column or one jagged collection")
        self.label = None if label is None else Expression(label, "label")
        self.selection = None if selection is None else Expression(selection, "selection")
        self.per_object = None if per_object is None else str(per_object).rstrip("_")

    def expressions(self) -> list[Expression]:
        """Every declared expression."""
        out = [*self.flat.values(), *(e for f in self.jagged.values() for e in f.values())]
        return out + [e for e in (self.label, self.selection) if e is not None]

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
            The chunk's first entry in its file, for messages.

        Returns
        -------
        tuple of (ColumnarData, int)
            The part, and its number of rows before the selection.
        """
        where = self.where
        n_events = len(arrays[self.columns[0]])
        counts = None
        row_event = np.arange(n_events)
        if self.reference is not None:
            counts = _numeric(ak.num(arrays[self.reference], axis=1), self.reference)
            counts = counts.astype(np.int64)
            row_event = np.repeat(row_event, counts)
        n_rows = len(row_event)

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
                    if expr in self.spec.flat.values()
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
                        f"{self.spec.per_object} objects (the rows, counted from "
                        f"{self.reference!r}): it belongs to another collection; declare it "
                        "under `jagged` as a collection of its own"
                    )
                return _numeric(ak.flatten(value, axis=1), what)
            raise ContractError(f"{what} is nested {depth} levels deep; expected 1 or 2")

        keep: slice | np.ndarray = slice(None)
        if self.spec.selection is not None:
            mask = rows(self.spec.selection)
            if mask.dtype != np.bool_:
                raise ContractError(
                    f"{where}: selection = {self.spec.selection.text!r} gives {mask.dtype} values; "
                    "expected booleans (a comparison such as `Jet_pt > 20`)"
                )
            keep = np.flatnonzero(mask)
        flat = {name: rows(expr)[keep] for name, expr in self.spec.flat.items()}
        labels = None if self.spec.label is None else self._labels(rows(self.spec.label))[keep]
        kept_events = row_event[keep]
        jagged = {
            cname: _gather(self._collection(cname, fields, arrays, start), kept_events)
            for cname, fields in self.spec.jagged.items()
        }
        return ColumnarData(flat, jagged, labels, where), n_rows

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
        self, cname: str, fields: Mapping[str, Expression], arrays: Mapping[str, Any], start: int
    ) -> Jagged:
        counts, first, values = None, "", {}
        for fname, expr in fields.items():
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
            values[fname] = _numeric(ak.flatten(value, axis=1), what)
        return Jagged.from_counts(counts, values)


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
    if not parts or before == 0:
        raise ContractError(f"{source}: no {spec.unit} to read (empty files or trees)")
    data = ColumnarData.concatenate([p for p, _ in parts])
    data.source = source
    if len(data) == 0:
        raise ContractError(
            f"{source}: selection = {spec.selection.text!r} keeps none of the {before} "
            f"{spec.unit}; loosen it or check the columns it uses"
        )
    return data.validate()


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
