"""The export manifest: what was exported, from what, with which guarantees.

``manifest.json`` sits beside the artifacts and is all a consumer reads: the input contract
with its preprocessing constants, input and output names, dtypes and symbolic shapes, each
artifact's file, format, device, sha256 and parity verdict, the source run and checkpoint, and
the versions and git state that produced it. ``MANIFEST_SCHEMA`` is its JSON Schema.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

MANIFEST_VERSION = 1

_parity = {
    "type": "object",
    "required": ["format", "device", "passed", "batch_sizes", "tolerance"],
    "properties": {
        "passed": {"type": "boolean"},
        "max_abs": {"type": ["number", "null"]},
        "max_rel": {"type": ["number", "null"]},
        "batch_sizes": {"type": "array", "items": {"type": "integer", "minimum": 1}},
    },
}

MANIFEST_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "export manifest",
    "type": "object",
    "required": [
        "schema_version",
        "name",
        "created",
        "contract",
        "inputs",
        "outputs",
        "artifacts",
        "parity",
        "golden",
        "source",
        "provenance",
        "allow_partial",
    ],
    "properties": {
        "schema_version": {"const": MANIFEST_VERSION},
        "name": {"type": "string", "minLength": 1},
        "created": {"type": "string"},
        "contract": {"type": "object", "required": ["flat", "jagged", "classes", "outputs"]},
        "inputs": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "dtype", "shape"],
                "properties": {
                    "name": {"type": "string"},
                    "dtype": {"enum": ["float32", "int64"]},
                    "shape": {"type": "array", "items": {"type": "string"}, "minItems": 1},
                },
            },
        },
        "outputs": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "dtype", "shape", "meaning"],
            },
        },
        "artifacts": {
            "type": "array",
            "items": {
                "type": "object",
                "required": [
                    "format",
                    "file",
                    "device",
                    "sha256",
                    "bytes",
                    "dynamic_dims",
                    "parity",
                ],
                "properties": {
                    "format": {"enum": ["torchscript", "aoti", "onnx"]},
                    "device": {"type": "string"},
                    "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                    "bytes": {"type": "integer", "minimum": 1},
                    "parity": {"type": "array", "items": _parity, "minItems": 1},
                    "export_seconds": {"type": "number"},
                },
            },
        },
        "parity": {
            "type": "object",
            "required": ["passed", "table"],
            "properties": {"passed": {"type": "boolean"}, "table": {"type": "string"}},
        },
        "golden": {
            "type": "object",
            "required": ["file", "sha256", "rows"],
            "properties": {"sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"}},
        },
        "source": {
            "type": "object",
            "required": ["run_dir", "checkpoint", "checkpoint_sha256", "net"],
        },
        "provenance": {
            "type": "object",
            "required": ["git_commit", "git_dirty", "torch", "onnx", "onnxruntime", "python"],
        },
        "allow_partial": {"type": "boolean"},
    },
}


def validate_manifest(manifest: dict[str, Any]) -> None:
    """Raise ``jsonschema.ValidationError`` if ``manifest`` does not follow the schema."""
    import jsonschema

    jsonschema.validate(manifest, MANIFEST_SCHEMA)


def git_state(repo: Path) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the git work tree at ``repo``, or ``(None, None)`` outside one."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=repo,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return commit, bool(status.strip())
    except (OSError, subprocess.CalledProcessError):
        return None, None


def provenance(repo: Path) -> dict[str, Any]:
    """Versions, platform and git state of the exporting environment."""
    import onnx
    import onnxruntime

    commit, dirty = git_state(repo)
    return {
        "git_commit": commit,
        "git_dirty": dirty,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
    }


def now_utc() -> str:
    """Creation time stamp, ISO 8601 in UTC."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
