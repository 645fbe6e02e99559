"""Build objects from ``{"_target_": "module.Class", ...}`` dicts without Hydra.

Checkpoints store the network's config as such a plain dict; the deploy stage rebuilds the
network from it with this function, so it needs neither Hydra nor the training code.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from typing import Any


def import_target(path: str) -> Any:
    """Import ``"package.module.Name"`` and return ``Name``."""
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ImportError(f"_target_ {path!r} is not a dotted path like 'package.module.Class'")
    try:
        return getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as err:
        raise ImportError(f"cannot import _target_ {path!r}: {err}") from err


def build_from_config(config: Mapping[str, Any], **kwargs: Any) -> Any:
    """Call ``config["_target_"]`` with the other keys of ``config`` and ``kwargs``.

    Keys starting with ``_`` (Hydra's ``_partial_``, ``_recursive_``...) are not passed on.
    """
    if "_target_" not in config:
        raise KeyError(f"config has no _target_: {dict(config)}")
    params = {k: v for k, v in config.items() if not k.startswith("_")}
    return import_target(config["_target_"])(**params, **kwargs)
