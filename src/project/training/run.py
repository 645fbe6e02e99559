"""The training job behind ``scripts/train.py``: compose, fit, test, write the run directory."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only
from omegaconf import DictConfig, OmegaConf

from project.data.sample import DEFAULT_SAMPLE_ROWS, SAMPLE_FILE, write_sample
from project.training.callbacks import EpochTimer
from project.utils import atomic_write_text


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


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path, log_dir: Path) -> str | None:
    """Turn ``ckpt_path=last`` into a checkpoint file.

    ``last`` means this run directory's ``checkpoints/last.ckpt`` if it exists (a run restarted
    with the same ``hydra.run.dir``), otherwise the ``last.ckpt`` of the newest earlier run
    under ``log_dir``. Any other value is a path and must exist.
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
    candidates = sorted(
        (p for p in log_dir.glob("**/checkpoints/last.ckpt") if output_dir not in p.parents),
        key=lambda p: p.stat().st_mtime,
    )
    if not candidates:
        raise FileNotFoundError(
            f"ckpt_path=last: no checkpoints/last.ckpt under {log_dir}; train a run first or "
            "give ckpt_path=<file>"
        )
    return str(candidates[-1])


def train(cfg: DictConfig) -> dict[str, float]:
    """Train (and test) the model the config describes; return the final metrics.

    The run directory (``cfg.paths.output_dir``) receives the resolved config, checkpoints,
    TensorBoard logs, plots and ``metrics.json``; only rank zero writes the shared files.
    """
    print_config_tree(cfg)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True)
    output_dir = Path(cfg.paths.output_dir)
    ckpt_path = resolve_ckpt_path(cfg.get("ckpt_path"), output_dir, Path(cfg.paths.log_dir))

    # A streaming run keeps its indexing pass in the run directory: a resumed run reads it.
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all", cache_dir=str(output_dir))
    # Fit the standardisation before the model exists: its constants are part of the model.
    datamodule.prepare_data()
    datamodule.setup("fit")
    model = hydra.utils.instantiate(cfg.model, contract=datamodule.contract.to_dict())
    # Raw validation rows beside the checkpoints: the export reads them, not the training data.
    rank_zero_only(write_sample)(
        datamodule.head("val", DEFAULT_SAMPLE_ROWS), datamodule.contract, output_dir / SAMPLE_FILE
    )

    timer = EpochTimer()
    callbacks = [*instantiate_group(cfg.get("callbacks")), timer]
    loggers = instantiate_group(cfg.get("logger"))
    trainer: L.Trainer = hydra.utils.instantiate(
        cfg.trainer, callbacks=callbacks, logger=loggers or False
    )
    _write_resolved_config(cfg, output_dir, trainer)

    started = time.perf_counter()
    trainer.fit(model, datamodule=datamodule, ckpt_path=ckpt_path)
    fit_seconds = time.perf_counter() - started
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}

    if cfg.get("test", True):
        # The best-metric checkpoint by its path (what ``ckpt_path="best"`` resolves to): the
        # first checkpoint callback is the one that monitors the metric (callbacks/default.yaml).
        checkpoint = trainer.checkpoint_callback
        best = checkpoint.best_model_path if checkpoint is not None else None
        results = trainer.test(model, datamodule=datamodule, ckpt_path=best or None)
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
