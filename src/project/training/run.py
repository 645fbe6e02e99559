"""The training job behind ``scripts/train.py``: compose, fit, test, write the run directory."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from filelock import FileLock, Timeout
from hydra.errors import InstantiationException
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from omegaconf import DictConfig, OmegaConf

from project.contract import ContractError, InputContract
from project.data.sample import DEFAULT_SAMPLE_ROWS, SAMPLE_FILE, write_sample
from project.soa.checkpoint import CheckpointError, read_checkpoint, recorded_sha256
from project.training.callbacks import EpochTimer, HashedCheckpointIO, RandomState
from project.training.module import NonFiniteLossError
from project.utils import atomic_write_text, profiling
from project.utils.importing import UntrustedTargetError, allowed_targets, check_target

LOCK_FILE = ".lock"
RESUME_DIR_RESOLVER = "resume_run_dir"
PRECISION_RESOLVER = "best_precision"


class RunError(RuntimeError):
    """A run that cannot go ahead as configured: its directory is in use by another training,
    or the checkpoint to resume is not one of this configuration's."""


# Errors about what the user gave (a config value, a data file, a checkpoint): the CLI prints
# their message alone, without a traceback. A value that a constructor refused reaches the
# CLI wrapped by Hydra (``InstantiationException``).
USER_ERRORS = (
    ContractError,
    RunError,
    NonFiniteLossError,
    FileNotFoundError,
    InstantiationException,
)


def describe_error(err: BaseException) -> str:
    """The message of one of ``USER_ERRORS`` as the CLI prints it: for an error raised while
    Hydra built a config group, the constructor's own message."""
    if isinstance(err, InstantiationException) and err.__cause__ is not None:
        return str(err.__cause__)
    return str(err)


def instantiate_group(cfg: DictConfig | None) -> list[Any]:
    """Instantiate every entry of a config group dict (callbacks, loggers) that has a
    ``_target_``; entries set to null are skipped, so an override can switch one off."""
    if not cfg:
        return []
    return [hydra.utils.instantiate(c) for c in cfg.values() if c is not None and "_target_" in c]


@rank_zero_only
def print_config_tree(cfg: DictConfig) -> None:
    """Print the composed config as a rich tree, one branch per top-level group."""
    import rich
    import rich.syntax
    import rich.tree

    tree = rich.tree.Tree("config", style="dim", guide_style="dim")
    for key, value in cfg.items():
        branch = tree.add(str(key), style="bold")
        text = (
            OmegaConf.to_yaml(value, resolve=False) if isinstance(value, DictConfig) else str(value)
        )
        branch.add(rich.syntax.Syntax(text, "yaml"))
    rich.print(tree)


def newest_last_checkpoint(task_dir: Path, exclude: Path | None = None) -> Path | None:
    """The most recently written ``checkpoints/last.ckpt`` of the runs under ``task_dir``
    (``<log_dir>/<task_name>``: that task's runs and sweep trials), leaving out the run
    directory ``exclude``; ``None`` if there is none."""
    candidates = [
        p
        for p in task_dir.glob("**/checkpoints/last.ckpt")
        if exclude is None or Path(exclude) not in p.parents
    ]
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def run_dir_of(checkpoint: Path) -> Path | None:
    """The run directory a checkpoint belongs to (``<run>/checkpoints/<file>`` beside the
    run's ``config.yaml``), or ``None`` for a checkpoint kept elsewhere."""
    run_dir = checkpoint.parent.parent
    if checkpoint.parent.name == "checkpoints" and (run_dir / "config.yaml").is_file():
        return run_dir
    return None


def resume_run_dir(ckpt_path: Any, task_dir: str, new_run_dir: str) -> str:
    """Hydra's run directory (``hydra.run.dir`` in ``configs/train.yaml``): a resumed run
    continues in the directory of the run it resumes, any other run gets ``new_run_dir``.

    ``ckpt_path=last`` resumes the newest run of this task (``task_dir``) that has a
    ``checkpoints/last.ckpt``; ``ckpt_path=<run>/checkpoints/<file>`` resumes that run. Without
    such a run (or with ``ckpt_path=null``) the run is a new one; ``train`` then says what is
    missing. A ``hydra.run.dir`` given on the command line replaces this choice.
    """
    if ckpt_path is None:
        return new_run_dir
    if str(ckpt_path) == "last":
        found = newest_last_checkpoint(Path(task_dir))
        run_dir = found.parent.parent if found is not None else None
    else:
        path = Path(str(ckpt_path))
        run_dir = run_dir_of(path) if path.is_file() else None
    return str(run_dir) if run_dir is not None else new_run_dir


def best_precision(accelerator: Any) -> str:
    """The trainer's precision for ``trainer.precision=${best_precision:...}`` (the default):
    ``bf16-mixed`` where the accelerator is (or, for ``auto``, will be) a CUDA GPU with bf16
    arithmetic (compute capability 8.0 and later), ``32-true`` elsewhere (the CPU, older
    GPUs)."""
    if str(accelerator) not in ("auto", "gpu", "cuda") or not torch.cuda.is_available():
        return "32-true"
    return "bf16-mixed" if torch.cuda.get_device_capability() >= (8, 0) else "32-true"


def register_resolvers() -> None:
    """Register ``${resume_run_dir:...}`` (``resume_run_dir``) and ``${best_precision:...}``
    (``best_precision``) with OmegaConf; whatever composes ``configs/train.yaml`` (the
    training entry point, the benchmarks, the tests) calls this first."""
    OmegaConf.register_new_resolver(RESUME_DIR_RESOLVER, resume_run_dir, replace=True)
    OmegaConf.register_new_resolver(PRECISION_RESOLVER, best_precision, replace=True)


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path, task_dir: Path) -> str | None:
    """Turn ``ckpt_path=last`` into a checkpoint file.

    ``last`` means this run directory's ``checkpoints/last.ckpt`` if it exists (what the CLI
    resumes: ``hydra.run.dir`` follows the resumed run), otherwise the ``last.ckpt`` of the
    newest earlier run of the same task, under ``task_dir`` (``<log_dir>/<task_name>``): never
    another task's. Any other value is a path and must exist.
    """
    if ckpt_path is None:
        return None
    if ckpt_path != "last":
        if not Path(ckpt_path).is_file():
            raise FileNotFoundError(f"ckpt_path={ckpt_path} does not exist")
        return str(ckpt_path)
    own = output_dir / "checkpoints" / "last.ckpt"
    if own.is_file():
        return str(own)
    found = newest_last_checkpoint(task_dir, exclude=output_dir)
    if found is None:
        raise FileNotFoundError(
            f"ckpt_path=last: no checkpoints/last.ckpt under {task_dir} (the runs of this "
            "task); train a run first or give ckpt_path=<file>"
        )
    return str(found)


@contextlib.contextmanager
def run_directory_lock(output_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on the run directory (``<output_dir>/.lock``) for the block.

    A second training given the same directory fails at once instead of mixing its
    checkpoints and configs with the first one's. The lock is an ``fcntl`` lock (``filelock``):
    the system releases it when its process dies, so a killed run can be resumed. Only global
    rank zero takes it: the other DDP ranks of the same run share the directory.
    """
    if rank_zero_only.rank != 0:
        yield
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    lock = FileLock(output_dir / LOCK_FILE, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        raise RunError(
            f"run directory {output_dir} is in use by another training (it holds "
            f"{output_dir / LOCK_FILE}); two runs in one directory would mix their checkpoints "
            "and configs. Wait for that run to end, or give this one another directory "
            "(hydra.run.dir=...)."
        ) from None
    try:
        yield
    finally:
        lock.release()


def _net_config(cfg: DictConfig) -> dict[str, Any]:
    return OmegaConf.to_container(cfg.model.net, resolve=True)  # type: ignore[return-value]


def check_resume(ckpt_path: str, cfg: DictConfig, contract: InputContract) -> None:
    """Refuse to resume from a checkpoint that this configuration did not write.

    Read with ``torch.load(weights_only=True)`` before Lightning opens it: its recorded hash
    (``sha256.json`` beside it, where there is one) must match; its network, optimiser and
    scheduler targets must be ones the project names (``project.utils.importing``), the same
    rule as for export; and its network config and contract (input names, classes, outputs,
    then the constants fitted on the training split) must be this run's (``contract``, the
    DataModule's fitted one). Raises ``RunError`` saying what differs.
    """
    path = Path(ckpt_path)
    try:
        checkpoint, _ = read_checkpoint(path, recorded_sha256(path))
    except CheckpointError as err:
        raise RunError(f"cannot resume from {path}: {err}") from err
    hparams = checkpoint["hyper_parameters"]
    allowed = allowed_targets()
    for key in ("net", "optimizer", "scheduler"):
        part = hparams.get(key)
        if part is None:
            continue
        target = part.get("_target_") if isinstance(part, dict) else None
        try:
            if not isinstance(target, str):
                raise UntrustedTargetError(
                    f"model.{key}._target_ must be a dotted path, got {target!r}"
                )
            check_target(target, allowed, what=f"the checkpoint's model.{key}._target_")
        except UntrustedTargetError as err:
            raise RunError(f"cannot resume from {path}: {err}") from None
    ours = _net_config(cfg)
    if hparams["net"] != ours:
        keys = sorted(k for k in {*ours, *hparams["net"]} if ours.get(k) != hparams["net"].get(k))
        differ = ", ".join(
            f"{k}: {hparams['net'].get(k)!r} there, {ours.get(k)!r} here" for k in keys
        )
        raise RunError(
            f"cannot resume from {path}: it was trained with another model (model.net {differ}). "
            "Resume with the model it was trained with, or start a new run without ckpt_path."
        )
    try:
        theirs = InputContract.from_dict(hparams["contract"])
    except (ContractError, KeyError, TypeError) as err:
        raise RunError(f"cannot resume from {path}: its contract is unreadable: {err}") from err
    for what, here, there in (
        ("input names", contract.input_names, theirs.input_names),
        ("classes", list(contract.classes), list(theirs.classes)),
        ("outputs", list(contract.outputs), list(theirs.outputs)),
    ):
        if here != there:
            raise RunError(
                f"cannot resume from {path}: its contract has other {what} ({there} there, "
                f"{here} in this data config). Resume with the data config it was trained "
                "with, or start a new run without ckpt_path."
            )
    if theirs != contract:
        mine, saved = contract.to_dict(), theirs.to_dict()
        keys = sorted(k for k in {*mine, *saved} if mine.get(k) != saved.get(k))
        raise RunError(
            f"cannot resume from {path}: its contract differs from this run's in {keys} "
            "(transforms, lengths, or the constants fitted on the training split: the data "
            "changed since). Resume with the data it was trained on, or start a new run "
            "without ckpt_path."
        )


def train(cfg: DictConfig) -> dict[str, float]:
    """Train (and test) the model the config describes; return the final metrics.

    The run directory (``cfg.paths.output_dir``) receives the resolved config, checkpoints,
    TensorBoard logs, plots and ``metrics.json``; only rank zero writes the shared files, and
    holds the directory's lock (``run_directory_lock``) from the first write to the last. A
    resumed run (``ckpt_path``) first checks the checkpoint (``check_resume``) and continues
    with its random generator states (``RandomState``).
    """
    print_config_tree(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    task_dir = Path(cfg.paths.log_dir) / str(cfg.task_name)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir, task_dir)

    # A streaming run keeps its indexing pass in the run directory: a resumed run reads it.
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all", cache_dir=str(output_dir))
    # Fit the standardisation before the model exists: its constants are part of the model.
    datamodule.prepare_data()
    datamodule.setup("fit")
    with run_directory_lock(output_dir):
        if ckpt_path is not None:
            check_resume(ckpt_path, cfg, datamodule.contract)
        return _fit_and_test(cfg, datamodule, output_dir, ckpt_path)


def _fit_and_test(
    cfg: DictConfig, datamodule: Any, output_dir: Path, ckpt_path: str | None
) -> dict[str, float]:
    model = hydra.utils.instantiate(cfg.model, contract=datamodule.contract.to_dict())
    # Raw validation rows beside the checkpoints: the export reads them, not the training data.
    rank_zero_only(write_sample)(
        datamodule.head("val", DEFAULT_SAMPLE_ROWS), datamodule.contract, output_dir / SAMPLE_FILE
    )

    timer = EpochTimer()
    callbacks = [*instantiate_group(cfg.get("callbacks")), timer, RandomState()]
    loggers = instantiate_group(cfg.get("logger"))
    plugins = hydra.utils.instantiate(cfg.trainer.get("plugins")) or []
    # A profiler (profiler=simple|advanced|pytorch) writes into the run directory, and
    # switches on the template's named ranges (project.utils.profiling).
    profiler = hydra.utils.instantiate(cfg.profiler) if cfg.get("profiler") else None
    if profiler is not None:
        profiling.enable()
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer,
        callbacks=callbacks,
        logger=loggers or False,
        plugins=[*plugins, HashedCheckpointIO()],
        profiler=profiler,
    )
    _write_resolved_config(cfg, output_dir, trainer)

    started = time.perf_counter()
    # weights_only: Lightning unpickles nothing but tensors and plain containers.
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    fit_seconds = time.perf_counter() - started
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}

    if cfg.get("test", True):
        # The best-metric checkpoint by its path (what ``ckpt_path="best"`` resolves to): the
        # first checkpoint callback is the one that monitors the metric (callbacks/default.yaml).
        checkpoint = trainer.checkpoint_callback
        best = checkpoint.best_model_path if checkpoint is not None else None
        results = trainer.test(
            model, datamodule=datamodule, ckpt_path=best or None, weights_only=True
        )
        metrics.update({k: float(v) for k, v in (results[0] if results else {}).items()})

    summary = {
        "metrics": metrics,
        "fit_seconds": fit_seconds,
        "epoch_seconds": timer.epoch_times,
        "epochs": trainer.current_epoch,
        "global_step": trainer.global_step,
        "world_size": trainer.world_size,
        # Whether the data streamed, the rows per split, and the files left out
        # (data.on_bad_file=skip) with the reason.
        "data": datamodule.report(),
        "cuda_graph_steps": getattr(model, "cuda_graph_steps", 0),
        "resumed_from": ckpt_path,
        "best_checkpoint": getattr(trainer.checkpoint_callback, "best_model_path", None),
    }
    if trainer.is_global_zero:
        atomic_write_text(output_dir / "metrics.json", json.dumps(summary, indent=2) + "\n")
        rank_zero_info(f"run directory: {output_dir}")
        if "test/auroc" in metrics:
            rank_zero_info(f"test AUC: {metrics['test/auroc']:.4f}")
    return metrics


def _write_resolved_config(cfg: DictConfig, output_dir: Path, trainer: L.Trainer) -> None:
    if trainer.is_global_zero:
        atomic_write_text(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
