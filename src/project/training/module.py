"""The LightningModule: classification, regression or both, on SoA batches, with weights."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torchmetrics import MetricCollection

from project.contract import InputContract
from project.data.batching import LABEL, TARGETS, WEIGHT, ResidentBatch
from project.soa.deployable import build_model
from project.training.graphs import GraphedStep, align_step_flags, graphs_unavailable
from project.training.metrics import EvaluationRecord, evaluation_metrics
from project.utils import atomic_write_text
from project.utils.importing import allowed_targets, build_from_config
from project.utils.profiling import marked

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The training loss of an epoch was NaN or infinite: the weights have diverged."""


def _plain(cfg: Mapping[str, Any] | DictConfig | None) -> dict[str, Any] | None:
    """Resolve an OmegaConf node into plain Python containers, so the checkpoint's
    hyperparameters load with ``torch.load(weights_only=True)``."""
    if cfg is None:
        return None
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


PLOT_OPTIONS = {"pt": "jet_pt", "working_point": 0.5, "experiment": None}

# Optimiser steps per Lightning loop step under ``steps_per_call="auto"`` where several are
# possible (one CUDA device); a loop step costs ~1 ms of host time in Lightning's loop and
# hooks, more than a small model's whole step replayed from a CUDA graph.
AUTO_STEPS_PER_CALL = 8
# The row indices of a device-resident batch, the graph's only input (see ``_graph_step``).
ROWS = "rows"


def _plot_options(options: Mapping[str, Any] | None, contract: InputContract) -> dict[str, Any]:
    """``model.plots`` with its defaults, checked; ``pt`` is dropped (no pT plots, said in
    the log) where the contract has no such flat input."""
    given = dict(options or {})
    unknown = set(given) - set(PLOT_OPTIONS)
    if unknown:
        raise ValueError(
            f"model.plots: unknown keys {sorted(unknown)}; expected {sorted(PLOT_OPTIONS)}"
        )
    merged = {**PLOT_OPTIONS, **given}
    if not 0 < float(merged["working_point"]) < 1:
        raise ValueError(
            f"model.plots.working_point is a signal efficiency in (0, 1), got "
            f"{merged['working_point']!r}"
        )
    if merged["pt"] is not None and merged["pt"] not in contract.flat_names:
        log.info(
            f"model.plots.pt = {merged['pt']!r} is not a flat input of the contract "
            f"({contract.flat_names}): no plots against pT"
        )
        merged["pt"] = None
    return merged


def weighted_mean(values: Tensor, weights: Tensor | None) -> Tensor:
    """``sum(w * v) / sum(w)`` over the batch (the plain mean without weights).

    Negative weights (NLO generators) enter as they are; the normalisation by the sum of the
    batch's weights keeps the loss on the scale of an unweighted mean.
    """
    if weights is None:
        return values.mean()
    return (weights * values).sum() / weights.sum()


_REGRESSION_LOSSES = {
    "mse": lambda p, t: F.mse_loss(p, t, reduction="none"),
    "huber": lambda p, t: F.huber_loss(p, t, reduction="none", delta=1.0),
    "l1": lambda p, t: F.l1_loss(p, t, reduction="none"),
}


def loss_terms(
    head: Tensor,
    batch: Mapping[str, Tensor],
    contract: InputContract,
    target_mean: Tensor,
    target_scale: Tensor,
    label_smoothing: float = 0.0,
) -> dict[str, Tensor]:
    """The batch's losses by name (``class``, ``<target>``) and their weighted sum ``total``.

    Parameters
    ----------
    head
        ``(batch, n_outputs)``: class logits, then standardised regression values.
    batch
        The SoA batch with ``label``, ``targets`` ``(batch, n_targets)`` in physical units and
        optionally ``weight``.
    contract
        Says which outputs there are, their losses and loss weights.
    target_mean, target_scale
        The targets' standardisation: the loss compares standardised values.
    """
    weights = batch.get(WEIGHT)
    terms: dict[str, Tensor] = {}
    total = head.new_zeros(())
    k = contract.n_classes
    if k:
        ce = F.cross_entropy(
            head[:, :k].float(), batch[LABEL], reduction="none", label_smoothing=label_smoothing
        )
        terms["class"] = weighted_mean(ce, weights)
        total = total + contract.class_loss_weight * terms["class"]
    for i, target in enumerate(contract.regression):
        truth = (batch[TARGETS][:, i] - target_mean[i]) / target_scale[i]
        per_row = _REGRESSION_LOSSES[target.loss](head[:, k + i].float(), truth)
        terms[target.name] = weighted_mean(per_row, weights)
        total = total + target.loss_weight * terms[target.name]
    terms["total"] = total
    return terms


class ClassifierModule(L.LightningModule):
    """Trains a ``DeployableModel``: the SoA assembler is the first step on every batch.

    The loss is the cross-entropy of the classes and the regression losses of the targets
    (each the weighted mean over the batch, see ``weighted_mean``), summed with the contract's
    loss weights.

    Parameters
    ----------
    net
        Network config (``_target_`` plus arguments; sizes come from the contract).
    contract
        The fitted input contract (``InputContract.to_dict()``), saved in the checkpoint.
    optimizer, scheduler
        Configs with ``_partial_: true``; the scheduler is optional.
    label_smoothing
        Cross-entropy label smoothing.
    compile
        Run the training forward through ``torch.compile`` (static shapes): ``True``,
        ``False`` or ``"auto"`` (on a CUDA device), for the batches of the first batch's
        shapes (an epoch's short last batch runs the plain model). Validation and test run
        the plain model;
        the checkpoint's keys are those of the plain model, so either kind of run resumes or
        exports the other's checkpoints. A compilation that fails leaves training uncompiled,
        with a warning.
    cuda_graphs
        On a single CUDA device, capture the whole training step (gather, forward, loss,
        backward, clipping, optimiser step) in a CUDA graph (``project.training.graphs``;
        off by itself elsewhere, and said why on a GPU). Set it false for a network with
        Python control flow on tensor values.
    steps_per_call
        Optimiser steps per Lightning loop step (``"auto"``: ``AUTO_STEPS_PER_CALL`` on one
        CUDA device without gradient accumulation or a gradient scaler, else 1). The
        training loader then hands over that many batches at a time (``SoADataModule``
        reads this attribute), each stepped in turn.
    plots
        The test plots (``project.training.plots``): ``pt``, the flat input plotted against
        (default ``jet_pt``; none if the contract lacks it), ``working_point``, the signal
        efficiency of the cut in the efficiency-vs-pT plot (0.5), and ``experiment``, an
        optional label and style (``CMS``, ``ATLAS``).

    Two ways of stepping. Without graphs and with one step per call (the CPU's default),
    Lightning's automatic optimisation steps as usual. Otherwise the module steps itself in
    ``training_step`` (``_step``: zero the gradients, forward, loss, backward, then
    ``configure_gradient_clipping`` with the trainer's ``gradient_clip_val`` and
    ``gradient_clip_algorithm``, then ``optimizer.step()``, the order Lightning keeps), and
    returns None, so that Lightning's ``optimizer_step`` only runs the closure. Epochs,
    epoch-interval schedulers, checkpoints and logged metrics are the same either way; the
    differences: a Lightning step (``global_step``, ``max_steps``, ``log_every_n_steps``,
    step-interval schedulers) counts loop steps, ``steps_per_call`` optimiser steps each, and
    callbacks' backward and optimiser-step hooks (``on_before_backward``,
    ``on_after_backward``, ``on_before_optimizer_step``) are not called.

    Validation and test metrics count rows by their weights (``project.training.metrics``):
    ``auroc`` and ``accuracy`` for classes, ``mae_``, ``r2_``, ``response_`` and
    ``resolution_<target>`` for regression targets.
    """

    # Attributes set on every training step that are never parameters, buffers or
    # submodules are set directly, without ``nn.Module.__setattr__``'s registry checks:
    # Lightning sets ``_current_fx_name`` before and after every hook it calls, about 40
    # times a step; ``nn.Module.__setattr__`` takes ~3 us a call against 0.2 us (measured
    # on a 2-core CPU machine), ~0.1 ms of host time a step that a small model's GPU step,
    # bound by host time, pays in full. ``_compiled`` (the compiled model) and
    # ``_graph_source`` (the resident split a graph gathers from) must stay out of the
    # module tree: they are not this module's parts, and would appear twice in a state_dict.
    _PLAIN_ATTRIBUTES = frozenset(
        {
            "_current_fx_name",
            "_loss_sum",
            "_loss_steps",
            "_compiled",
            "_graph_source",
            "_optimizer_range",
        }
    )

    def __init__(
        self,
        net: Mapping[str, Any],
        contract: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any] | None = None,
        label_smoothing: float = 0.0,
        compile: bool | str = False,
        cuda_graphs: bool = True,
        steps_per_call: int | str = 1,
        plots: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        for key, value in (("compile", compile), ("steps_per_call", steps_per_call)):
            if value != "auto" and not isinstance(value, (bool, int)):
                raise ValueError(f"model.{key} must be auto or a number/boolean, got {value!r}")
        if steps_per_call != "auto" and (isinstance(steps_per_call, bool) or steps_per_call < 1):
            raise ValueError(
                f"model.steps_per_call must be auto or a whole number >= 1, got {steps_per_call!r}"
            )
        self.save_hyperparameters(
            {
                "net": _plain(net),
                "contract": _plain(contract),
                "optimizer": _plain(optimizer),
                "scheduler": _plain(scheduler),
                "label_smoothing": float(label_smoothing),
                "compile": compile if compile == "auto" else bool(compile),
                "cuda_graphs": bool(cuda_graphs),
                "steps_per_call": steps_per_call,
                "plots": _plain(plots),
            }
        )
        self.contract = InputContract.from_dict(self.hparams.contract)
        if not self.contract.fitted:
            raise ValueError(
                "the contract has no standardisation constants; build the module with the "
                "DataModule's fitted contract (datamodule.contract)"
            )
        self.model = build_model(self.contract, self.hparams.net, allowed_targets())
        self.input_names = self.contract.input_names
        self.n_classes = self.contract.n_classes
        self.plot_options = _plot_options(self.hparams.plots, self.contract)
        self.val_metrics = evaluation_metrics(self.contract, prefix="val/")
        self.test_metrics = evaluation_metrics(self.contract, prefix="test/")
        # The epoch's training loss: a device-side running sum (one kernel per step; a
        # torchmetrics MeanMetric costs ~0.1 ms of host time per update and, with its default
        # NaN screen, a host synchronisation). A NaN loss shows as a NaN epoch mean.
        self._loss_sum: Tensor | None = None
        self._loss_steps = 0
        pt = self.plot_options["pt"]
        self.test_record = EvaluationRecord([pt] if pt else [])
        # Resolved for the training device in ``setup("fit")``.
        self.steps_per_call = 1 if steps_per_call == "auto" else int(steps_per_call)
        self._compiled: Callable[[list[Tensor]], Tensor] | None = None
        self._compile_checked = False
        self._compiled_shapes: list[torch.Size] = []
        self._graph: GraphedStep | None = None
        self._graph_reason: str | None = "not decided yet"  # why there is no graph
        self._graph_source: Any = None
        self._own_steps = False
        self._optimizer_range: Any = contextlib.nullcontext()
        self.cuda_graph_steps = 0  # training steps replayed from a CUDA graph in the last fit

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ClassifierModule._PLAIN_ATTRIBUTES:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _several_steps_unavailable(self) -> str | None:
        """Why one Lightning step cannot take several optimiser steps here, or None."""
        trainer = self.trainer
        if trainer.world_size != 1:
            return f"training runs on {trainer.world_size} processes"
        if trainer.accumulate_grad_batches != 1:
            return f"gradients are accumulated over {trainer.accumulate_grad_batches} batches"
        if str(trainer.precision) == "16-mixed":
            return "precision 16-mixed steps through a gradient scaler"
        return None

    def setup(self, stage: str) -> None:
        """Resolve ``compile`` and ``steps_per_call`` for the training device, and compile."""
        if stage != "fit":
            return
        device = self.trainer.strategy.root_device
        wanted = self.hparams.steps_per_call
        reason = self._several_steps_unavailable()
        if wanted == "auto":
            several = device.type == "cuda" and reason is None
            self.steps_per_call = AUTO_STEPS_PER_CALL if several else 1
        elif wanted > 1 and reason is not None:
            raise ValueError(
                f"model.steps_per_call={wanted} cannot be used here: {reason}. Set "
                "model.steps_per_call=1 (or auto)."
            )
        compile_ = self.hparams.compile
        if compile_ is True or (compile_ == "auto" and device.type == "cuda"):
            # A separate compiled callable: validation runs the plain model, whose batch
            # shapes would each need a compilation, and the state_dict keeps its keys.
            self._compiled = torch.compile(self.model, dynamic=False)
            self._compile_checked = False

    def on_train_start(self) -> None:
        """Decide how training steps: in a CUDA graph (captured on the first batch, see
        ``project.training.graphs``), stepped by the module, or by Lightning."""
        self._graph = None
        optimizer = self.optimizers(use_pl_optimizer=False)
        align_step_flags(optimizer)  # a resumed checkpoint's flags are those of its run
        if self.hparams.cuda_graphs and self._graph_reason is None:
            self._graph = GraphedStep(self._graph_step, optimizer, self)
        elif self.hparams.cuda_graphs and self.device.type == "cuda":
            log.info("training steps run eagerly (no CUDA graph): %s", self._graph_reason)
        self._own_steps = self._graph is not None or self.steps_per_call > 1
        if self._own_steps:
            # training_step returns None by design (it has stepped already); Lightning warns
            # once that it did.
            warnings.filterwarnings("ignore", message=r"`training_step` returned `None`")

    def on_train_end(self) -> None:
        """Release the graph (and the memory it holds) once training is over."""
        self.cuda_graph_steps = self._graph.replays if self._graph is not None else 0
        self._graph, self._graph_source = None, None

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The head ``(batch, n_outputs)`` of a SoA batch (class logits, standardised targets)."""
        return self.model([batch[name] for name in self.input_names])

    def _train_forward(self, inputs: list[Tensor]) -> Tensor:
        """The training forward, compiled where asked, for batches of the first batch's
        shapes (an epoch's short last batch runs the plain model: a compilation for its shapes
        takes longer than a whole epoch of a small model). A compilation that fails (on the
        first call) leaves training uncompiled, with a warning."""
        if self._compiled is None:
            return self.model(inputs)
        shapes = [t.shape for t in inputs]
        if self._compile_checked:
            if shapes != self._compiled_shapes:
                return self.model(inputs)
            return self._compiled(inputs)
        try:
            head = self._compiled(inputs)
        except Exception as err:  # a compiler or backend failure: train uncompiled
            warnings.warn(
                f"torch.compile of the training forward failed, training runs uncompiled "
                f"({type(err).__name__}: {err}). Set model.compile=false to skip the attempt.",
                stacklevel=2,
            )
            self._compiled = None
            return self.model(inputs)
        self._compile_checked, self._compiled_shapes = True, shapes
        return head

    def _losses(self, head: Tensor, batch: Mapping[str, Tensor], smoothing: float = 0.0) -> dict:
        return loss_terms(
            head, batch, self.contract, self.model.target_mean, self.model.target_scale, smoothing
        )

    def _training_loss(self, batch: Mapping[str, Tensor]) -> Tensor:
        with marked("train.forward"):
            head = self._train_forward([batch[name] for name in self.input_names])
            return self._losses(head, batch, self.hparams.label_smoothing)["total"]

    def _step(self, batch: Mapping[str, Tensor]) -> Tensor:
        """One optimisation step on ``batch``, as Lightning's automatic optimisation makes it;
        the detached loss.

        The forward runs under the surrounding mixed precision (if any) without autocast's
        weight cache (a CUDA graph must cast the weights it is replayed with, not those of a
        warm-up step); backward, clipping and the optimiser step run outside autocast, as
        they do under Lightning.
        """
        optimizer = self.optimizers(use_pl_optimizer=False)
        optimizer.zero_grad(set_to_none=True)
        device = self.device.type
        autocast = torch.autocast(
            device,
            dtype=torch.get_autocast_dtype(device),
            enabled=torch.is_autocast_enabled(device),
            cache_enabled=False,
        )
        with autocast:
            loss = self._training_loss(batch)
        with torch.autocast(device, enabled=False):
            with marked("train.backward"):
                loss.backward()
            with marked("train.optimizer_step"):
                trainer = self.trainer
                self.configure_gradient_clipping(
                    optimizer, trainer.gradient_clip_val, trainer.gradient_clip_algorithm
                )
                optimizer.step()
        return loss.detach()

    def _graph_step(self, inputs: dict[str, Tensor]) -> Tensor:
        """The captured step: for resident rows, the gather from the split is part of it."""
        if self._graph_source is not None:
            return self._step(self._graph_source.batch(inputs[ROWS]))
        return self._step(inputs)

    def _replayed(self, batch: Mapping[str, Tensor]) -> Tensor | None:
        """The loss of ``batch`` stepped from the CUDA graph, or None (step it eagerly)."""
        graph = self._graph
        if graph is None:
            return None
        if isinstance(batch, ResidentBatch):
            if self._graph_source is None and graph.signature is None:
                self._graph_source = batch.tensors  # the split the graph will gather from
            if batch.tensors is not self._graph_source:
                return None
            inputs = {ROWS: batch.rows}
        elif self._graph_source is not None:
            return None
        else:
            inputs = dict(batch)
        with marked("train.step_graph"):
            return graph(inputs)

    def _record_loss(self, loss: Tensor) -> None:
        value = loss.detach().float()
        # A copy to start from: a replayed loss is overwritten by the next replay.
        self._loss_sum = value.clone() if self._loss_sum is None else self._loss_sum + value
        self._loss_steps += 1

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        """The step's loss (Lightning steps the optimiser), or None where the module has
        stepped itself (see the class docstring); ``batch`` is one SoA batch or a list of
        ``steps_per_call`` of them."""
        # The hot path stays free of host synchronisation and of Lightning's logging
        # machinery (a ``self.log`` call costs about a millisecond of host time, more than
        # a whole small-model step on a GPU): the step loss is logged only on the steps whose
        # metrics the logger writes (every ``log_every_n_steps``), and the epoch mean is a
        # running device-side sum, logged and reduced across ranks once, at the epoch's end.
        every = self.trainer.log_every_n_steps
        log_step = bool(every) and (self.global_step + 1) % every == 0
        if not self._own_steps:
            loss = self._training_loss(batch)
            if log_step:
                self.log("train/loss_step", loss.detach(), on_step=True, on_epoch=False)
            self._record_loss(loss)
            return loss
        for part in batch if isinstance(batch, list) else [batch]:
            loss = self._replayed(part)
            if loss is None:
                loss = self._step(part)
            self._record_loss(loss)
        if log_step:  # a copy: a replayed loss is overwritten by the next replay
            self.log("train/loss_step", loss.clone(), on_step=True, on_epoch=False)
        return None

    def optimizer_step(
        self,
        epoch: int,
        batch_idx: int,
        optimizer: Any,
        optimizer_closure: Callable[[], Any] | None = None,
    ) -> None:
        """Lightning's step; where the module steps itself, only the closure (which runs
        ``training_step``)."""
        if self._own_steps:
            optimizer_closure()
            return
        optimizer.step(closure=optimizer_closure)
        opened, self._optimizer_range = self._optimizer_range, contextlib.nullcontext()
        opened.__exit__(None, None, None)

    def on_before_optimizer_step(self, optimizer: Any) -> None:
        """Open the profiler range of Lightning's optimiser step, clipping included (the
        closure's forward and backward have run; ``optimizer_step`` closes it)."""
        self._optimizer_range = marked("train.optimizer_step")
        self._optimizer_range.__enter__()

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: Any) -> None:
        """Lightning's ``zero_grad``; where the module steps itself, ``_step`` does it."""
        if not self._own_steps:
            optimizer.zero_grad()

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Lightning's backward, marked for profilers."""
        with marked("train.backward"):
            super().backward(loss, *args, **kwargs)

    def on_train_epoch_end(self) -> None:
        """Log the epoch's mean training loss, averaged over ranks (every rank runs the same
        number of steps: the training shards have equal sizes).

        A NaN or infinite mean stops training with ``NonFiniteLossError`` before the epoch's
        checkpoints are written (Lightning calls the checkpoint callbacks' epoch-end hooks
        after this one). The check reads the running sum once per epoch (one host
        synchronisation), where ``detect_anomaly`` would check every operation of every step.
        """
        if not self._loss_steps:
            return
        # Reduced over ranks before the check, so that every rank stops together.
        mean = self.trainer.strategy.reduce(self._loss_sum / self._loss_steps, reduce_op="mean")
        steps = self._loss_steps
        self._loss_sum, self._loss_steps = None, 0
        if not torch.isfinite(mean):
            raise NonFiniteLossError(
                f"the training loss is {mean.item()} in epoch {self.current_epoch} (mean of "
                f"{steps} steps): the weights have diverged, and no checkpoint of this epoch was "
                "written. Lower the learning rate (model.optimizer.lr), clip gradients "
                "(trainer.gradient_clip_val=1.0), or check the inputs and weights for extreme "
                "values."
            )
        self.log("train/loss", mean, prog_bar=True, sync_dist=True)

    def transfer_batch_to_device(
        self, batch: Any, device: torch.device, dataloader_idx: int
    ) -> Any:
        """A SoA batch moves column by column (non-blocking from pinned memory); a resident
        one is already there and is returned as it is (not yet gathered), and a list of
        batches (``steps_per_call``) moves batch by batch. Lightning's generic transfer walks
        the batch with ``apply_to_collection`` on every step, ~0.1 ms of host time."""
        if type(batch) is dict:
            return {
                k: v if v.device == device else v.to(device, non_blocking=True)
                for k, v in batch.items()
            }
        if isinstance(batch, ResidentBatch) and batch.rows.device == device:
            return batch
        if type(batch) is list:
            return [self.transfer_batch_to_device(b, device, dataloader_idx) for b in batch]
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_fit_start(self) -> None:
        """Write the DataModule's fitted reweighting, if any, to ``reweighting.json`` in the
        run directory, and plot it (``plots/reweighting.png`` and TensorBoard)."""
        reweighting = getattr(self.trainer.datamodule, "reweighting", None)
        if reweighting is not None:
            self._write_reweighting(reweighting.to_dict())

    @rank_zero_only
    def _write_reweighting(self, summary: dict[str, Any]) -> None:
        import json
        from pathlib import Path

        from project.training.plots import reweighting_figure

        out_dir = Path(self.trainer.default_root_dir)
        atomic_write_text(out_dir / "reweighting.json", json.dumps(summary, indent=1) + "\n")
        figure = reweighting_figure(summary, self.plot_options["experiment"])
        self._publish({"reweighting": figure}, "train")

    def _evaluate(
        self, batch: Mapping[str, Tensor], stage: str, metrics: MetricCollection
    ) -> Tensor:
        head = self(batch)
        n = len(batch[self.input_names[0]]) if self.contract.flat else head.shape[0]
        for name, value in self._losses(head, batch).items():
            key = f"{stage}/loss" if name == "total" else f"{stage}/loss_{name}"
            self.log(
                key, value, on_epoch=True, prog_bar=name == "total", sync_dist=True, batch_size=n
            )
        outputs = torch.stack(self.model.outputs(head), dim=1)
        metrics.update(outputs, batch)
        return outputs

    def _log_metrics(self, metrics: MetricCollection, stage: str) -> None:
        """Log the epoch's weighted metrics (computed over all ranks' rows) and reset them."""
        values = metrics.compute()
        metrics.reset()
        for name, value in values.items():
            self.log(name, value, prog_bar=name == f"{stage}/auroc")

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        """Validation losses and metrics, reduced across ranks at epoch end."""
        with marked("eval.validation"):
            self._evaluate(batch, "val", self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        """Log the validation metrics of the epoch."""
        self._log_metrics(self.val_metrics, "val")

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        """Test losses and metrics; the rows are kept for the plots."""
        with marked("eval.test"):
            outputs = self._evaluate(batch, "test", self.test_metrics)
            self.test_record.update(outputs, batch)

    def on_test_epoch_end(self) -> None:
        """Log the test metrics, gather all ranks' test rows and draw the plots."""
        self._log_metrics(self.test_metrics, "test")
        record = self.test_record.compute()  # synchronised across ranks
        self.test_record.reset()
        self._write_plots(record)

    @rank_zero_only
    def _write_plots(self, record: dict[str, Any]) -> None:
        from project.training.plots import evaluation_figures

        options = self.plot_options
        figures = evaluation_figures(
            record,
            self.contract.classes,
            [t.name for t in self.contract.regression],
            options["pt"],
            options["working_point"],
            options["experiment"],
        )
        self._publish(figures, "test")

    def _publish(self, figures: dict[str, Any], stage: str) -> None:
        """Save figures under the run's ``plots/`` and add them to TensorBoard, drawn in the
        style they were made in (mathtext reads its fonts from the style when drawn)."""
        from project.training.plots import save_figures, style

        with style(self.plot_options["experiment"]):
            save_figures(figures, self.trainer.default_root_dir)
            for logger in self.loggers:
                add_figure = getattr(getattr(logger, "experiment", None), "add_figure", None)
                if callable(add_figure):
                    for name, fig in figures.items():
                        add_figure(f"{stage}/{name}", fig, global_step=self.global_step)

    def configure_optimizers(self) -> Any:
        """Optimiser (and scheduler, stepped per epoch) from their configs; only targets the
        project's configs name are built (``project.utils.importing``).

        Where the training step will run in a CUDA graph (``graphs_unavailable``), the
        optimiser is built with ``capturable=True``, and ``fused=True`` (one kernel for the
        whole update) unless the config chooses the implementation (``fused`` or ``foreach``)
        or gradients are clipped under mixed precision.
        """
        allowed = allowed_targets()
        config = self.hparams.optimizer
        optimizer = build_from_config(config, allowed, params=self.parameters())
        trainer = self.trainer
        self._graph_reason = graphs_unavailable(
            self.device,
            trainer.world_size,
            trainer.accumulate_grad_batches,
            trainer.precision,
            type(optimizer),
        )
        if self.hparams.cuda_graphs and self._graph_reason is None:
            flags = {"capturable": True}
            # Lightning refuses to clip the gradients of a fused optimiser under mixed
            # precision (such an optimiser may unscale them itself): foreach there.
            clipped_mixed = bool(trainer.gradient_clip_val) and "mixed" in str(trainer.precision)
            if "fused" not in config and "foreach" not in config and not clipped_mixed:
                flags["fused"] = True
            optimizer = build_from_config(config, allowed, params=self.parameters(), **flags)
        if self.hparams.scheduler is None:
            return optimizer
        scheduler = build_from_config(self.hparams.scheduler, allowed, optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }
