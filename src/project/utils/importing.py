"""Build objects from ``{"_target_": "module.Class", ...}`` dicts without Hydra, safely.

Checkpoints store the network's (and the optimiser's) config as such a plain dict, and the
deploy stage and a resumed run rebuild them from it. A checkpoint is a file a user may have
been handed: loading it with ``weights_only=True`` runs no pickled code, but importing and
calling an arbitrary ``_target_`` from it would (``torch.hub.load`` runs a ``hubconf.py``,
``logging.basicConfig`` empties a file). So only targets the project itself names may be
built from one: the project's models (``<package>.models.*``) and every ``_target_`` written
in the project's configs (``configs/**/*.yaml``).
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

_PACKAGE = __name__.split(".")[0]
MODELS_PREFIX = f"{_PACKAGE}.models."
_TARGET_LINE = re.compile(r"""^\s*_target_\s*:\s*["']?([\w.]+)["']?\s*(?:#.*)?$""", re.MULTILINE)


class UntrustedTargetError(ValueError):
    """A ``_target_`` that the project's configs do not name; it is refused, not imported."""


def config_dirs() -> list[Path]:
    """Where the project's configs are: ``$PROJECT_ROOT/configs`` and the checkout's."""
    roots = [Path(os.environ["PROJECT_ROOT"])] if os.environ.get("PROJECT_ROOT") else []
    roots.append(Path(__file__).resolve().parents[3])  # src/<package>/utils -> the checkout
    return [r / "configs" for r in roots if (r / "configs").is_dir()]


def _targets_in(directory: Path) -> frozenset[str]:
    found: set[str] = set()
    for path in directory.rglob("*.yaml"):
        found.update(_TARGET_LINE.findall(path.read_text(errors="replace")))
    return frozenset(found)


def allowed_targets() -> frozenset[str]:
    """Every ``_target_`` written in the project's configs (the models of ``<package>.models``
    are allowed besides, see ``check_target``)."""
    out: set[str] = set()
    for directory in config_dirs():
        out |= _targets_in(directory)
    return frozenset(out)


def check_target(path: str, allowed: frozenset[str], what: str = "_target_") -> None:
    """Refuse ``path`` unless it is a project model or in ``allowed``."""
    if path.startswith(MODELS_PREFIX) or path in allowed:
        return
    raise UntrustedTargetError(
        f"{what} {path!r} is not a model of {_PACKAGE}.models nor named in the project's "
        "configs, so it is not built from this file (it could run any code). To allow a new "
        f"model, put it in src/{_PACKAGE}/models/ or name it as `_target_` in a config under "
        "configs/ (configs/model/<name>.yaml)."
    )


def import_target(path: str) -> Any:
    """Import ``"package.module.Name"`` and return ``Name``."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ImportError(f"_target_ {path!r} is not a dotted path like 'package.module.Class'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ImportError(f"cannot import _target_ {path!r}: {err}") from err


def build_from_config(
    config: Mapping[str, Any], allowed: frozenset[str] | None = None, **kwargs: Any
) -> Any:
    """Call ``config["_target_"]`` with the other keys of ``config`` and ``kwargs``.

    Keys starting with ``_`` (Hydra's ``_partial_``, ``_recursive_``...) are not passed on.
    With ``allowed`` (for a config read from a file, see the module docstring), a target
    outside it is refused with ``UntrustedTargetError`` before anything is imported.
    """
    if not isinstance(config, Mapping) or "_target_" not in config:
        raise KeyError(f"config has no _target_: {config!r}")
    target = config["_target_"]
    if not isinstance(target, str):
        raise UntrustedTargetError(f"_target_ must be a dotted path, got {target!r}")
    if allowed is not None:
        check_target(target, allowed)
    params = {k: v for k, v in config.items() if not str(k).startswith("_")}
    return import_target(target)(**params, **kwargs)
