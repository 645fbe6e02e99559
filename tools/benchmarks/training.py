"""``scripts/benchmark.py train``: the template's training path against hand-written loops.

All sides train the same network (built from the same model config), with the same
optimiser, batch size, precision and data, for a fixed number of optimiser steps after a
warm-up:

(a) ``template``: the real ``SoADataModule`` + ``ClassifierModule`` + Lightning ``Trainer``
    composed from ``configs/`` (validation, checkpoints and the progress bar off, a CSV
    logger on), on any number of devices, with the template's defaults for whatever the
    command line leaves open (on one GPU: the whole step in a CUDA graph, ``steps_per_call``
    optimiser steps per Lightning step, ``torch.compile`` with ``model.compile=auto``);
(b) ``handwritten``: a minimal eager PyTorch loop over GPU-resident (or host) tensors that
    were assembled once, sliced by a device-side permutation. It builds the same
    ``DeployableModel`` and takes the template's loss (``project.training.module.loss_terms``),
    so only the plumbing differs;
(c) ``ceiling`` (``--ceiling``, CUDA only): what the hardware allows for this step, a
    hand-written step with the batch gather from the resident split, the forward, the loss,
    the backward and a fused capturable AdamW captured in ONE CUDA graph and replayed, once
    with eager kernels and once with the model through ``torch.compile`` inside the graph.

Throughput is rows per second over the timed steps, summed over all devices.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

# tools/benchmarks/training.py -> the checkout's configs/
CONFIG_DIR = Path(__file__).resolve().parents[2] / "configs"


def batch_rows(batch: Any) -> int:
    """Rows in a training batch: a SoA batch, a device-resident one or a list of either."""
    from project.data.batching import LABEL

    if isinstance(batch, list):
        return sum(batch_rows(b) for b in batch)
    rows = getattr(batch, "rows", None)  # a ResidentBatch, not gathered yet
    return len(rows) if rows is not None else len(batch[LABEL])


class StepTimer(L.Callback):
    """Wall time from the start of Lightning step ``warmup`` to the end of training,
    device-synchronised, and the rows trained in that time (``rows``)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: float | None = None
        self.seconds = 0.0
        self.rows = 0
        self.resident = False  # whether the training split lives on the training device

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Note where the training batches are formed (the loader's columns' device; a
        streamed loader has none: its batches are formed on the host)."""
        loader = trainer.train_dataloader
        tensors = getattr(getattr(loader, "loader", loader), "tensors", None)
        self.resident = tensors is not None and tensors.device.type != "cpu"

    def _sync(self, pl_module: L.LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Start the clock once the warm-up steps are done."""
        if trainer.global_step == self.warmup and self.start is None:
            self._sync(pl_module)
            self.start = time.perf_counter()

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Count the step's rows."""
        if self.start is not None:
            self.rows += batch_rows(batch)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Stop the clock."""
        self._sync(pl_module)
        if self.start is not None:
            self.seconds = time.perf_counter() - self.start


class RowTimer(StepTimer):
    """Wall time over ``rows`` training rows after ``warmup_rows`` of warm-up; training is
    stopped once they are trained (a Lightning step takes ``steps_per_call`` batches, so
    steps are counted in rows)."""

    def __init__(self, warmup_rows: int, rows: int) -> None:
        super().__init__(warmup=-1)
        self.warmup_rows, self.limit = warmup_rows, rows
        self.seen = 0

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Start the clock once the warm-up rows are trained."""
        if self.start is None and self.seen >= self.warmup_rows:
            self._sync(pl_module)
            self.start = time.perf_counter()

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Count the rows; stop the clock and the training after ``rows`` of them."""
        n = batch_rows(batch)
        self.seen += n
        if self.start is None or self.seconds:
            return
        self.rows += n
        if self.rows >= self.limit:
            self._sync(pl_module)
            self.seconds = time.perf_counter() - self.start
            trainer.should_stop = True

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """The clock stopped already."""


def compose_benchmark(args: argparse.Namespace, output_dir: Path) -> DictConfig:
    """The training config of one benchmark case (toy data of ``args.rows`` rows)."""
    from project.training.run import register_resolvers

    register_resolvers()
    # The model's experiment config when there is one (experiment=mlp trains on the flat
    # columns only, experiment=transformer sets its batch size), on toy data of the same schema.
    experiment = CONFIG_DIR / "experiment" / f"{args.model}.yaml"
    overrides = [
        f"experiment={args.model}" if experiment.is_file() else f"model={args.model}",
        "data=toy",
        f"data.source.n_jets={args.rows}",
        "data.split=[0.98,0.01,0.01]",
        *([f"data.batch_size={args.batch_size}"] if args.batch_size else []),
        f"trainer.accelerator={args.accelerator}",
        f"trainer.devices={args.devices}",
        *([] if args.precision == "auto" else [f"trainer.precision={args.precision}"]),
        f"model.compile={args.compile}",
        "logger=csv",
        *args.overrides,
    ]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.trainer.max_steps = -1
        cfg.trainer.max_epochs = -1
        cfg.trainer.min_epochs = None
        cfg.trainer.limit_val_batches = 0
        cfg.trainer.num_sanity_val_steps = 0
        cfg.trainer.enable_checkpointing = False
        cfg.trainer.enable_progress_bar = False
        cfg.trainer.enable_model_summary = False
    return cfg


def _compiled(cfg: DictConfig, device: str) -> bool:
    """What ``model.compile`` resolves to on ``device``."""
    value = cfg.model.compile
    return value is True or (value == "auto" and device.startswith("cuda"))


def run_template(cfg: DictConfig, warmup: int, steps: int) -> dict[str, Any]:
    """Train through the template's path; rows/s over the timed steps, all ranks together."""
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")
    model = hydra.utils.instantiate(cfg.model, contract=datamodule.contract.to_dict())
    batch = int(cfg.data.batch_size)
    timer = RowTimer(warmup * batch, steps * batch)
    loggers = [hydra.utils.instantiate(c) for c in cfg.logger.values()]
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=[timer], logger=loggers)
    trainer.fit(model, datamodule=datamodule)
    rows = timer.rows * trainer.world_size
    return {
        "rows_per_s": rows / timer.seconds if timer.seconds else float("nan"),
        "world_size": trainer.world_size,
        "is_global_zero": trainer.is_global_zero,
        "resident": timer.resident,
        "graph_steps": model.cuda_graph_steps,
        "steps_per_call": model.steps_per_call,
        "compiled": model._compiled is not None,
        "precision": str(trainer.precision),
    }


def _setup(cfg: DictConfig, device: str) -> tuple[Any, Any, Any]:
    """Contract, training split (on the host) and model (on ``device``) of a hand-written
    side."""
    from project.data.batching import SoATensors
    from project.soa.deployable import build_model

    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")
    contract = datamodule.contract
    model = build_model(contract, dict(cfg.model.net)).to(device)
    return contract, SoATensors(datamodule.splits["train"], contract), model


def run_handwritten(cfg: DictConfig, warmup: int, steps: int, device: str) -> dict[str, Any]:
    """The same network, optimiser, loss and data in a minimal eager loop over pre-assembled
    tensors."""
    from project.data.batching import LABEL, TARGETS, WEIGHT
    from project.training.module import loss_terms

    contract, train, model = _setup(cfg, device)
    with torch.no_grad():  # assemble every row once, then only slice
        full = train.to(device, resident=False).batch(
            torch.arange(train.n_rows, device=device), fixed_size=False
        )
        flat, jagged, masks = model.assembler([full[n] for n in contract.input_names])
    flat, jagged, masks = (
        flat.to(device),
        [j.to(device) for j in jagged],
        [m.to(device) for m in masks],
    )
    truth = {k: full[k].to(device) for k in (LABEL, WEIGHT, TARGETS) if k in full}
    optimizer = hydra.utils.instantiate(cfg.model.optimizer)(params=model.net.parameters())
    amp = cfg.trainer.precision == "bf16-mixed"
    smoothing = float(cfg.model.get("label_smoothing", 0.0))
    batch = int(cfg.data.batch_size)
    # Compiled like the template's model, so the ratio compares the plumbing and not the
    # compiler.
    net = torch.compile(model.net, dynamic=False) if _compiled(cfg, device) else model.net
    order = torch.randperm(train.n_rows, device=device)
    position = 0

    def step() -> None:
        nonlocal order, position
        if position + batch > train.n_rows:
            order, position = torch.randperm(train.n_rows, device=device), 0
        idx = order[position : position + batch]
        position += batch
        with torch.autocast(
            device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=amp
        ):
            head = net(flat[idx], [j[idx] for j in jagged], [m[idx] for m in masks])
            rows = {k: v[idx] for k, v in truth.items()}
            loss = loss_terms(
                head, rows, contract, model.target_mean, model.target_scale, smoothing
            )["total"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.train()
    return {"rows_per_s": _timed(step, warmup, steps, device) * batch}


def _timed(step: Any, warmup: int, steps: int, device: str) -> float:
    """Steps per second of ``step()`` over ``steps`` calls after ``warmup``."""
    for _ in range(warmup):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return steps / (time.perf_counter() - start)


def run_ceiling(
    cfg: DictConfig, warmup: int, steps: int, device: str, compiled: bool
) -> dict[str, Any]:
    """The hardware's pace for this step: gather, forward, loss, backward and a fused
    capturable AdamW in one CUDA graph, replayed (``compiled``: the model through
    ``torch.compile`` inside the graph). Python runs two calls a step: copy the batch's row
    indices into the graph's input, replay."""
    from project.training.module import loss_terms

    contract, train, model = _setup(cfg, device)
    train = train.to(device)  # the resident layout: the gather is a few device kernels
    model.train()
    optimizer = hydra.utils.instantiate(cfg.model.optimizer)(
        params=model.parameters(), fused=True, capturable=True
    )
    for group in optimizer.param_groups:  # a device tensor, as a scheduler would update it
        group["lr"] = torch.tensor(float(group["lr"]), device=device)
    forward = torch.compile(model, dynamic=False) if compiled else model
    amp = cfg.trainer.precision == "bf16-mixed"
    smoothing = float(cfg.model.get("label_smoothing", 0.0))
    batch = int(cfg.data.batch_size)
    names = contract.input_names
    order = torch.randperm(train.n_rows, device=device)
    rows = order[:batch].clone()

    def step() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        data = train.batch(rows)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp, cache_enabled=False):
            head = forward([data[n] for n in names])
            loss = loss_terms(
                head, data, contract, model.target_mean, model.target_scale, smoothing
            )["total"]
        loss.backward()
        optimizer.step()
        return loss.detach()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    position = 0

    def replay() -> None:
        nonlocal order, position
        if position + batch > train.n_rows:
            order, position = torch.randperm(train.n_rows, device=device), 0
        rows.copy_(order[position : position + batch])
        position += batch
        graph.replay()

    return {"rows_per_s": _timed(replay, warmup, steps, device) * batch}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``benchmark.py train``."""
    parser.add_argument("--model", default="mlp", help="model config: mlp, deepsets, transformer")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="default: the model's experiment config's"
    )
    parser.add_argument("--steps", type=int, default=400, help="timed optimiser steps")
    parser.add_argument("--warmup", type=int, default=40, help="optimiser steps before timing")
    parser.add_argument("--rows", type=int, default=200_000, help="toy rows generated")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument(
        "--precision",
        default="32-true",
        help="32-true, bf16-mixed, or auto (the template's default: bf16-mixed on a GPU with bf16)",
    )
    parser.add_argument(
        "--compile",
        default="auto",
        choices=["auto", "true", "false"],
        help="model.compile (auto: on a CUDA device); the hand-written loop follows it",
    )
    parser.add_argument("--skip-handwritten", action="store_true")
    parser.add_argument(
        "--ceiling",
        action="store_true",
        help="also the ceiling: the whole step in one CUDA graph, eager kernels and compiled",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="alternating runs of each side (one device)"
    )
    parser.add_argument("--json", type=Path, help="append the result as a JSON line here")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for the template")
    from tools.benchmarks import streaming

    streaming.add_arguments(parser)


def _rate(values: list[float]) -> int | None:
    return round(statistics.median(values)) if values else None


def main(args: argparse.Namespace) -> int:
    """Run the sides and print one table row (rank zero only under DDP); with
    ``--stream-compare`` or ``--stream-epoch``, the streaming benchmark
    (``tools.benchmarks.streaming``)."""
    from project.training.run import register_resolvers

    register_resolvers()
    if args.stream_compare or args.stream_epoch:
        from tools.benchmarks import streaming

        return streaming.main(args)
    os.environ.setdefault("PROJECT_ROOT", str(CONFIG_DIR.parent))
    out = Path(os.environ.get("BENCHMARK_DIR", "logs/benchmark")) / f"{args.model}-{args.devices}"
    cfg = compose_benchmark(args, out)
    args.batch_size = int(cfg.data.batch_size)
    device = "cuda" if torch.cuda.is_available() and args.accelerator != "cpu" else "cpu"
    ceiling = args.ceiling and device == "cuda" and args.devices == 1
    # The sides alternate, ``repeats`` times each, and the medians are compared: on a shared
    # machine one side's single measurement can be off by 20-30%. Under DDP the launcher
    # re-runs this script per rank, so one template run (and one loop) is made.
    repeats = max(1, args.repeats) if args.devices == 1 else 1
    sides: dict[str, list[float]] = {"template": [], "loop": [], "ceiling": [], "compiled": []}
    for _ in range(repeats):
        template = run_template(cfg, args.warmup, args.steps)
        if not template["is_global_zero"]:
            return 0
        sides["template"].append(template["rows_per_s"])
        if not args.skip_handwritten:
            loop = run_handwritten(cfg, args.warmup, args.steps, device)
            sides["loop"].append(loop["rows_per_s"])
        if ceiling:
            for key, compiled in (("ceiling", False), ("compiled", True)):
                result = run_ceiling(cfg, args.warmup, args.steps, device, compiled)
                sides[key].append(result["rows_per_s"])
    rate, hand = _rate(sides["template"]), _rate(sides["loop"])
    eager, compiled = _rate(sides["ceiling"]), _rate(sides["compiled"])
    row = {
        "model": args.model, "device": device, "devices": template["world_size"],
        "precision": template["precision"], "compile": template["compiled"],
        "batch": args.batch_size, "resident": template["resident"],
        "steps_per_call": template["steps_per_call"], "repeats": repeats,
        "graph_steps": template["graph_steps"], "template_rows_s": rate,
        "handwritten_rows_s": hand, "ceiling_rows_s": eager, "ceiling_compiled_rows_s": compiled,
        "ratio_handwritten": round(rate / hand, 3) if hand else None,
        "ratio_ceiling": round(rate / eager, 3) if eager else None,
        "ratio_ceiling_compiled": round(rate / compiled, 3) if compiled else None,
        "all": {k: [round(v) for v in values] for k, values in sides.items() if values},
    }  # fmt: skip
    print(
        f"{'model':<12}{'device':<7}{'n':>3} {'precision':<11}{'batch':>6}{'compile':>8}"
        f"{'K':>3}{'graph':>7}{'template':>11}{'loop':>11}{'ceiling':>11}{'+compile':>11}"
        f"{'t/c+c':>7}   rows/s, median of {repeats}"
    )
    print(
        f"{row['model']:<12}{row['device']:<7}{row['devices']:>3} {row['precision']:<11}"
        f"{row['batch']:>6}{row['compile']!s:>8}{row['steps_per_call']:>3}"
        f"{'on' if row['graph_steps'] else 'off':>7}{rate:>11}{hand or '-':>11}"
        f"{eager or '-':>11}{compiled or '-':>11}{row['ratio_ceiling_compiled'] or '-':>7}"
        f"   all runs {row['all']}"
    )
    if args.json:
        with args.json.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
    return 0
