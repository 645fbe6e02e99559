"""An export's graph in Model Explorer (``ai-edge-model-explorer``), served on localhost.

``scripts/visualize.py exported/<name>`` calls ``serve``: it reads the manifest, checks the
chosen artifact against its sha256, and starts Model Explorer's server with the saved
``torch.export`` program (``program.pt2``, through Model Explorer's built-in PyTorch adapter)
or the ONNX file (``model.onnx``, through the ``model-explorer-onnx`` adapter).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from project.utils import sha256_file

SOURCES = ("exported_program", "onnx")
ONNX_ADAPTER = "model_explorer_onnx"  # the extension module of model-explorer-onnx


class VisualizeError(RuntimeError):
    """The export has no usable artifact of the asked source."""


def artifact_path(export_dir: str | Path, source: str) -> Path:
    """The CPU artifact of format ``source`` (``exported_program`` or ``onnx``), hash-checked."""
    if source not in SOURCES:
        raise VisualizeError(f"unknown source {source!r}; choose one of {SOURCES}")
    export_dir = Path(export_dir)
    manifest_file = export_dir / "manifest.json"
    if not manifest_file.is_file():
        raise VisualizeError(f"{export_dir} has no manifest.json: not an export directory")
    manifest = json.loads(manifest_file.read_text())
    entry = next(
        (a for a in manifest["artifacts"] if a["format"] == source and a["device"] == "cpu"), None
    )
    if entry is None:
        found = sorted({a["format"] for a in manifest["artifacts"]})
        raise VisualizeError(
            f"{export_dir} has no {source} artifact (it has {found}); export it with "
            f"formats=[...,{source}] or choose another source"
        )
    path = export_dir / entry["file"]
    if sha256_file(path) != entry["sha256"]:
        raise VisualizeError(f"{path}: sha256 differs from the manifest's; export it again")
    return path


def model_explorer_config(
    export_dir: str | Path, source: str = "exported_program"
) -> tuple[Any, list[str]]:
    """Model Explorer's config holding the export's graph, and the extensions it needs."""
    import model_explorer

    path = artifact_path(export_dir, source)
    config = model_explorer.config()
    if source == "onnx":
        config.add_model_from_path(str(path))
        return config, [ONNX_ADAPTER]
    name = f"{Path(export_dir).resolve().name} ({path.name})"
    config.add_model_from_pytorch(name, exported_program=static_program(export_dir, path))
    return config, []


def static_program(export_dir: str | Path, path: Path) -> Any:
    """The saved program at the golden set's shapes, for display.

    Model Explorer 0.1.34's PyTorch adapter refuses a node whose value is a ``SymInt`` (the
    sizes a program with dynamic dimensions computes: ``Unsupported output type: SymInt``), so
    the loaded program is exported again on the golden inputs without dynamic dimensions: the
    same operations, with the golden batch's sizes in place of ``batch`` and ``n_<collection>``.
    """
    import numpy as np
    import torch

    export_dir = Path(export_dir)
    manifest = json.loads((export_dir / "manifest.json").read_text())
    golden = export_dir / manifest["golden"]["file"]
    if sha256_file(golden) != manifest["golden"]["sha256"]:
        raise VisualizeError(f"{golden}: sha256 differs from the manifest's; export it again")
    with np.load(golden) as arrays:
        names = [i["name"] for i in sorted(manifest["inputs"], key=lambda i: i["position"])]
        example = tuple(torch.from_numpy(arrays[n]) for n in names)
    program = torch.export.load(str(path))
    try:  # see project.deploy._parity_worker: torch 2.14's guard refuses batch 1 wrongly
        module = program.module(check_guards=False)
    except TypeError:
        module = program.module()
    return torch.export.export(module, example, strict=False)


def serve(
    export_dir: str | Path,
    source: str = "exported_program",
    host: str = "localhost",
    port: int = 8080,
    open_browser: bool = True,
) -> None:
    """Serve the export's graph in Model Explorer until interrupted (Ctrl+C); prints the URL."""
    import model_explorer

    config, extensions = model_explorer_config(export_dir, source)
    model_explorer.visualize_from_config(
        config, host=host, port=port, extensions=extensions, no_open_in_browser=not open_browser
    )
