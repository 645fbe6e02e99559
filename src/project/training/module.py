"""The LightningModule: classification, regression or both, on SoA batches, with weights."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch import Tensor
from torchmetrics import MetricCollection

from project.contract import InputContract
from project.data.batching import LABEL, TARGETS, WEIGHT
from project.soa.deployable import build_model
from project.training.graphs import GraphedForward, graphs_unavailable
from project.training.metrics import EvaluationRecord, evaluation_metrics
from project.utils import atomic_write_text
from project.utils.importing import allowed_targets, build_from_config

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
        Compile the network with ``torch.compile`` for training (in place: the checkpoint's
        keys are those of the uncompiled model, so either kind of run resumes or exports the
        other's checkpoints).
    cuda_graphs
        On a single CUDA device, capture the training forward and backward in CUDA graphs
        (``project.training.graphs``; off by itself elsewhere, and said why on a GPU). Set
        it false for a network with Python control flow on tensor values.
    plots
        The test plots (``project.training.plots``): ``pt``, the flat input plotted against
        (default ``jet_pt``; none if the contract lacks it), ``working_point``, the signal
        efficiency of the cut in the efficiency-vs-pT plot (0.5), and ``experiment``, an
        optional label and style (``CMS``, ``ATLAS``).

    Validation and test metrics count rows by their weights (``project.training.metrics``):
    ``auroc`` and ``accuracy`` for classes, ``mae_``, ``r2_``, ``response_`` and
    ``resolution_<target>`` for regression targets.
    """

    # Attributes set on every training step that are never parameters, buffers or
    # submodules are set directly, without ``nn.Module.__setattr__``'s registry checks:
    # Lightning sets ``_current_fx_name`` before and after every hook it calls, about 40
    # times a step; ``nn.Module.__setattr__`` takes ~3 us a call against 0.2 us (measured
    # on a 2-core CPU machine), ~0.1 ms of host time a step that a small model's GPU step,
    # bound by host time, pays in full.
    _PLAIN_ATTRIBUTES = frozenset({"_current_fx_name", "_loss_sum", "_loss_steps"})

    def __init__(
        self,
        net: Mapping[str, Any],
        contract: Mapping[str, Any],
        optimizer: Mapping[str, Any],
        scheduler: Mapping[str, Any] | None = None,
        label_smoothing: float = 0.0,
        compile: bool = False,
        cuda_graphs: bool = True,
        plots: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(
            {
                "net": _plain(net),
                "contract": _plain(contract),
                "optimizer": _plain(optimizer),
                "scheduler": _plain(scheduler),
                "label_smoothing": float(label_smoothing),
                "compile": bool(compile),
                "cuda_graphs": bool(cuda_graphs),
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
        self._graphed: GraphedForward | None = None
        self.cuda_graph_steps = 0  # training steps replayed from CUDA graphs in the last fit

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ClassifierModule._PLAIN_ATTRIBUTES:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def setup(self, stage: str) -> None:
        """Compile the network in place on the training device if asked."""
        if self.hparams.compile and stage == "fit":
            self.model.compile()

    def on_train_start(self) -> None:
        """Decide whether the training forward runs in CUDA graphs (captured on the first
        batch, see ``project.training.graphs``)."""
        self._graphed = None
        if not self.hparams.cuda_graphs:
            return
        reason = graphs_unavailable(
            self.device,
            self.trainer.world_size,
            self.trainer.accumulate_grad_batches,
            bool(self.hparams.compile),
        )
        if reason is None:
            self._graphed = GraphedForward(self.model)
        elif self.device.type == "cuda":  # said where graphs were possible but are off
            log.info("training forward runs eagerly (no CUDA graphs): %s", reason)

    def on_train_end(self) -> None:
        """Release the graphs (and the memory they hold) once training is over."""
        self.cuda_graph_steps = self._graphed.replays if self._graphed is not None else 0
        self._graphed = None

    def forward(self, batch: Mapping[str, Tensor]) -> Tensor:
        """The head ``(batch, n_outputs)`` of a SoA batch (class logits, standardised targets)."""
        inputs = [batch[name] for name in self.input_names]
        if self._graphed is not None and self.training:
            logits = self._graphed(inputs)
            if logits is not None:
                return logits
        return self.model(inputs)

    def _losses(self, head: Tensor, batch: Mapping[str, Tensor], smoothing: float = 0.0) -> dict:
        return loss_terms(
            head, batch, self.contract, self.model.target_mean, self.model.target_scale, smoothing
        )

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        """One optimisation step's loss."""
        loss = self._losses(self(batch), batch, self.hparams.label_smoothing)["total"]
        # The hot path stays free of host synchronisation and of Lightning's logging
        # machinery (a ``self.log`` call costs about a millisecond of host time, more than
        # a whole small-model step on a GPU): the step loss is logged only on the steps whose
        # metrics the logger writes (every ``log_every_n_steps``), and the epoch mean is a
        # running device-side sum, logged and reduced across ranks once, at the epoch's end.
        every = self.trainer.log_every_n_steps
        if every and (self.global_step + 1) % every == 0:
            self.log("train/loss_step", loss.detach(), on_step=True, on_epoch=False)
        value = loss.detach().float()
        self._loss_sum = value if self._loss_sum is None else self._loss_sum + value
        self._loss_steps += 1
        return loss

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
        one is already there and is returned as it is. Lightning's generic transfer walks
        the batch with ``apply_to_collection`` on every step, ~0.1 ms of host time."""
        if type(batch) is dict:
            return {
                k: v if v.device == device else v.to(device, non_blocking=True)
                for k, v in batch.items()
            }
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
        self._evaluate(batch, "val", self.val_metrics)

    def on_validation_epoch_end(self) -> None:
        """Log the validation metrics of the epoch."""
        self._log_metrics(self.val_metrics, "val")

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        """Test losses and metrics; the rows are kept for the plots."""
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
        project's configs name are built (``project.utils.importing``)."""
        allowed = allowed_targets()
        optimizer = build_from_config(self.hparams.optimizer, allowed, params=self.parameters())
        if self.hparams.scheduler is None:
            return optimizer
        scheduler = build_from_config(self.hparams.scheduler, allowed, optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }
