"""Reading an export directory: the manifest, the choice of artifact, and integrity checks.

``manifest.json`` is all the runtime reads of the training side (DESIGN.md): the contract,
input and output names, and per artifact its file, format, device, sha256 and parity verdict.
"""

from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from project.contract import ContractError, InputContract
from project.inference.backends import FORMATS
from project.inference.errors import (
    ArtifactError,
    IntegrityError,
    MissingManifestError,
    ParityFailedError,
)

# Default choice among the artifacts that passed parity, fastest first: a fixed order, from
# ``scripts/benchmark.py inference`` on the three toy models (one thread, x86-64, torch 2.14).
# AOTInductor runs the graph as compiled C++ with the least per-call overhead: fastest at
# batch 1 (e.g. 26 us vs 31 us ONNX Runtime vs 70 us TorchScript for the MLP) and fastest or
# tied at batch 1024 (deep sets: 32 ms vs 45 ms vs 46 ms). ONNX Runtime is next and ahead at
# very large batches, where its memory arena saves the page faults that the malloc'd
# intermediates of the other two cost. TorchScript's interpreter is slowest at small batches
# and recompiles on new shapes. A recorded latency cannot be used instead: the manifest has
# none from the machine that runs the model.
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
    """One artifact of the manifest (the manifest's entry is kept whole in ``entry``)."""

    format: str
    file: str
    device: str
    sha256: str
    passed: bool
    entry: dict[str, Any] = field(repr=False)

    def passed_optimization(self, optimization: str) -> bool:
        """Whether the parity case run with ONNX optimisation level ``optimization`` passed."""
        cases = [p for p in self.entry.get("parity", []) if p.get("optimization") == optimization]
        return bool(cases) and all(p.get("passed") for p in cases)

    @property
    def tolerance(self) -> tuple[float, float]:
        """``(abs, rel)``: the loosest tolerance its parity check used."""
        tols = [p.get("tolerance") or {} for p in self.entry.get("parity", [])]
        return (
            max((float(t.get("abs", 0.0)) for t in tols), default=1e-5),
            max((float(t.get("rel", 0.0)) for t in tols), default=1e-5),
        )


@dataclass(frozen=True)
class ExportDir:
    """A parsed export directory."""

    path: Path
    manifest: dict[str, Any] = field(repr=False)
    contract: InputContract
    output_names: tuple[str, ...]
    artifacts: tuple[Artifact, ...]

    @property
    def golden_file(self) -> Path:
        """Path of the golden inputs and expected outputs."""
        return self.path / self.manifest["golden"]["file"]


def read_export(export_dir: str | Path) -> ExportDir:
    """Read and check ``export_dir/manifest.json``.

    Raises
    ------
    MissingManifestError
        No manifest: not an export directory (or an unfinished one).
    ArtifactError
        A manifest this runtime cannot use (malformed, or inputs that contradict the contract).
    """
    path = Path(export_dir)
    manifest_file = path / "manifest.json"
    if not manifest_file.is_file():
        raise MissingManifestError(
            f"{path} has no manifest.json: it is not an export directory (exports are written "
            "by scripts/export.py to exported/<name>/)"
            + ("" if path.is_dir() else f"; {path} does not exist")
        )
    try:
        manifest = json.loads(manifest_file.read_text())
        contract = InputContract.from_dict(manifest["contract"])
        inputs = [i["name"] for i in manifest["inputs"]]
        outputs = tuple(o["name"] for o in manifest["outputs"])
        artifacts = tuple(
            Artifact(a["format"], a["file"], a["device"], a["sha256"], bool(a["passed"]), a)
            for a in manifest["artifacts"]
        )
    except (KeyError, TypeError, ValueError, ContractError) as err:
        raise ArtifactError(f"{manifest_file} is not a valid export manifest: {err!r}") from err
    if inputs != contract.input_names or list(outputs) != list(contract.outputs):
        raise ArtifactError(
            f"{manifest_file}: inputs {inputs} / outputs {list(outputs)} do not match the "
            f"contract's {contract.input_names} / {list(contract.outputs)}"
        )
    return ExportDir(path, manifest, contract, outputs, artifacts)


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's content."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def verify_file(path: Path, expected: str, what: str) -> None:
    """``ArtifactError`` if ``path`` is missing, ``IntegrityError`` if its sha256 is not
    ``expected``."""
    if not path.is_file():
        raise ArtifactError(f"{what} {path} is listed in the manifest but missing")
    found = sha256_of(path)
    if found != expected:
        raise IntegrityError(
            f"{what} {path} has sha256 {found}, but the manifest records {expected}: the file "
            "was modified or replaced after export. Re-export, or restore the original file."
        )


def cpu_flags() -> set[str] | None:
    """This CPU's feature flags from ``/proc/cpuinfo``, or ``None`` where unknown."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def aoti_problem(export: ExportDir, artifact: Artifact) -> str | None:
    """Why a compiled AOTInductor artifact may not run correctly here, or ``None``.

    Its parity passed on the exporting machine; compiled code is only trusted on the same torch
    build, machine architecture and a CPU with the vector instructions it was compiled for.
    """
    prov = export.manifest.get("provenance") or {}
    if prov.get("torch") and prov["torch"] != torch.__version__:
        return f"compiled with torch {prov['torch']}, this is torch {torch.__version__}"
    if prov.get("machine") and prov["machine"] != platform.machine():
        return f"compiled for {prov['machine']}, this machine is {platform.machine()}"
    isa = str(artifact.entry.get("cpu_isa") or prov.get("cpu_isa") or "")
    flags = cpu_flags()
    if artifact.device == "cpu" and flags is not None:
        needed = set().union(*(_ISA_FLAGS.get(tok, set()) for tok in isa.split()))
        if needed - flags:
            return f"compiled for {isa!r}; this CPU lacks {sorted(needed - flags)}"
    return None


def choose_artifact(
    export: ExportDir, backend: str | None, device: str, onnx_optimization: str
) -> tuple[Artifact, list[str]]:
    """The artifact to load and the reasons other candidates were passed over.

    ``backend=None`` (or ``"auto"``) takes the first of ``PREFERENCE`` that passed parity and
    can run here; a named backend must have passed, or ``ParityFailedError`` is raised.
    """
    if backend not in (None, "auto", *FORMATS):
        raise ValueError(f"unknown backend {backend!r}; choose one of {FORMATS} or 'auto'")
    notes: list[str] = []
    wanted = PREFERENCE if backend in (None, "auto") else (backend,)
    for fmt in wanted:
        found = [a for a in export.artifacts if a.format == fmt and a.device == device]
        if not found:
            notes.append(f"{fmt}: no {device} artifact in the export")
            continue
        art = found[0]
        # Conservative: every parity case of the artifact passed, and for ONNX the case run
        # with the optimisation level that will be used exists and passed.
        ok = art.passed and (fmt != "onnx" or art.passed_optimization(onnx_optimization))
        if not ok:
            notes.append(f"{fmt}: failed its parity check at export")
            continue
        problem = aoti_problem(export, art) if fmt == "aoti" else None
        if problem is not None:
            notes.append(f"aoti: {problem}")
            if backend == "aoti":
                raise ArtifactError(f"cannot run {export.path / art.file} here: {problem}")
            continue
        return art, notes
    message = f"{export.path}: no usable artifact for backend={backend or 'auto'} on {device}: "
    message += "; ".join(notes)
    if any("parity" in n for n in notes):
        raise ParityFailedError(message + ". Fix the export (see the manifest's parity table).")
    raise ArtifactError(message)
