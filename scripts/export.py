"""Export a trained run: ``python scripts/export.py [run_dir=...] [ckpt=best|last|PATH] ...``.

Writes TorchScript, AOTInductor and ONNX artifacts, a manifest, the parity table and a golden
set to ``exported/<name>/``, atomically. Exits non-zero, publishing nothing, if a requested
format fails its parity check (unless ``allow_partial=true``). Logic: ``project.deploy.export``.
"""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))


@hydra.main(version_base="1.3", config_path="../configs", config_name="export")
def main(cfg: DictConfig) -> None:
    """Compose the export config and run the export."""
    from project.deploy.export import ExportFailed, run_export
    from project.deploy.graph import CheckpointError

    try:
        run_export(cfg)
    except (ExportFailed, CheckpointError, FileExistsError, PermissionError, ValueError) as err:
        print(f"export failed: {err}", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
