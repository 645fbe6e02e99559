"""The LightningModule for classification (binary and multi-class) on SoA batches."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import hydra
import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.aggregation import CatMetric
from torchmetrics.classification import AUROC, Accuracy

from project.data.contract import InputContract
from project.soa.assembler import SoAAssembler
from project.training.graphs import GraphedForward, graphs_unavailable
from project.utils import build_from_config

log = logging.getLogger(__name__)


def _plain(cfg: Mapping[str, Any] | DictConfig | None) -> dict[str, Any] | None:
    """Resolve an OmegaConf node into plain Python containers, so the checkpoint's
    hyperparameters load with ``torch.load(weights_only=True)``."""
    if cfg is None:
        return None
    if isinstance(cfg, DictConfig):
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    return dict(cfg)


class DeployableClassifier(nn.Module):
    """SoA assembler followed by the network: raw columns to logits.

    The deploy graph wraps exactly this module (plus the output activation), so the trained
    weights and the preprocessing constants travel together in one ``state_dict``.
    """

    def __init__(self, contract: InputContract, net: nn.Module) -> None:
        super().__init__()
        self.assembler = SoAAssembler(contract)
        self.net = net

    def forward(self, inputs: list[Tensor]) -> Tensor:
        """Logits ``(batch, n_classes)`` from inputs in ``contract.input_names`` order."""
        flat, jagged, masks = self.assembler(inputs)
        return self.net(flat, jagged, masks)


def build_classifier(contract: InputContract, net: Mapping[str, Any]) -> DeployableClassifier:
    """Assembler plus the network built from its ``_target_`` config with the contract's sizes."""
    return DeployableClassifier(contract, build_from_config(net, **contract.model_dims()))


class ClassifierModule(L.LightningModule):
    """Cross-entropy classifier whose first step on every batch is the SoA assembler.

    Parameters
    ----------
    net
        Network config (``_target_`` plus arguments; sizes come from the contract).
    contract
        The fitted input contract (``InputContract.to_dict()``), saved in the checkpoint.
    optimizer, scheduler
        Hydra configs with ``_partial_: true``; the scheduler is optional.
    label_smoothing
        Cross-entropy label smoothing.
    compile
        Wrap the network in ``torch.compile`` for training.
    cuda_graphs
        On a single CUDA device, capture the training forward and backward in CUDA graphs
        (``project.training.graphs``; off by itself elsewhere, and said why on a GPU). Set
        it false for a network with Python control flow on tensor values.
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
            }
        )
        self.contract = InputContract.from_dict(self.hparams.contract)
        if not self.contract.fitted:
            raise ValueError(
                "the contract has no standardisation constants; build the module with the "
                "DataModule's fitted contract (datamodule.contract)"
            )
        self.model = build_classifier(self.contract, self.hparams.net)
        self.input_names = self.contract.input_names
        self.n_classes = self.contract.n_classes
        task = "binary" if self.n_classes == 2 else "multiclass"
        metrics = MetricCollection(
            {
                "auroc": AUROC(task=task, num_classes=self.n_classes),
                "accuracy": Accuracy(task=task, num_classes=self.n_classes),
            }
        )
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        # The epoch's training loss: a device-side running sum (one kernel per step; a
        # torchmetrics MeanMetric costs ~0.1 ms of host time per update and, with its default
        # NaN screen, a host synchronisation). A NaN loss shows as a NaN epoch mean.
        self._loss_sum: Tensor | None = None
        self._loss_steps = 0
        self.test_probs = CatMetric()
        self.test_labels = CatMetric()
        self._forward_net = self.model
        self._graphed: GraphedForward | None = None
        self.cuda_graph_steps = 0  # training steps replayed from CUDA graphs in the last fit

    def __setattr__(self, name: str, value: Any) -> None:
        if name in ClassifierModule._PLAIN_ATTRIBUTES:
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def setup(self, stage: str) -> None:
        """Compile the network on the training device if asked."""
        if self.hparams.compile and stage == "fit":
            self._forward_net = torch.compile(self.model)

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
            self._forward_net is not self.model,
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
        """Logits ``(batch, n_classes)`` of a SoA batch."""
        inputs = [batch[name] for name in self.input_names]
        if self._graphed is not None and self.training:
            logits = self._graphed(inputs)
            if logits is not None:
                return logits
        return self._forward_net(inputs)

    def _metric_inputs(self, logits: Tensor) -> Tensor:
        probs = logits.softmax(dim=-1)
        return probs[:, 1] if self.n_classes == 2 else probs

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        """One optimisation step's loss."""
        logits = self(batch)
        loss = F.cross_entropy(logits, batch["label"], label_smoothing=self.hparams.label_smoothing)
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
        number of steps: the training shards have equal sizes)."""
        if self._loss_steps:
            mean = self._loss_sum / self._loss_steps
            self.log("train/loss", mean, prog_bar=True, sync_dist=True)
        self._loss_sum, self._loss_steps = None, 0

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

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        """Validation loss and metrics, reduced across ranks at epoch end."""
        logits = self(batch)
        loss = F.cross_entropy(logits, batch["label"])
        self.val_metrics.update(self._metric_inputs(logits), batch["label"])
        self.log(
            "val/loss",
            loss,
            on_epoch=True,
            prog_bar=True,
            sync_dist=True,
            batch_size=len(batch["label"]),
        )
        self.log_dict(self.val_metrics, on_epoch=True, prog_bar=True)

    def test_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        """Test metrics; probabilities are kept for the plots."""
        logits = self(batch)
        probs = logits.softmax(dim=-1)
        self.test_metrics.update(self._metric_inputs(logits), batch["label"])
        self.test_probs.update(probs)
        self.test_labels.update(batch["label"].float())
        self.log(
            "test/loss",
            F.cross_entropy(logits, batch["label"]),
            on_epoch=True,
            sync_dist=True,
            batch_size=len(batch["label"]),
        )
        self.log_dict(self.test_metrics, on_epoch=True)

    def on_test_epoch_end(self) -> None:
        """Gather all ranks' test predictions and draw the ROC curve and score plots."""
        probs = self.test_probs.compute()  # synchronised across ranks
        labels = self.test_labels.compute().long()
        self.test_probs.reset()
        self.test_labels.reset()
        self._write_plots(probs.float().cpu().numpy(), labels.cpu().numpy())

    @rank_zero_only
    def _write_plots(self, probs: Any, labels: Any) -> None:
        from project.training.plots import write_classifier_plots

        out_dir = self.trainer.default_root_dir
        figures = write_classifier_plots(probs, labels, self.contract.classes, out_dir)
        for logger in self.loggers:
            add_figure = getattr(getattr(logger, "experiment", None), "add_figure", None)
            if callable(add_figure):
                for name, fig in figures.items():
                    add_figure(f"test/{name}", fig, global_step=self.global_step)

    def configure_optimizers(self) -> Any:
        """Optimiser (and scheduler, stepped per epoch) from the Hydra configs."""
        optimizer = hydra.utils.instantiate(self.hparams.optimizer)(params=self.parameters())
        if self.hparams.scheduler is None:
            return optimizer
        scheduler = hydra.utils.instantiate(self.hparams.scheduler)(optimizer=optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"},
        }
