"""The export job behind ``scripts/export.py``: a trained run to a published, verified export."""

from __future__ import annotations

import json
import os
import shutil
import socket
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from project.contract import MANIFEST_SCHEMA_FILE, MANIFEST_VERSION, OFFSETS_RULE, InputContract
from project.data.columnar import ColumnarData
from project.data.sample import SAMPLE_FILE, read_sample
from project.deploy import formats, triton
from project.deploy.graph import CheckpointError, LoadedCheckpoint, load_checkpoint
from project.deploy.manifest import (
    MANIFEST_FILE,
    MANIFEST_HASH_FILE,
    SCHEMA_FILE,
    now_utc,
    provenance,
    validate_manifest,
)
from project.deploy.parity import (
    ParityResult,
    Tolerance,
    build_cases,
    compare,
    eager_outputs,
    format_failures,
    format_table,
)
from project.soa.checkpoint import HASH_RECORD, recorded_sha256
from project.utils import atomic_write_text, follow_umask, sha256_file

FILES = {
    "torchscript": "model{suffix}.ts",
    "aoti": "model{suffix}.pt2",
    "onnx": "model{suffix}.onnx",
    # model.pt2 is AOTInductor's package; the torch.export program is saved beside it.
    "exported_program": "program{suffix}.pt2",
}


# Inside an export's temporary directory while it is written: the writing process, so that a
# later export can tell a directory left by a killed export from one still being written.
OWNER_FILE = ".owner.json"


REPO = Path(__file__).resolve().parents[3]  # the checkout whose git state is the provenance


class ExportFailed(RuntimeError):
    """A requested format failed to export or to match the eager graph; nothing was published."""


class UnverifiedCheckpointWarning(UserWarning):
    """The exported checkpoint has no recorded hash, so it is not known to be the file its
    training run saved (``require_hash=true`` refuses such a checkpoint)."""


def check_export_name(name: str) -> str:
    """``name`` if it is one plain directory name for ``exported/<name>/``; otherwise a
    ``ValueError`` saying what to give.

    Refused: empty, ``.``, ``..``, anything with a path separator (``a/b``, an absolute path),
    and names starting with ``.`` (the temporary and replaced exports are hidden
    ``.<name>.tmp-*`` and ``.<name>.old-*`` directories beside the published ones).
    """
    text = str(name)
    if not text.strip() or text.startswith(".") or any(c in text for c in "/\\\0"):
        raise ValueError(
            f"export name {text!r} is not a single plain directory name: give one like "
            "name=mlp-v2 (no '/', not '.', '..' or a name starting with '.'); the export is "
            "published as <output_dir>/<name>/"
        )
    return text


def claim_directory(directory: Path) -> None:
    """Record this process (host and PID) as the writer of the temporary ``directory``."""
    owner = {"host": socket.gethostname(), "pid": os.getpid()}
    (directory / OWNER_FILE).write_text(json.dumps(owner) + "\n")


def _owner_gone(directory: Path) -> bool:
    """Whether the process recorded in ``directory``'s owner file has ended; ``False`` when
    unknown (no owner file, another host, a process of another user)."""
    try:
        owner = json.loads((directory / OWNER_FILE).read_text())
        pid = int(owner["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    if owner.get("host") != socket.gethostname() or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def remove_stale_temporaries(out_root: Path) -> list[Path]:
    """Remove the temporary export directories (``.<name>.tmp-*``) under ``out_root`` whose
    writing process has ended (an export killed before it published), and displaced earlier
    exports (``.<name>.old-*``) left by one killed while publishing; return them.

    A directory still being written, or written on another host of a shared filesystem, is
    left alone: its owner file (``OWNER_FILE``) names its process and host.
    """
    removed = []
    for directory in sorted(out_root.glob(".*.tmp-*")):
        if directory.is_dir() and _owner_gone(directory):
            shutil.rmtree(directory, ignore_errors=True)
            print(f"removed {directory}, left by an export that did not finish")
            removed.append(directory)
    # A displaced earlier export (``_publish`` renames it aside, then removes it) is never read
    # again: one is left only by an export killed between its renames. Removing it while an
    # export is publishing is harmless, that export removes it anyway.
    for directory in sorted(out_root.glob(".*.old-*")):
        if directory.is_dir():
            shutil.rmtree(directory, ignore_errors=True)
            print(f"removed {directory}, an earlier export displaced by an unfinished one")
            removed.append(directory)
    return removed


@dataclass
class ExportResult:
    """What ``run_export`` published."""

    export_dir: Path
    manifest: dict[str, Any]
    parity: list[ParityResult]


def find_run_dir(log_dir: Path) -> Path:
    """The newest training run under ``log_dir`` (one with ``config.yaml`` and checkpoints)."""
    runs = [p.parent for p in log_dir.glob("**/config.yaml") if (p.parent / "checkpoints").is_dir()]
    if not runs:
        raise CheckpointError(
            f"no training run with checkpoints under {log_dir}; train one first "
            "(python scripts/train.py) or give run_dir=<run directory>"
        )
    return max(runs, key=lambda p: (p / "config.yaml").stat().st_mtime)


def find_checkpoint(run_dir: Path, which: str) -> tuple[Path, str | None]:
    """The checkpoint ``which`` (``best``, ``last`` or a path) of a run, with its recorded hash.

    ``best`` is the run's best checkpoint per ``metrics.json`` (or the single non-``last``
    checkpoint); the hash comes from ``checkpoints/sha256.json``, written as each checkpoint
    is saved.
    """
    ckpt_dir = run_dir / "checkpoints"
    if which not in ("best", "last"):
        path = Path(which)
    elif which == "last":
        path = ckpt_dir / "last.ckpt"
    else:
        path = None
        metrics = run_dir / "metrics.json"
        if metrics.is_file():
            best = json.loads(metrics.read_text()).get("best_checkpoint")
            path = Path(best) if best else None
        if path is None or not path.is_file():
            others = sorted(p for p in ckpt_dir.glob("*.ckpt") if p.name != "last.ckpt")
            path = others[-1] if others else ckpt_dir / "last.ckpt"
    if not path.is_file():
        found = sorted(p.name for p in ckpt_dir.glob("*.ckpt")) if ckpt_dir.is_dir() else []
        raise CheckpointError(
            f"run {run_dir}: checkpoint {which!r} not found (looked for {path}); checkpoints "
            f"there: {found or 'none'}. Give ckpt=last or ckpt=<path>."
        )
    return path, recorded_sha256(path)


def _unverified(ckpt_path: Path, require_hash: bool) -> None:
    """Warn about (or, with ``require_hash``, refuse) a checkpoint without a recorded hash."""
    record = ckpt_path.parent / HASH_RECORD
    what = (
        f"checkpoint {ckpt_path} has no recorded hash ({record} "
        + ("has no entry for it" if record.is_file() else "does not exist")
        + "), so it cannot be verified as the file its training run saved"
    )
    if require_hash:
        raise CheckpointError(
            f"{what}; refused (require_hash=true). Export a checkpoint from its run's "
            "checkpoints/ directory, or pass require_hash=false to export it unverified."
        )
    warnings.warn(
        f"{what}; exporting it unverified (require_hash=true refuses such a checkpoint)",
        UnverifiedCheckpointWarning,
        stacklevel=3,
    )


def validation_rows(run_dir: Path, contract: InputContract) -> ColumnarData:
    """The raw SoA sample of the run's validation split, written by the training run
    (``validation_sample.parquet``, hash-checked); the training data is not needed.

    Raises ``CheckpointError`` if the sample is missing, changed, or of another contract.
    """
    try:
        return read_sample(run_dir / SAMPLE_FILE, contract)
    except (FileNotFoundError, ValueError) as err:
        raise CheckpointError(f"run {run_dir}: {err}") from err


def _example(rows: ColumnarData, contract: InputContract, device: str) -> tuple[torch.Tensor, ...]:
    # Five rows with several objects: sizes of 0 or 1 would be specialised into the graph.
    order = (
        np.argsort(-np.sum([c.counts for c in rows.jagged.values()], axis=0))
        if rows.jagged
        else None
    )
    idx = np.sort(order[:5]) if order is not None else np.arange(5)
    soa = rows.take(idx % len(rows)).to_soa(contract)
    return tuple(
        torch.from_numpy(np.ascontiguousarray(soa[n])).to(device) for n in contract.input_names
    )


def _devices(requested: list[str] | str) -> list[str]:
    if requested == "auto" or requested == ["auto"]:
        return ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]
    devices = [requested] if isinstance(requested, str) else list(requested)
    for d in devices:
        if d not in ("cpu", "cuda"):
            raise ValueError(f"unknown export device {d!r}; use cpu, cuda or auto")
        if d == "cuda" and not torch.cuda.is_available():
            raise ValueError("export.devices asks for cuda but no CUDA device is available")
    return devices


def _export_one(
    fmt: str, device: str, loaded: LoadedCheckpoint, example: tuple, path: Path, cfg: DictConfig
) -> dict[str, Any]:
    graph = loaded.graph.to(device)
    if fmt == "torchscript":
        return formats.export_torchscript(graph, example, path)
    if fmt == "exported_program":
        return formats.save_program(graph, example, loaded.contract, path)
    if fmt == "aoti":
        program = formats.export_program(graph, example, loaded.contract)
        return formats.export_aoti(
            program,
            path,
            device,
            cfg.aoti.cpp_threads,
            contract=loaded.contract,
            cxx=str(cfg.aoti.get("cxx", "auto")),
        )
    metadata = formats.onnx_metadata(loaded.contract, cfg.parity.tolerance.onnx, provenance(REPO))
    return formats.export_onnx(graph, example, loaded.contract, path, cfg.onnx.opset, metadata)


def _publish(tmp_dir: Path, target: Path, overwrite: bool) -> None:
    """Move the finished export into place; the old one (if allowed) goes only after."""
    follow_umask(tmp_dir, directory=True)  # mkdtemp made it private while it was written
    (tmp_dir / OWNER_FILE).unlink()
    old = None
    if target.exists():
        if not overwrite:
            raise FileExistsError(f"{target} exists; pass overwrite=true or another name=")
        old = target.with_name(f".{target.name}.old-{int(time.time() * 1e6)}")
        target.rename(old)
    tmp_dir.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def run_export(cfg: DictConfig) -> ExportResult:
    """Export the run the config names; see ``configs/export.yaml`` for the options."""
    unknown = [f for f in cfg.formats if f not in FILES]
    if unknown or not cfg.formats:
        raise ValueError(f"unknown export formats {unknown or '[]'}; choose from {list(FILES)}")
    devices = _devices(cfg.devices if isinstance(cfg.devices, str) else list(cfg.devices))
    if cfg.get("name") is not None:
        check_export_name(cfg.name)
    run_dir = Path(cfg.run_dir) if cfg.get("run_dir") else find_run_dir(Path(cfg.paths.log_dir))
    ckpt_path, recorded_hash = find_checkpoint(run_dir, str(cfg.ckpt))
    if recorded_hash is None:
        _unverified(ckpt_path, bool(cfg.get("require_hash", False)))
    loaded = load_checkpoint(ckpt_path, recorded_hash)
    name = check_export_name(cfg.get("name") or _default_name(run_dir, loaded))
    out_root = Path(cfg.output_dir)
    target = out_root / name
    if target.exists() and not cfg.overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=true or another name=")
    try:
        out_root.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(out_root)
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=out_root))
        claim_directory(tmp_dir)
    except OSError as err:
        raise PermissionError(f"cannot write exports under {out_root}: {err}") from err

    try:
        return _export_into(cfg, tmp_dir, target, run_dir, loaded, name, devices)
    finally:
        if tmp_dir.exists():
            shutil.rmtree(tmp_dir, ignore_errors=True)


def _export_into(
    cfg: DictConfig,
    tmp_dir: Path,
    target: Path,
    run_dir: Path,
    loaded: LoadedCheckpoint,
    name: str,
    devices: list[str],
) -> ExportResult:
    contract = loaded.contract
    rows = validation_rows(run_dir, contract)
    plan = [(f, d) for f in cfg.formats for d in devices if not (f == "onnx" and d != "cpu")]

    artifacts: list[dict[str, Any]] = []
    for fmt, device in plan:
        file = FILES[fmt].format(suffix="" if device == "cpu" else f".{device}")
        path = tmp_dir / file
        entry: dict[str, Any] = {"format": fmt, "file": file, "device": device}
        started = time.perf_counter()
        try:
            entry.update(
                _export_one(fmt, device, loaded, _example(rows, contract, device), path, cfg)
            )
        except Exception as err:  # reported in the parity table, the export fails below
            entry["error"] = f"export failed: {type(err).__name__}: {err}"
        entry["export_seconds"] = round(time.perf_counter() - started, 3)
        print(
            f"exported {fmt:<11} {device:<5} in {entry['export_seconds']:7.1f} s"
            + (f"  ({entry['error'].splitlines()[0][:100]})" if "error" in entry else "")
        )
        artifacts.append(entry)
    loaded.graph.to("cpu")

    sizes = sorted(set(cfg.parity.batch_sizes) | {int(cfg.parity.large_batch)})
    cases, case_sizes = build_cases(rows, contract, sizes, int(cfg.parity.rowwise))
    reference = eager_outputs(loaded.graph, cases)
    results: list[ParityResult] = []
    for entry in artifacts:
        tol = Tolerance(**cfg.parity.tolerance[entry["format"]])
        opts = list(cfg.parity.onnx_optimizations) if entry["format"] == "onnx" else [None]
        entry["parity"] = []
        for opt in opts:
            if "error" in entry:
                res = ParityResult(
                    entry["format"],
                    entry["device"],
                    entry["file"],
                    opt,
                    sizes,
                    None,
                    None,
                    None,
                    None,
                    False,
                    vars(tol),
                    entry["error"],
                )
            else:
                res = compare(
                    entry["format"],
                    entry["device"],
                    tmp_dir / entry["file"],
                    cases,
                    case_sizes,
                    reference,
                    tol,
                    opt,
                )
            results.append(res)
            entry["parity"].append(res.to_dict())
        entry["passed"] = all(p["passed"] for p in entry["parity"])
        if (tmp_dir / entry["file"]).is_file():
            entry["sha256"] = sha256_file(tmp_dir / entry["file"])
            entry["bytes"] = (tmp_dir / entry["file"]).stat().st_size
        entry["dynamic_dims"] = contract.input_dims
    table = format_table(results)
    print(table)
    failures = format_failures(results)
    if failures:
        print(failures)

    golden = rows.take(np.arange(min(int(cfg.golden_rows), len(rows))))
    golden_arrays = golden_set(loaded, golden)
    np.savez(tmp_dir / "golden.npz", **{k: a for k, (_, a) in golden_arrays.items()})

    all_passed = all(e["passed"] for e in artifacts)
    any_passed = any(e["passed"] for e in artifacts)
    published = [e for e in artifacts if "sha256" in e]
    dims = contract.input_dims
    exprs = contract.input_exprs
    manifest = {
        "schema_version": MANIFEST_VERSION,
        "name": name,
        "created": now_utc(),
        "contract": contract.to_dict(),
        "inputs": [
            {
                "name": n,
                "position": i,
                "dtype": contract.input_dtypes[n],
                "shape": [dims[n]],
                "expr": exprs[n],
            }
            for i, n in enumerate(contract.input_names)
        ],
        "outputs": [
            {
                "name": o,
                "dtype": "float32",
                "shape": ["batch"],
                "meaning": contract.output_meaning(o),
            }
            for o in contract.outputs
        ],
        "dims": dim_meanings(contract),
        "offsets_rule": OFFSETS_RULE,
        "tolerance": {f: dict(cfg.parity.tolerance[f]) for f in cfg.formats},
        "artifacts": published,
        "parity": {
            "passed": all_passed,
            "table": table,
            "cases": {k: v for k, v in case_sizes.items() if not k.startswith("row")},
            "rowwise_rows": sum(k.startswith("row") for k in case_sizes),
            "reference": "eager deploy graph, float32, CPU",
        },
        "golden": {
            "file": "golden.npz",
            "sha256": sha256_file(tmp_dir / "golden.npz"),
            "rows": len(golden),
            "arrays": {
                k: {"role": role, "dtype": str(a.dtype), "shape": list(a.shape)}
                for k, (role, a) in golden_arrays.items()
            },
        },
        "source": {
            "run_dir": str(run_dir.resolve()),
            "checkpoint": str(loaded.path.resolve()),
            "checkpoint_sha256": loaded.sha256,
            "net": loaded.net_config,
        },
        "provenance": provenance(REPO),
        "allow_partial": bool(cfg.allow_partial),
        "failed_artifacts": [f"{e['format']}/{e['device']}" for e in artifacts if not e["passed"]],
    }
    manifest["provenance"]["cpu_isa"] = formats.cpu_isa()
    if cfg.get("triton"):
        golden_by_name = {k: a for k, (_, a) in golden_arrays.items()}
        example = _example(rows, contract, "cpu")
        manifest["triton"] = triton.write_repository(
            tmp_dir, name, loaded, example, golden_by_name, cfg.parity.tolerance
        )
    validate_manifest(manifest)
    text = json.dumps(manifest, indent=2) + "\n"
    atomic_write_text(tmp_dir / MANIFEST_FILE, text)
    atomic_write_text(tmp_dir / MANIFEST_HASH_FILE, sha256_file(tmp_dir / MANIFEST_FILE) + "\n")
    shutil.copyfile(MANIFEST_SCHEMA_FILE, tmp_dir / SCHEMA_FILE)

    if not all_passed and not (cfg.allow_partial and any_passed):
        failed = ", ".join(f"{e['format']}/{e['device']}" for e in artifacts if not e["passed"])
        raise ExportFailed(
            f"{failed} failed (see the table and the reasons above); nothing was published "
            f"to {target}. "
            "Pass allow_partial=true to publish the formats that passed."
        )
    _publish(tmp_dir, target, bool(cfg.overwrite))
    print(f"published {target}")
    return ExportResult(target, manifest, results)


def golden_set(loaded: LoadedCheckpoint, rows: ColumnarData) -> dict[str, tuple[str, np.ndarray]]:
    """The golden arrays by name, each with its role: the raw inputs, the eager graph's
    outputs, and the rows' truth (labels, regression targets) where they have it."""
    contract = loaded.contract
    inputs = {n: np.ascontiguousarray(a) for n, a in rows.to_soa(contract).items()}
    with torch.inference_mode():
        outputs = loaded.graph(*(torch.from_numpy(inputs[n]) for n in contract.input_names))
    arrays = {n: ("input", a) for n, a in inputs.items()}
    arrays.update(
        {o: ("output", t.numpy()) for o, t in zip(contract.outputs, outputs, strict=True)}
    )
    if rows.labels is not None:
        arrays["labels"] = ("label", rows.labels)
    for target in contract.regression:
        arrays[f"true_{target.name}"] = ("target", rows.targets[target.name])
    return arrays


def dim_meanings(contract: InputContract) -> dict[str, str]:
    """What each symbolic dimension of the inputs and outputs means."""
    dims = {"batch": "rows in the call"} if contract.flat or contract.jagged else {}
    for coll in contract.jagged:
        dims["batch_plus_1"] = "batch + 1 (a collection's offsets)"
        dims[f"n_{coll.name}"] = (
            f"length of the {coll.name} field arrays (>= {coll.offsets_name}[-1])"
        )
    return dims


def _default_name(run_dir: Path, loaded: LoadedCheckpoint) -> str:
    """The run's model choice (``mlp``; the last part of a nested ``group/option``), else the
    network's class name in lower case."""
    hydra_cfg = run_dir / ".hydra" / "hydra.yaml"
    if hydra_cfg.is_file():
        choice = OmegaConf.load(hydra_cfg).hydra.runtime.choices.get("model")
        if choice:
            return str(choice).rsplit("/", 1)[-1]
    return str(loaded.net_config["_target_"]).rsplit(".", 1)[-1].lower()
