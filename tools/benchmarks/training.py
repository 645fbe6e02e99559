"""``scripts/benchmark.py train``: the template's training path against a hand-written loop.

Both sides train the same network (built from the same model config), with the same
optimiser, batch size, precision and data, for a fixed number of steps after a warm-up:

(a) ``template``: the real ``SoADataModule`` + ``ClassifierModule`` + Lightning ``Trainer``
    composed from ``configs/`` (validation, checkpoints and the progress bar off, a CSV
    logger on), on any number of devices; on one GPU its training forward and backward run
    in CUDA graphs, as they do by default (``model.cuda_graphs=false`` turns them off);
(b) ``handwritten``: a minimal PyTorch loop over GPU-resident (or host) tensors that were
    assembled once, sliced by a device-side permutation, eager (``--loop-graphs`` captures
    its forward and backward too, for a like-for-like comparison of the plumbing alone). It
    builds the same ``DeployableModel`` and takes the template's loss
    (``project.training.module.loss_terms``), so only the plumbing differs.

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


class StepTimer(L.Callback):
    """Wall time from the start of step ``warmup`` to the end of training, device-synchronised."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup
        self.start: float | None = None
        self.seconds = 0.0
        self.resident = False  # whether the training split lives on the training device

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Note where the training batches are formed (the loader's columns' device; a
        streamed loader has none: its batches are formed on the host)."""
        tensors = getattr(trainer.train_dataloader, "tensors", None)
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

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """Stop the clock."""
        self._sync(pl_module)
        if self.start is not None:
            self.seconds = time.perf_counter() - self.start


def compose_benchmark(args: argparse.Namespace, output_dir: Path) -> DictConfig:
    """The training config of one benchmark case (toy data of ``args.rows`` rows)."""
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
        f"trainer.precision={args.precision}",
        f"model.compile={str(args.compile).lower()}",
        "logger=csv",
        *args.overrides,
    ]
    with initialize_config_dir(version_base="1.3", config_dir=str(CONFIG_DIR)):
        cfg = compose(config_name="train", overrides=overrides)
    with open_dict(cfg):
        cfg.paths.output_dir = str(output_dir)
        cfg.trainer.max_steps = args.warmup + args.steps
        cfg.trainer.max_epochs = -1
        cfg.trainer.limit_val_batches = 0
        cfg.trainer.num_sanity_val_steps = 0
        cfg.trainer.enable_checkpointing = False
        cfg.trainer.enable_progress_bar = False
        cfg.trainer.enable_model_summary = False
    return cfg


def run_template(cfg: DictConfig, warmup: int, steps: int) -> dict[str, Any]:
    """Train through the template's path; rows/s over the timed steps, all ranks together."""
    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")
    model = hydra.utils.instantiate(cfg.model, contract=datamodule.contract.to_dict())
    timer = StepTimer(warmup)
    loggers = [hydra.utils.instantiate(c) for c in cfg.logger.values()]
    trainer: L.Trainer = hydra.utils.instantiate(cfg.trainer, callbacks=[timer], logger=loggers)
    trainer.fit(model, datamodule=datamodule)
    rows = steps * cfg.data.batch_size * trainer.world_size
    return {
        "rows_per_s": rows / timer.seconds if timer.seconds else float("nan"),
        "world_size": trainer.world_size,
        "is_global_zero": trainer.is_global_zero,
        "resident": timer.resident,
        "graph_steps": model.cuda_graph_steps,
    }


class _NetColumns(torch.nn.Module):
    """The network on one list ``[flat, *jagged, *masks]``, the form ``GraphedForward``
    replays."""

    def __init__(self, net: torch.nn.Module, n_jagged: int) -> None:
        super().__init__()
        self.net, self.n_jagged = net, n_jagged

    def forward(self, columns: list[torch.Tensor]) -> torch.Tensor:
        n = self.n_jagged
        return self.net(columns[0], columns[1 : 1 + n], columns[1 + n :])


def run_handwritten(
    cfg: DictConfig, warmup: int, steps: int, device: str, graphs: bool = False
) -> dict[str, Any]:
    """The same network, optimiser, loss and data in a minimal loop over pre-assembled
    tensors (with ``graphs``, its forward and backward captured in CUDA graphs)."""
    from project.data.batching import LABEL, TARGETS, WEIGHT, SoATensors
    from project.soa.deployable import build_model
    from project.training.graphs import GraphedForward
    from project.training.module import loss_terms

    datamodule = hydra.utils.instantiate(cfg.data, _convert_="all")
    datamodule.setup("fit")
    contract = datamodule.contract
    model = build_model(contract, dict(cfg.model.net))
    train = SoATensors(datamodule.splits["train"], contract)
    with torch.no_grad():  # assemble every row once (on the host), then only slice
        full = train.batch(torch.arange(train.n_rows), fixed_size=False)
        flat, jagged, masks = model.assembler([full[n] for n in contract.input_names])
    model = model.to(device)
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
    # Compiled in place like the template's model when --compile is given, so the ratio
    # compares the plumbing and not the compiler.
    if cfg.model.compile:
        model.net.compile()
    order = torch.randperm(train.n_rows, device=device)
    position = 0
    # Captured on the first warm-up step by the template's own capture code.
    graphed = GraphedForward(_NetColumns(model.net, len(jagged))) if graphs else None

    def step() -> None:
        nonlocal order, position
        if position + batch > train.n_rows:
            order, position = torch.randperm(train.n_rows, device=device), 0
        idx = order[position : position + batch]
        position += batch
        with torch.autocast(
            device_type=torch.device(device).type, dtype=torch.bfloat16, enabled=amp
        ):
            head = None
            if graphed is not None:
                head = graphed([flat[idx], *(j[idx] for j in jagged), *(m[idx] for m in masks)])
            if head is None:
                head = model.net(flat[idx], [j[idx] for j in jagged], [m[idx] for m in masks])
            rows = {k: v[idx] for k, v in truth.items()}
            loss = loss_terms(
                head, rows, contract, model.target_mean, model.target_scale, smoothing
            )["total"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    model.train()
    for _ in range(warmup):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return {"rows_per_s": steps * batch / (time.perf_counter() - start)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``benchmark.py train``."""
    parser.add_argument("--model", default="mlp", help="model config: mlp, deepsets, transformer")
    parser.add_argument(
        "--batch-size", type=int, default=None, help="default: the model's experiment config's"
    )
    parser.add_argument("--steps", type=int, default=200, help="timed steps")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--rows", type=int, default=200_000, help="toy rows generated")
    parser.add_argument("--accelerator", default="auto")
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--precision", default="32-true", help="32-true or bf16-mixed")
    parser.add_argument("--compile", action="store_true", help="torch.compile the network")
    parser.add_argument("--skip-handwritten", action="store_true")
    parser.add_argument(
        "--loop-graphs",
        action="store_true",
        help="capture the hand-written loop's forward and backward in CUDA graphs too",
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="alternating runs of each side (one device)"
    )
    parser.add_argument("--json", type=Path, help="append the result as a JSON line here")
    parser.add_argument("overrides", nargs="*", help="extra Hydra overrides for the template")
    from tools.benchmarks import streaming

    streaming.add_arguments(parser)


def main(args: argparse.Namespace) -> int:
    """Run both sides and print one table row (rank zero only under DDP); with
    ``--stream-compare`` or ``--stream-epoch``, the streaming benchmark
    (``tools.benchmarks.streaming``)."""
    if args.stream_compare or args.stream_epoch:
        from tools.benchmarks import streaming

        return streaming.main(args)
    os.environ.setdefault("PROJECT_ROOT", str(CONFIG_DIR.parent))
    out = Path(os.environ.get("BENCHMARK_DIR", "logs/benchmark")) / f"{args.model}-{args.devices}"
    cfg = compose_benchmark(args, out)
    args.batch_size = int(cfg.data.batch_size)
    device = "cuda" if torch.cuda.is_available() and args.accelerator != "cpu" else "cpu"
    # The two sides alternate, ``repeats`` times each, and the medians are compared: on a
    # shared machine one side's single measurement can be off by 20-30%. Under DDP the
    # launcher re-runs this script per rank, so one template run (and one loop) is made.
    repeats = max(1, args.repeats) if args.devices == 1 else 1
    runs: list[float] = []
    loops: list[float] = []
    for _ in range(repeats):
        template = run_template(cfg, args.warmup, args.steps)
        if not template["is_global_zero"]:
            return 0
        runs.append(template["rows_per_s"])
        if not args.skip_handwritten:
            loop = run_handwritten(cfg, args.warmup, args.steps, device, args.loop_graphs)
            loops.append(loop["rows_per_s"])
    rate = statistics.median(runs)
    hand = statistics.median(loops) if loops else None
    row = {
        "model": args.model, "device": device, "devices": template["world_size"],
        "precision": args.precision, "compile": args.compile, "batch": args.batch_size,
        "resident": template["resident"], "repeats": repeats,
        "graph_steps": template["graph_steps"], "loop_graphs": args.loop_graphs,
        "template_rows_s": round(rate), "handwritten_rows_s": None if hand is None else round(hand),
        "ratio": None if hand is None else round(rate / hand, 3),
        "template_all": [round(r) for r in runs], "handwritten_all": [round(r) for r in loops],
    }  # fmt: skip
    graphs = f"{'on' if row['graph_steps'] else 'off'}/{'on' if args.loop_graphs else 'off'}"
    print(
        f"{'model':<12}{'device':<7}{'n':>3} {'precision':<11}{'batch':>6}{'resident':>9}"
        f"{'graphs':>8}{'template rows/s':>17}{'loop rows/s':>13}{'ratio':>7}"
        f"   (median of {repeats}; all runs)"
    )
    print(
        f"{row['model']:<12}{row['device']:<7}{row['devices']:>3} {row['precision']:<11}"
        f"{row['batch']:>6}{row['resident']!s:>9}{graphs:>8}{row['template_rows_s']:>17}"
        f"{row['handwritten_rows_s'] or '-':>13}{row['ratio'] or '-':>7}   "
        f"template {row['template_all']}, loop {row['handwritten_all'] or '-'}"
    )
    if args.json:
        with args.json.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
    return 0
