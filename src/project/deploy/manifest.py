"""The export manifest: what was exported, from what, with which guarantees.

``manifest.json`` sits beside the artifacts and is all a consumer reads: the input contract
with its preprocessing constants, input and output names, dtypes and symbolic shapes, each
artifact's file, format, device, sha256 and parity verdict, the source run and checkpoint, and
the versions and git state that produced it. Its JSON Schema is ``project/manifest.schema.json``
(``MANIFEST_SCHEMA``), shipped inside every export; ``manifest.sha256`` beside it holds the
manifest's hash.
"""

from __future__ import annotations

import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from project.contract import (  # noqa: F401 (re-exported)
    MANIFEST_FILE,
    MANIFEST_HASH_FILE,
    MANIFEST_SCHEMA_FILE,
    MANIFEST_VERSION,
    manifest_schema,
)

MANIFEST_SCHEMA: dict[str, Any] = manifest_schema()
SCHEMA_FILE = MANIFEST_SCHEMA_FILE.name


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
