"""The input contract: what a model consumes, written once and read by every stage.

The contract names the flat columns (one value per row), the jagged collections (a variable
number of objects per row, as offsets plus one flat array per field), the class labels, the
output names, and the preprocessing constants fitted on the training split. The DataModule,
the exported graph and the inference runtime all read this one object (see DESIGN.md), and it
round-trips through plain dicts and JSON so it can live in checkpoint hyperparameters and in
the export manifest.

This module imports only the standard library: the inference runtime reads it too.
"""

from __future__ import annotations

import json
import keyword
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

SCHEMA_VERSION = 1
TRANSFORMS = ("none", "log")
FEATURE_DTYPE = "float32"
OFFSETS_DTYPE = "int64"


class ContractError(ValueError):
    """A contract that is inconsistent, or data that does not satisfy it."""


def _check_name(name: str, what: str) -> None:
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise ContractError(
            f"{what} name {name!r} is not a valid identifier: use letters, digits and '_' "
            "(it becomes an input name of the exported graph and a C++ variable)."
        )


@dataclass(frozen=True)
class Feature:
    """One input feature: a flat column or a field of a jagged collection.

    Parameters
    ----------
    name
        Column name (for a jagged field, the field name without the collection prefix).
    transform
        ``"none"`` or ``"log"`` (natural log of the value clamped at ``1e-6``), applied
        before standardisation; useful for momenta and energies spanning orders of magnitude.
    mean, scale
        Standardisation constants, ``(transform(x) - mean) / scale``. ``None`` until fitted on
        the training split.
    """

    name: str
    transform: str = "none"
    mean: float | None = None
    scale: float | None = None

    def __post_init__(self) -> None:
        _check_name(self.name, "feature")
        if self.transform not in TRANSFORMS:
            raise ContractError(
                f"feature {self.name!r}: unknown transform {self.transform!r}; "
                f"choose one of {TRANSFORMS}"
            )
        if self.scale is not None and not (math.isfinite(self.scale) and self.scale > 0):
            raise ContractError(f"feature {self.name!r}: scale must be finite and > 0")

    @property
    def fitted(self) -> bool:
        """Whether the standardisation constants are set."""
        return self.mean is not None and self.scale is not None

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (JSON and checkpoint friendly)."""
        return {
            "name": self.name,
            "transform": self.transform,
            "mean": self.mean,
            "scale": self.scale,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any] | str) -> Feature:
        """Build from a dict, or from a bare name for an untransformed, unfitted feature."""
        if isinstance(d, str):
            return cls(name=d)
        unknown = set(d) - {"name", "transform", "mean", "scale"}
        if unknown:
            raise ContractError(f"feature {d.get('name')!r}: unknown keys {sorted(unknown)}")
        return cls(
            name=d["name"],
            transform=d.get("transform", "none"),
            mean=None if d.get("mean") is None else float(d["mean"]),
            scale=None if d.get("scale") is None else float(d["scale"]),
        )


@dataclass(frozen=True)
class JaggedCollection:
    """A variable-length collection per row (jet constituents, tracks, the jets of an event).

    In SoA form it is ``offsets`` of shape ``(n_rows + 1,)`` (int64, starting at 0,
    non-decreasing) and one array of shape ``(n_objects,)`` per field. Models see it padded to
    ``(batch, max_length, n_fields)`` with a mask; the first ``max_length`` objects in stored
    order are kept (sources store them sorted, for instance by decreasing pT).
    """

    name: str
    max_length: int
    fields: tuple[Feature, ...]
    order: str = "stored order (sources sort by decreasing pT); the first max_length are kept"

    def __post_init__(self) -> None:
        _check_name(self.name, "collection")
        if int(self.max_length) < 1:
            raise ContractError(f"collection {self.name!r}: max_length must be >= 1")
        if not self.fields:
            raise ContractError(f"collection {self.name!r} has no fields")

    @property
    def offsets_name(self) -> str:
        """Input name of this collection's offsets array."""
        return f"{self.name}_offsets"

    def field_input_name(self, field_name: str) -> str:
        """Input name of one field's flat array, ``<collection>_<field>``."""
        return f"{self.name}_{field_name}"

    @property
    def field_input_names(self) -> list[str]:
        """Input names of all fields, in contract order."""
        return [self.field_input_name(f.name) for f in self.fields]

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form."""
        return {
            "name": self.name,
            "max_length": int(self.max_length),
            "order": self.order,
            "fields": [f.to_dict() for f in self.fields],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> JaggedCollection:
        """Build from a dict (as written in the data config)."""
        unknown = set(d) - {"name", "max_length", "fields", "order"}
        if unknown:
            raise ContractError(f"collection {d.get('name')!r}: unknown keys {sorted(unknown)}")
        kwargs = {}
        if "order" in d:
            kwargs["order"] = str(d["order"])
        return cls(
            name=d["name"],
            max_length=int(d["max_length"]),
            fields=tuple(Feature.from_dict(f) for f in d["fields"]),
            **kwargs,
        )


@dataclass(frozen=True)
class InputContract:
    """What a model consumes and produces; see the module docstring.

    Parameters
    ----------
    flat
        Flat features, one value per row, in the order the model sees them.
    jagged
        Jagged collections, in order.
    classes
        Class labels; label ``i`` in the data means ``classes[i]``.
    outputs
        Output names, one per class (``prob_<class>`` by default): the exported graph returns
        one ``(batch,)`` probability array per name.
    """

    flat: tuple[Feature, ...] = ()
    jagged: tuple[JaggedCollection, ...] = ()
    classes: tuple[str, ...] = ("background", "signal")
    outputs: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if not self.flat and not self.jagged:
            raise ContractError("the contract declares no flat columns and no jagged collections")
        if len(self.classes) < 2:
            raise ContractError(f"need at least two classes, got {list(self.classes)}")
        if not self.outputs:
            object.__setattr__(self, "outputs", tuple(f"prob_{c}" for c in self.classes))
        if len(self.outputs) != len(self.classes):
            raise ContractError(
                f"{len(self.outputs)} output names for {len(self.classes)} classes: give one per class"
            )
        for name in self.outputs:
            _check_name(name, "output")
        names = self.input_names
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ContractError(f"input names collide: {dupes}; rename the columns or collections")

    # --- names and shapes -------------------------------------------------------------
    @property
    def flat_names(self) -> list[str]:
        """Names of the flat columns, in order."""
        return [f.name for f in self.flat]

    @property
    def input_names(self) -> list[str]:
        """Every input of the deployed graph, in order: flat columns, then per collection its
        offsets followed by its fields."""
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
    def n_classes(self) -> int:
        """Number of classes (and of outputs)."""
        return len(self.classes)

    @property
    def fitted(self) -> bool:
        """Whether all standardisation constants are set."""
        feats = list(self.flat) + [f for c in self.jagged for f in c.fields]
        return all(f.fitted for f in feats)

    def model_dims(self) -> dict[str, Any]:
        """Sizes a network needs: ``n_flat``, ``n_fields`` (per collection), ``max_lengths``,
        ``n_classes``."""
        return {
            "n_flat": len(self.flat),
            "n_fields": [len(c.fields) for c in self.jagged],
            "max_lengths": [int(c.max_length) for c in self.jagged],
            "n_classes": self.n_classes,
        }

    # --- fitting ------------------------------------------------------------------------
    def with_constants(
        self,
        flat: dict[str, tuple[float, float]],
        jagged: dict[str, dict[str, tuple[float, float]]],
    ) -> InputContract:
        """Return a copy with standardisation ``(mean, scale)`` set per feature."""

        def fill(feat: Feature, consts: dict[str, tuple[float, float]]) -> Feature:
            mean, scale = consts[feat.name]
            return replace(feat, mean=float(mean), scale=float(scale))

        return replace(
            self,
            flat=tuple(fill(f, flat) for f in self.flat),
            jagged=tuple(
                replace(c, fields=tuple(fill(f, jagged[c.name]) for f in c.fields))
                for c in self.jagged
            ),
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
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> InputContract:
        """Build from a plain dict or an OmegaConf container converted to one."""
        if isinstance(d, InputContract):
            return d
        d = dict(d)
        version = d.pop("schema_version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ContractError(
                f"contract schema version {version} is not supported (this code reads {SCHEMA_VERSION})"
            )
        unknown = set(d) - {"flat", "jagged", "classes", "outputs"}
        if unknown:
            raise ContractError(
                f"unknown contract keys {sorted(unknown)}; expected flat, jagged, classes, outputs"
            )
        return cls(
            flat=tuple(Feature.from_dict(f) for f in d.get("flat") or ()),
            jagged=tuple(JaggedCollection.from_dict(c) for c in d.get("jagged") or ()),
            classes=tuple(str(c) for c in d.get("classes") or ("background", "signal")),
            outputs=tuple(str(o) for o in d.get("outputs") or ()),
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
