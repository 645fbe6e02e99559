"""The input contract: what a model consumes and produces, and where each value comes from.

Written once, in the data config, the contract names:

- the flat features (one value per row) and the jagged collections (a variable number of
  objects per row, as offsets plus one flat array per field), each with the expression that
  computes it from the stored columns of a source (a ROOT branch, a Parquet column);
- how rows are formed: one per event, or one per object of a collection (``per_object``),
  the selection, and the label expression;
- the outputs: class labels (``prob_<class>``) and regression targets (``<target>``);
- the preprocessing constants fitted on the training split.

The DataModule, the deployed graph, the inference runtime and the predict job all read this
one object (see DESIGN.md). It round-trips through plain dicts and JSON so it lives in
checkpoint hyperparameters, the export manifest and the ONNX metadata.

This module imports only the standard library: it is the ground floor, read by every layer.
"""

from __future__ import annotations

import json
import keyword
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 2
# The export manifest, the contract of an export directory: its JSON Schema ships beside this
# module (and inside every export), read by the export that writes it and the loaders.
MANIFEST_VERSION = 2
MANIFEST_SCHEMA_FILE = Path(__file__).with_name("manifest.schema.json")
# The files of an export directory that describe it: the manifest, its hash, its schema.
MANIFEST_FILE, MANIFEST_HASH_FILE = "manifest.json", "manifest.sha256"
TRANSFORMS = ("none", "log")
# ``log`` takes the natural log of the value clamped at this floor (momenta, energies).
LOG_FLOOR = 1e-6
FEATURE_DTYPE = "float32"
OFFSETS_DTYPE = "int64"
LOSSES = ("mse", "huber", "l1")
# Symbolic dimensions of the deployed graph's inputs: plain identifiers, so that code
# generators (SOFIE) and shape-inferring consumers can use them as variable names.
DEFAULT_CLASSES = ("background", "signal")
BATCH_DIM = "batch"
OFFSETS_DIM = "batch_plus_1"  # = batch + 1


class ContractError(ValueError):
    """A contract that is inconsistent, or data that does not satisfy it."""


def manifest_schema() -> dict[str, Any]:
    """The JSON Schema of ``manifest.json`` (version ``MANIFEST_VERSION``)."""
    return json.loads(MANIFEST_SCHEMA_FILE.read_text())


# How jagged inputs are read, as the manifest states it for every consumer.
OFFSETS_RULE = (
    "Per jagged collection, <collection>_offsets has batch + 1 non-decreasing int64 entries that "
    "index the field arrays: row i owns elements offsets[i] to offsets[i+1] - 1 of every "
    "<collection>_<field>. Offsets may start at any k >= 0 and the field arrays may be longer "
    "than offsets[-1] (a view of a sub-range of a larger collection gives the same answer as "
    "those rows cut out); offsets[-1] must not exceed the fields' length."
)


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise ContractError(
            f"{what} name {name!r} is not a valid identifier: use letters, digits and '_' "
            "(it becomes an input name of the exported graph and a C++ variable)."
        )


def _optional_text(value: Any, what: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ContractError(f"{what}: expected an expression (text), got {value!r}")
    text = str(value).strip()
    if not text:
        raise ContractError(f"{what}: the expression is empty")
    return text


def _optional_float(value: Any, what: str) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ContractError(f"{what}: expected a number, got {value!r}") from None


def _check_keys(d: dict[str, Any], allowed: set[str], what: str) -> None:
    unknown = set(d) - allowed
    if unknown:
        raise ContractError(f"{what}: unknown keys {sorted(unknown)}; expected {sorted(allowed)}")


@dataclass(frozen=True)
class Feature:
    """One input feature: a flat column or a field of a jagged collection.

    Parameters
    ----------
    name
        Input name (for a jagged field, the field name without the collection prefix).
    transform
        ``"none"`` or ``"log"`` (natural log of the value clamped at ``LOG_FLOOR``), applied
        before standardisation; useful for momenta and energies spanning orders of magnitude.
    mean, scale
        Standardisation constants, ``(transform(x) - mean) / scale``. ``None`` until fitted on
        the training split.
    expr
        Where the values come from: a stored column (``Jet_pt``) or an expression over stored
        columns (``hypot(MET_px, MET_py)``). ``None`` means the default: the feature's own name
        for a flat column, ``<collection>_<field>`` for a jagged field.
    boolean
        The source column holds booleans, taken as 0/1. Without it a boolean column is refused
        (a flag fed where a number was meant is a silent error).
    """

    name: str
    transform: str = "none"
    mean: float | None = None
    scale: float | None = None
    expr: str | None = None
    boolean: bool = False

    def __post_init__(self) -> None:
        _check_name(self.name, "feature")
        if self.transform not in TRANSFORMS:
            raise ContractError(
                f"feature {self.name!r}: unknown transform {self.transform!r}; "
                f"choose one of {TRANSFORMS}"
            )
        if self.scale is not None and not (math.isfinite(self.scale) and self.scale > 0):
            raise ContractError(f"feature {self.name!r}: scale must be finite and > 0")
        if self.mean is not None and not math.isfinite(self.mean):
            raise ContractError(f"feature {self.name!r}: mean must be finite")
        object.__setattr__(self, "expr", _optional_text(self.expr, f"feature {self.name!r}"))

    @property
    def fitted(self) -> bool:
        """Whether the standardisation constants are set."""
        return self.mean is not None and self.scale is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON and checkpoint friendly)."""
        return {
            "name": self.name,
            "expr": self.expr,
            "transform": self.transform,
            "mean": self.mean,
            "scale": self.scale,
            "boolean": self.boolean,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any] | str) -> Feature:
        """Build from a dict, or from a bare name (its own column, untransformed, unfitted)."""
        if isinstance(d, str):
            return cls(name=d)
        d = dict(d)
        name = d.get("name")
        _check_keys(
            d, {"name", "expr", "transform", "mean", "scale", "boolean"}, f"feature {name!r}"
        )
        return cls(
            name=name,
            transform=d.get("transform") or "none",
            mean=_optional_float(d.get("mean"), f"feature {name!r}: mean"),
            scale=_optional_float(d.get("scale"), f"feature {name!r}: scale"),
            expr=d.get("expr"),
            boolean=_bool(d.get("boolean", False), f"feature {name!r}: boolean"),
        )


def _bool(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ContractError(f"{what}: expected true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class JaggedCollection:
    """A variable-length collection per row (jet constituents, tracks, the jets of an event).

    In SoA form it is ``offsets`` of shape ``(n_rows + 1,)`` (int64, non-decreasing) and one
    array of shape ``(n_objects,)`` per field. Models see it padded to
    ``(batch, max_length, n_fields)`` with a mask; the first ``max_length`` objects in stored
    order are kept (sources store them sorted, for instance by decreasing pT).

    ``counts`` optionally names the stored column with the number of objects per event (a
    NanoAOD ``nJet``); the sources then check it against the fields, and the predict job
    writes it beside per-object scores. The fields' expressions default to
    ``<collection>_<field>``.
    """

    name: str
    max_length: int
    fields: tuple[Feature, ...]
    order: str = "stored order (sources sort by decreasing pT); the first max_length are kept"
    counts: str | None = None

    def __post_init__(self) -> None:
        _check_name(self.name, "collection")
        if not isinstance(self.max_length, int) or isinstance(self.max_length, bool):
            raise ContractError(
                f"collection {self.name!r}: max_length must be an integer, got {self.max_length!r}"
            )
        if self.max_length < 1:
            raise ContractError(f"collection {self.name!r}: max_length must be >= 1")
        if not self.fields:
            raise ContractError(f"collection {self.name!r} has no fields")
        object.__setattr__(
            self, "counts", _optional_text(self.counts, f"collection {self.name!r}: counts")
        )
        # Each field's source expression written out: ``<collection>_<field>`` by default.
        fields = tuple(
            f if f.expr else replace(f, expr=self.field_input_name(f.name)) for f in self.fields
        )
        object.__setattr__(self, "fields", fields)

    @property
    def offsets_name(self) -> str:
        """Input name of this collection's offsets array."""
        return f"{self.name}_offsets"

    @property
    def counts_name(self) -> str:
        """Input name under which a caller may give counts instead of offsets."""
        return f"{self.name}_counts"

    def field_input_name(self, field_name: str) -> str:
        """Input name of one field's flat array, ``<collection>_<field>``."""
        return f"{self.name}_{field_name}"

    @property
    def field_input_names(self) -> list[str]:
        """Input names of all fields, in contract order."""
        return [self.field_input_name(f.name) for f in self.fields]

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form, each field's expression written out."""
        return {
            "name": self.name,
            "max_length": int(self.max_length),
            "order": self.order,
            "counts": self.counts,
            "fields": [f.to_dict() for f in self.fields],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JaggedCollection:
        """Build from a dict (as written in the data config)."""
        d = dict(d)
        _check_keys(
            d, {"name", "max_length", "fields", "order", "counts"}, f"collection {d.get('name')!r}"
        )
        kwargs = {}
        if d.get("order") is not None:
            kwargs["order"] = str(d["order"])
        return cls(
            name=d.get("name"),
            max_length=d.get("max_length"),
            fields=tuple(Feature.from_dict(f) for f in d.get("fields") or ()),
            counts=d.get("counts"),
            **kwargs,
        )


@dataclass(frozen=True)
class Target:
    """A regression target: a quantity the model predicts, in physical units.

    Parameters
    ----------
    name
        Output name of the deployed graph.
    expr
        Expression for the true value from the stored columns (default: the name).
    loss
        ``mse``, ``huber`` (delta 1 in standardised units) or ``l1``.
    loss_weight
        Weight of this target's loss in the total (the classification loss has
        ``InputContract.class_loss_weight``).
    mean, scale
        Standardisation of the target during training, fitted on the training split; the
        deployed graph undoes it, so it returns physical units.
    """

    name: str
    expr: str | None = None
    loss: str = "mse"
    loss_weight: float = 1.0
    mean: float | None = None
    scale: float | None = None

    def __post_init__(self) -> None:
        _check_name(self.name, "regression target")
        if self.loss not in LOSSES:
            raise ContractError(
                f"regression target {self.name!r}: unknown loss {self.loss!r}; choose one of "
                f"{LOSSES}"
            )
        if not (math.isfinite(self.loss_weight) and self.loss_weight >= 0):
            raise ContractError(f"regression target {self.name!r}: loss_weight must be >= 0")
        if self.scale is not None and not (math.isfinite(self.scale) and self.scale > 0):
            raise ContractError(f"regression target {self.name!r}: scale must be finite and > 0")
        expr = _optional_text(self.expr, f"regression target {self.name!r}")
        object.__setattr__(self, "expr", expr or self.name)

    @property
    def fitted(self) -> bool:
        """Whether the standardisation constants are set."""
        return self.mean is not None and self.scale is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form."""
        return {
            "name": self.name,
            "expr": self.expr,
            "loss": self.loss,
            "loss_weight": self.loss_weight,
            "mean": self.mean,
            "scale": self.scale,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any] | str) -> Target:
        """Build from a dict or a bare name."""
        if isinstance(d, str):
            return cls(name=d)
        d = dict(d)
        name = d.get("name")
        _check_keys(
            d,
            {"name", "expr", "loss", "loss_weight", "mean", "scale"},
            f"regression target {name!r}",
        )
        return cls(
            name=name,
            expr=d.get("expr"),
            loss=d.get("loss") or "mse",
            loss_weight=_optional_float(d.get("loss_weight", 1.0), f"target {name!r}") or 0.0,
            mean=_optional_float(d.get("mean"), f"target {name!r}: mean"),
            scale=_optional_float(d.get("scale"), f"target {name!r}: scale"),
        )


_TOP_KEYS = {
    "schema_version", "flat", "jagged", "classes", "outputs", "regression", "label",
    "selection", "per_object", "class_loss_weight",
}  # fmt: skip


@dataclass(frozen=True)
class InputContract:
    """What a model consumes and produces, and where its values come from.

    Parameters
    ----------
    flat
        Flat features, one value per row, in the order the model sees them.
    jagged
        Jagged collections, in order.
    classes
        Class labels; label ``i`` in the data means ``classes[i]``. Empty (``[]``) for a model
        that only regresses.
    outputs
        Output names: one per class (``prob_<class>`` by default), then one per regression
        target (its name). Given with only the class names, the targets are appended.
    regression
        Regression targets.
    label
        Expression for the class index of each row (integers from 0, or booleans); defaults
        to the stored column ``label`` when there are classes.
    selection
        Boolean expression: rows where it is false are not trained on (and, by default, still
        scored by the predict job).
    per_object
        Collection prefix (``Jet`` for the ``Jet_*`` branches): one row per object of that
        collection instead of one per event.
    class_loss_weight
        Weight of the classification loss beside the regression losses.
    """

    flat: tuple[Feature, ...] = ()
    jagged: tuple[JaggedCollection, ...] = ()
    classes: tuple[str, ...] = DEFAULT_CLASSES
    outputs: tuple[str, ...] = field(default=())
    regression: tuple[Target, ...] = ()
    label: str | None = None
    selection: str | None = None
    per_object: str | None = None
    class_loss_weight: float = 1.0

    def __post_init__(self) -> None:
        # Each flat feature's source expression written out: its own name by default.
        flat = tuple(f if f.expr else replace(f, expr=f.name) for f in self.flat)
        object.__setattr__(self, "flat", flat)
        if not self.flat and not self.jagged:
            raise ContractError("the contract declares no flat columns and no jagged collections")
        if len(self.classes) == 1:
            raise ContractError(f"need at least two classes, got {list(self.classes)}")
        if not self.classes and not self.regression:
            raise ContractError(
                "the contract has no outputs: declare classes (at least two) or regression targets"
            )
        for c in self.classes:
            if not isinstance(c, str) or not c:
                raise ContractError(f"class names must be non-empty text, got {c!r}")
        targets = tuple(t.name for t in self.regression)
        outputs = tuple(self.outputs)
        if not outputs:
            outputs = tuple(f"prob_{c}" for c in self.classes) + targets
        elif len(outputs) == len(self.classes) and targets:
            outputs = outputs + targets
        if len(outputs) != len(self.classes) + len(targets):
            raise ContractError(
                f"{len(outputs)} output names for {len(self.classes)} classes"
                + (f" and {len(targets)} regression targets" if targets else "")
                + ": give one per class"
            )
        if targets and outputs[len(self.classes) :] != targets:
            raise ContractError(
                f"the last outputs {list(outputs[len(self.classes) :])} must be the regression "
                f"targets' names {list(targets)}"
            )
        object.__setattr__(self, "outputs", outputs)
        for name in outputs:
            _check_name(name, "output")
        dupes = sorted({n for n in outputs if outputs.count(n) > 1})
        if dupes:
            raise ContractError(f"output names collide: {dupes}")
        names = self.input_names
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ContractError(f"input names collide: {dupes}; rename the columns or collections")
        # A caller may give a collection's counts instead of its offsets, under this name.
        counts = sorted({c.counts_name for c in self.jagged} & set(self.flat_names))
        if counts:
            raise ContractError(
                f"flat features {counts} are named like a collection's counts input; rename them"
            )
        label = _optional_text(self.label, "label")
        if self.classes and label is None:
            label = "label"
        object.__setattr__(self, "label", label if self.classes else None)
        object.__setattr__(self, "selection", _optional_text(self.selection, "selection"))
        per_object = _optional_text(self.per_object, "per_object")
        object.__setattr__(
            self, "per_object", None if per_object is None else per_object.rstrip("_")
        )
        if not (math.isfinite(self.class_loss_weight) and self.class_loss_weight >= 0):
            raise ContractError("class_loss_weight must be >= 0")

    # --- names and shapes -------------------------------------------------------------
    @property
    def flat_names(self) -> list[str]:
        """Names of the flat columns, in order."""
        return [f.name for f in self.flat]

    @property
    def input_names(self) -> list[str]:
        """Every input of the deployed graph in call order: flat columns, then per collection
        its offsets followed by its fields."""
        names = self.flat_names
        for coll in self.jagged:
            names += [coll.offsets_name, *coll.field_input_names]
        return names

    @property
    def input_dtypes(self) -> dict[str, str]:
        """Dtype of each input: float32 features, int64 offsets."""
        dtypes = dict.fromkeys(self.flat_names, FEATURE_DTYPE)
        for coll in self.jagged:
            dtypes[coll.offsets_name] = OFFSETS_DTYPE
            dtypes.update(dict.fromkeys(coll.field_input_names, FEATURE_DTYPE))
        return dtypes

    @property
    def input_dims(self) -> dict[str, str]:
        """Symbolic length of each input: ``batch``, ``batch_plus_1`` (offsets) or
        ``n_<collection>`` (a collection's objects in the batch)."""
        dims = dict.fromkeys(self.flat_names, BATCH_DIM)
        for coll in self.jagged:
            dims[coll.offsets_name] = OFFSETS_DIM
            dims.update(dict.fromkeys(coll.field_input_names, f"n_{coll.name}"))
        return dims

    @property
    def input_exprs(self) -> dict[str, str]:
        """The source expression behind each input (offsets: the counts column, or the
        number of objects of the first field)."""
        exprs = {f.name: f.expr for f in self.flat}
        for coll in self.jagged:
            exprs[coll.offsets_name] = coll.counts or f"offsets of num({coll.fields[0].expr})"
            exprs.update({coll.field_input_name(f.name): f.expr for f in coll.fields})
        return exprs

    @property
    def features(self) -> list[Feature]:
        """Every feature: the flat ones, then each collection's fields."""
        return list(self.flat) + [f for c in self.jagged for f in c.fields]

    @property
    def n_classes(self) -> int:
        """Number of classes (0 for a regression-only model)."""
        return len(self.classes)

    @property
    def n_outputs(self) -> int:
        """Width of the network's head: one logit per class, one value per target."""
        return len(self.classes) + len(self.regression)

    @property
    def class_outputs(self) -> tuple[str, ...]:
        """Output names of the class probabilities."""
        return self.outputs[: self.n_classes]

    def output_meaning(self, name: str) -> str:
        """A sentence saying what an output holds (for the manifest)."""
        i = self.outputs.index(name)
        if i < self.n_classes:
            return f"probability of class {self.classes[i]!r}"
        target = self.regression[i - self.n_classes]
        return f"regression target {target.name!r} ({target.expr}), in physical units"

    @property
    def fitted(self) -> bool:
        """Whether all standardisation constants (features and targets) are set."""
        return all(f.fitted for f in self.features) and all(t.fitted for t in self.regression)

    def model_dims(self) -> dict[str, Any]:
        """Sizes a network needs: ``n_flat``, ``n_fields`` (per collection), ``max_lengths``,
        ``n_outputs`` (the head's width)."""
        return {
            "n_flat": len(self.flat),
            "n_fields": [len(c.fields) for c in self.jagged],
            "max_lengths": [int(c.max_length) for c in self.jagged],
            "n_outputs": self.n_outputs,
        }

    # --- fitting ------------------------------------------------------------------------
    def with_constants(
        self,
        flat: dict[str, tuple[float, float]],
        jagged: dict[str, dict[str, tuple[float, float]]],
        targets: dict[str, tuple[float, float]] | None = None,
    ) -> InputContract:
        """Return a copy with standardisation ``(mean, scale)`` set per feature and target."""

        def fill(item: Any, consts: dict[str, tuple[float, float]]) -> Any:
            mean, scale = consts[item.name]
            return replace(item, mean=float(mean), scale=float(scale))

        return replace(
            self,
            flat=tuple(fill(f, flat) for f in self.flat),
            jagged=tuple(
                replace(c, fields=tuple(fill(f, jagged[c.name]) for f in c.fields))
                for c in self.jagged
            ),
            regression=tuple(fill(t, targets or {}) for t in self.regression),
        )

    def reading_input_names(self, label: str | None = "label") -> InputContract:
        """This contract reading a table whose columns are named as its inputs (a raw SoA
        sample written from it): each expression is the input's name, the label the column
        ``label``, and every row is kept (no selection, no ``per_object`` expansion)."""
        return replace(
            self,
            flat=tuple(replace(f, expr=f.name) for f in self.flat),
            jagged=tuple(
                replace(
                    c,
                    counts=None,
                    fields=tuple(replace(f, expr=c.field_input_name(f.name)) for f in c.fields),
                )
                for c in self.jagged
            ),
            regression=tuple(replace(t, expr=t.name) for t in self.regression),
            label=label if self.classes else None,
            selection=None,
            per_object=None,
        )

    # --- serialisation ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form: what the checkpoint hyperparameters and the manifest hold."""
        return {
            "schema_version": SCHEMA_VERSION,
            "flat": [f.to_dict() for f in self.flat],
            "jagged": [c.to_dict() for c in self.jagged],
            "classes": list(self.classes),
            "outputs": list(self.outputs),
            "regression": [t.to_dict() for t in self.regression],
            "label": self.label,
            "selection": self.selection,
            "per_object": self.per_object,
            "class_loss_weight": self.class_loss_weight,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any] | InputContract) -> InputContract:
        """Build from a plain dict or an OmegaConf container converted to one."""
        if isinstance(d, InputContract):
            return d
        if not hasattr(d, "keys"):
            raise ContractError(f"a contract is a mapping of its keys, got {type(d).__name__}")
        d = dict(d)
        version = d.pop("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ContractError(
                f"contract schema version {version} is not supported (this code reads "
                f"{SCHEMA_VERSION}); export it again with this version of the project"
            )
        unknown = set(d) - _TOP_KEYS
        if unknown:
            raise ContractError(
                f"unknown contract keys {sorted(unknown)}; expected "
                f"{sorted(_TOP_KEYS - {'schema_version'})}"
            )
        return cls(
            flat=tuple(Feature.from_dict(f) for f in d.get("flat") or ()),
            jagged=tuple(JaggedCollection.from_dict(c) for c in d.get("jagged") or ()),
            classes=tuple(d["classes"] or ()) if "classes" in d else DEFAULT_CLASSES,
            outputs=tuple(str(o) for o in d.get("outputs") or ()),
            regression=tuple(Target.from_dict(t) for t in d.get("regression") or ()),
            label=d.get("label"),
            selection=d.get("selection"),
            per_object=d.get("per_object"),
            class_loss_weight=_optional_float(d.get("class_loss_weight", 1.0), "class_loss_weight"),
        )

    def to_json(self, path: str | Path | None = None) -> str:
        """Serialise to JSON; write it to ``path`` if given."""
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> InputContract:
        """Read from a JSON string or a path to a JSON file."""
        p = Path(text_or_path)
        text = (
            p.read_text()
            if not str(text_or_path).lstrip().startswith("{") and p.exists()
            else str(text_or_path)
        )
        return cls.from_dict(json.loads(text))
