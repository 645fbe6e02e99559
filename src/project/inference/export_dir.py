"""An export directory: ``manifest.json`` (all the runtime reads of the training side), checked
against ``manifest.sha256`` and this runtime's own copy of the schema (the export's copy is
for other consumers), the files it names (inside the directory only), the artifact choice."""

from __future__ import annotations

import hashlib
import json
import platform
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from project.contract import ContractError, InputContract, manifest_schema
from project.inference.errors import (
    ArtifactError,
    IntegrityError,
    MissingManifestError,
    ParityFailedError,
)

MANIFEST_FILE, MANIFEST_HASH_FILE = "manifest.json", "manifest.sha256"
# Default choice among the artifacts that passed parity, from ``scripts/benchmark.py
# inference`` on the toy models (one thread, x86-64): AOTInductor's compiled code (deep sets at
# 1024 rows: 44 ms against 62 ms for ONNX Runtime), then ONNX Runtime (ahead at batch 1 for the
# MLP: 30 us raw against 35 us, the package's Python call included), then TorchScript.
PREFERENCE = ("aoti", "onnx", "torchscript")
# CPU flags each token of Inductor's vector ISA name needs (see /proc/cpuinfo).
_ISA_FLAGS = {
    "avx512": {"avx512f", "avx512bw", "avx512vl", "avx512dq"},
    "avx512_vnni": {"avx512_vnni"},
    "avx2": {"avx2", "fma"},
    "amx": {"amx_tile"},
}


@dataclass(frozen=True)
class Artifact:
    """One artifact of the manifest (its whole entry in ``entry``)."""

    format: str
    file: str
    device: str
    sha256: str
    passed: bool
    entry: dict[str, Any] = field(repr=False)


@dataclass(frozen=True)
class ExportDir:
    """A read and checked export directory."""

    path: Path
    manifest: dict[str, Any] = field(repr=False)
    contract: InputContract
    output_names: tuple[str, ...]
    artifacts: tuple[Artifact, ...]

    def file(self, name: str, what: str) -> Path:
        """``path / name``; ``ArtifactError`` if it resolves outside ``path`` (absolute, ``..``,
        a symbolic link), which would let an edited or copied export serve other files."""
        resolved = (self.path / name).resolve()
        if Path(name).is_absolute() or not resolved.is_relative_to(self.path.resolve()):
            raise ArtifactError(
                f"{what} {name!r} of {self.path / MANIFEST_FILE} leaves the export directory "
                f"(it resolves to {resolved}); every file of an export must lie inside it"
            )
        return self.path / name

    def golden(self) -> dict[str, np.ndarray]:
        """The golden inputs and expected outputs, checked against the manifest's hash;
        ``ArtifactError`` for a file that is not numeric ``.npz`` (object arrays need pickle,
        which can run code and is never used here) or lacks an input or output."""
        golden = self.manifest["golden"]
        path = self.file(golden["file"], "golden file")
        verify_file(path, golden["sha256"], "golden file")
        try:
            with np.load(path, allow_pickle=False) as data:
                arrays = {k: data[k] for k in data.files}
        except (ValueError, OSError, zipfile.BadZipFile) as err:
            raise ArtifactError(
                f"golden file {path} cannot be read as numeric arrays: {err}. Golden files "
                "hold numbers only (no Python objects); export again."
            ) from err
        if missing := {*self.contract.input_names, *self.output_names} - set(arrays):
            raise ArtifactError(f"golden file {path} lacks {sorted(missing)}. Export again.")
        return arrays


def read_export(export_dir: str | Path) -> ExportDir:
    """Read and check ``export_dir/manifest.json``: ``MissingManifestError`` (none),
    ``IntegrityError`` (its hash missing or different) or ``ArtifactError`` (not JSON, not
    valid, inputs that contradict the contract, a file outside the directory)."""
    path = Path(export_dir)
    manifest_file, hash_file = path / MANIFEST_FILE, path / MANIFEST_HASH_FILE
    if not manifest_file.is_file():
        raise MissingManifestError(
            f"{path} has no {MANIFEST_FILE}: it is not an export directory (exports are written "
            "by scripts/export.py to exported/<name>/)"
            + ("" if path.is_dir() else f"; {path} does not exist")
        )
    if not hash_file.is_file():
        raise IntegrityError(
            f"{path} has no {MANIFEST_HASH_FILE}, so its manifest cannot be checked; exports "
            "written by scripts/export.py have one. Export it again."
        )
    verify_file(manifest_file, hash_file.read_text().strip(), "manifest", MANIFEST_HASH_FILE)
    try:
        manifest = json.loads(manifest_file.read_text())
    except ValueError as err:
        raise ArtifactError(f"{manifest_file} is not valid JSON: {err}") from err
    _validate(manifest, manifest_file)
    try:
        contract = InputContract.from_dict(manifest["contract"])
    except ContractError as err:
        raise ArtifactError(f"{manifest_file} is not a valid export manifest: {err}") from err
    inputs = [i["name"] for i in sorted(manifest["inputs"], key=lambda i: i["position"])]
    outputs = tuple(o["name"] for o in manifest["outputs"])
    if inputs != contract.input_names or outputs != contract.outputs:
        raise ArtifactError(
            f"{manifest_file}: inputs {inputs} / outputs {list(outputs)} do not match the "
            f"contract's {contract.input_names} / {list(contract.outputs)}"
        )
    keys = ("format", "file", "device", "sha256", "passed")
    artifacts = tuple(Artifact(*(a[k] for k in keys), a) for a in manifest["artifacts"])
    export = ExportDir(path, manifest, contract, outputs, artifacts)
    for art in artifacts:
        export.file(art.file, f"{art.format} artifact")
    export.file(manifest["golden"]["file"], "golden file")
    return export


def _validate(manifest: Any, manifest_file: Path) -> None:
    """``ArtifactError`` naming the first place where ``manifest`` breaks the schema."""
    import jsonschema

    validator = jsonschema.Draft202012Validator(manifest_schema())
    error = jsonschema.exceptions.best_match(validator.iter_errors(manifest))
    if error is not None:
        rule = error.absolute_path and error.schema.get("description")  # not the whole file's
        raise ArtifactError(
            f"{manifest_file} is not a valid export manifest: at "
            f"{'/'.join(map(str, error.absolute_path)) or 'the top level'}: {error.message}"
            + (f" ({rule})" if rule else "")
            + ". Export it again with this version of the project."
        )


def verify_file(path: Path, expected: str, what: str, record: str = "the manifest") -> None:
    """``ArtifactError`` if ``path`` is missing, ``IntegrityError`` if its sha256 is not
    ``expected`` (as ``record`` has it)."""
    if not path.is_file():
        raise ArtifactError(f"{what} {path} is listed in the manifest but missing")
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    if (found := digest.hexdigest()) != expected:
        raise IntegrityError(
            f"{what} {path} has sha256 {found}, but {record} records {expected}: the file "
            "was modified or replaced after export. Re-export, or restore the original file."
        )


def aoti_problem(export: ExportDir, artifact: Artifact) -> str | None:
    """Why a compiled AOTInductor artifact may not run correctly here, or ``None``: compiled
    code is only trusted on the exporting torch build, machine architecture, and a CPU with
    the vector instructions it was compiled for."""
    prov = export.manifest["provenance"]
    if prov["torch"] != torch.__version__:
        return f"compiled with torch {prov['torch']}, this is torch {torch.__version__}"
    if prov.get("machine") and prov["machine"] != platform.machine():
        return f"compiled for {prov['machine']}, this machine is {platform.machine()}"
    isa = str(artifact.entry.get("cpu_isa") or prov.get("cpu_isa") or "")
    needed = set().union(*(_ISA_FLAGS.get(token, set()) for token in isa.split()))
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next(set(ln.split(":", 1)[1].split()) for ln in fh if ln.startswith("flags"))
    except (OSError, StopIteration):
        return None  # unknown here: trusted, as the machine and torch build match
    if artifact.device == "cpu" and needed - flags:
        return f"compiled for {isa!r}; this CPU lacks {sorted(needed - flags)}"
    return None


def choose_artifact(
    export: ExportDir, backend: str | None, device: str, onnx_optimization: str
) -> tuple[Artifact, list[str]]:
    """The artifact to load and why others were passed over: for ``backend`` ``None`` or
    ``"auto"`` the first of ``PREFERENCE`` that passed parity and can run here."""
    notes: list[str] = []
    for fmt in PREFERENCE if backend in (None, "auto") else (backend,):
        art = next((a for a in export.artifacts if a.format == fmt and a.device == device), None)
        if art is None:
            notes.append(f"{fmt}: no {device} artifact in the export")
            continue
        # Every parity case passed, and for ONNX one was run with the level to be used.
        levels = [p.get("optimization") for p in art.entry["parity"]]
        if not art.passed or (fmt == "onnx" and onnx_optimization not in levels):
            notes.append(f"{fmt}: failed its parity check at export")
            continue
        problem = aoti_problem(export, art) if fmt == "aoti" else None
        if problem is None:
            return art, notes
        notes.append(f"aoti: {problem}")
        if backend == "aoti":
            raise ArtifactError(f"cannot run {export.path / art.file} here: {problem}")
    message = f"{export.path}: no usable artifact for backend={backend or 'auto'} on {device}: "
    message += "; ".join(notes)
    if any("parity" in n for n in notes):
        raise ParityFailedError(message + ". Fix the export (see the manifest's parity table).")
    raise ArtifactError(message)
