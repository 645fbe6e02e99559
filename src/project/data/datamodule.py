"""The LightningDataModule: one source, one contract, deterministic splits, SoA batches."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch

from project.contract import LOG_FLOOR, ContractError, InputContract
from project.data.batching import EpochSampler, SoABatchLoader, SoATensors
from project.data.columnar import ColumnarData, gather_objects
from project.data.expressions import TableSpec
from project.data.reweighting import ReweightConfig, Reweighting, fit_reweighting
from project.data.sources import Source, load

log = logging.getLogger(__name__)


def split_rows(n_rows: int, fractions: Sequence[float], seed: int) -> list[np.ndarray]:
    """Split ``range(n_rows)`` into disjoint index arrays, one per fraction, shuffled by ``seed``.

    The same ``(n_rows, fractions, seed)`` always gives the same split; each part is sorted so
    evaluation batches keep the source's row order.
    """
    fractions = np.asarray(fractions, dtype=np.float64)
    if fractions.ndim != 1 or np.any(fractions <= 0) or abs(fractions.sum() - 1.0) > 1e-6:
        raise ValueError(f"split fractions must be positive and sum to 1, got {fractions.tolist()}")
    order = np.random.default_rng(seed).permutation(n_rows)
    bounds = np.round(np.cumsum(fractions) * n_rows).astype(np.int64)
    bounds[-1] = n_rows
    return [np.sort(part) for part in np.split(order, bounds[:-1])]


def _moments(values: np.ndarray, log: bool) -> tuple[float, float]:
    values = values.astype(np.float64)
    if log:
        values = np.log(np.maximum(values, LOG_FLOOR))
    if len(values) == 0:
        return 0.0, 1.0
    scale = float(values.std())
    return float(values.mean()), scale if np.isfinite(scale) and scale > 1e-12 else 1.0


def fit_standardizer(data: ColumnarData, contract: InputContract) -> InputContract:
    """Fit mean and scale of every feature and regression target on ``data`` (the training
    split) and return the fitted contract. Jagged fields are fitted on the objects the model
    sees (the first ``max_length`` of each row)."""
    flat = {f.name: _moments(data.flat[f.name], f.transform == "log") for f in contract.flat}
    jagged = {}
    for coll in contract.jagged:
        src = data.jagged[coll.name]
        _, seen = gather_objects(src.offsets, np.arange(len(data)), coll.max_length)
        jagged[coll.name] = {
            f.name: _moments(src.fields[f.name][seen], f.transform == "log") for f in coll.fields
        }
    targets = {t.name: _moments(data.targets[t.name], False) for t in contract.regression}
    return contract.with_constants(flat, jagged, targets)


class SoADataModule(L.LightningDataModule):
    """Loads one source, splits it by seed, fits the standardisation and serves SoA batches.

    Parameters
    ----------
    source
        Where the stored columns come from (see ``project.data.sources``).
    contract
        The input contract as written in the data config: each feature with its expression
        over the source's columns (constants are fitted here).
    weight
        Expression for each row's event weight over the source's columns, for instance
        ``genWeight * xsec / sum_w``; ``None`` trains unweighted. Negative weights are allowed.
    reweight
        Kinematic reweighting (``project.data.reweighting``: variables, bins, target,
        max_weight, normalise), fitted on the training split and multiplying the event weights
        of the splits it names; ``None``: none.
    nan_policy
        ``raise`` (NaN or Inf in a feature, target or weight is an error naming the file and
        column) or ``drop`` (those rows are dropped and counted in the log).
    split
        Train, validation and test fractions.
    seed
        Seed of the split and of the training shuffle.
    batch_size, eval_batch_size
        Rows per training and per evaluation batch (per device).
    drop_last
        Drop the last incomplete training batch.
    resident
        Keep the splits on the training GPU and slice batches there: ``True``, ``False`` or
        ``"auto"`` (when a split takes under ``resident_fraction`` of the free device memory).
    resident_fraction
        Share of free device memory the splits may use under ``resident="auto"``.
    prefetch
        Host batches formed ahead in a background thread when the data is not resident.
    pin_memory
        Pin host batches for asynchronous copies; ``None`` pins whenever training on a GPU.
    """

    def __init__(
        self,
        source: Source,
        contract: Mapping[str, Any] | InputContract,
        weight: str | None = None,
        reweight: Mapping[str, Any] | None = None,
        nan_policy: str = "raise",
        split: Sequence[float] = (0.7, 0.15, 0.15),
        seed: int = 42,
        batch_size: int = 256,
        eval_batch_size: int = 1024,
        drop_last: bool = False,
        resident: bool | str = "auto",
        resident_fraction: float = 0.25,
        prefetch: int = 2,
        pin_memory: bool | None = None,
    ) -> None:
        super().__init__()
        self.source = source
        self.raw_contract = InputContract.from_dict(
            contract if isinstance(contract, InputContract) else dict(contract)
        )
        self.weight, self.nan_policy = weight, nan_policy
        self.split, self.seed = tuple(split), seed
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError(
                f"data.batch_size and data.eval_batch_size must be >= 1, got {batch_size} and "
                f"{eval_batch_size}"
            )
        if resident not in (True, False, "auto"):
            raise ValueError(f"resident must be true, false or auto, got {resident!r}")
        self.drop_last, self.pin_memory, self.prefetch = drop_last, pin_memory, prefetch
        self.resident, self.resident_fraction = resident, resident_fraction
        self.contract: InputContract | None = None
        self.splits: dict[str, ColumnarData] = {}
        self._tensors: dict[str, SoATensors] = {}
        # Checked here, before any data is read: a variable missing from the contract or bad
        # bins fail at once.
        self.reweight = (
            None if reweight is None else ReweightConfig.from_dict(reweight, self.raw_contract)
        )
        self.reweighting: Reweighting | None = None

    def prepare_data(self) -> None:
        """Let a generating source write its cache once (rank zero), before ``setup``."""
        self.source.files()

    def table_spec(self) -> TableSpec:
        """What the source is read into: the contract's columns, labels, targets, weights."""
        return TableSpec(self.raw_contract, weight=self.weight, nan_policy=self.nan_policy)

    def setup(self, stage: str | None = None) -> None:
        """Load, check against the contract, split and fit; idempotent."""
        if self.contract is not None:
            return
        data = load(self.source, self.table_spec())
        if data.dropped:
            log.warning(
                f"{data.source}: {data.dropped} rows with NaN or Inf values dropped "
                "(data.nan_policy=drop)"
            )
        check_labels(data, self.raw_contract)
        names = ("train", "val", "test")
        parts = split_rows(len(data), self.split, self.seed)
        for name, rows in zip(names, parts, strict=True):
            if len(rows) == 0:
                raise ContractError(
                    f"{data.source}: the {name} split is empty ({len(data)} rows, split "
                    f"{list(self.split)}); use more data or other fractions"
                )
            self.splits[name] = data.take(rows)
        if self.reweight is not None:
            self.reweighting = fit_reweighting(
                self.splits["train"], self.raw_contract, self.reweight
            )
            for name in self.reweight.splits:
                self.splits[name] = self.reweighting.apply(self.splits[name])
            # In the checkpoint beside the model's hyperparameters (datamodule_hyper_parameters).
            self.save_hyperparameters({"reweighting": self.reweighting.to_dict()})
        self.contract = fit_standardizer(self.splits["train"], self.raw_contract)
        self._tensors = {k: SoATensors(v, self.contract) for k, v in self.splits.items()}

    def _rank(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None:
            return 0, 1
        return trainer.global_rank, trainer.world_size

    def _device(self) -> torch.device:
        trainer = self.trainer
        return trainer.strategy.root_device if trainer is not None else torch.device("cpu")

    def _place(self, tensors: SoATensors, device: torch.device) -> SoATensors:
        """Move a split to the accelerator if the ``resident`` setting says so."""
        if device.type == "cpu" or tensors.device == device or self.resident is False:
            return tensors
        if self.resident == "auto":
            free, _ = torch.cuda.mem_get_info(device) if device.type == "cuda" else (0, 0)
            if tensors.nbytes() > self.resident_fraction * free:
                return tensors
        return tensors.to(device)

    def _loader(self, name: str, shuffle: bool) -> SoABatchLoader:
        self.setup()
        rank, world = self._rank()
        device = self._device()
        tensors = self._tensors[name] = self._place(self._tensors[name], device)
        sampler = EpochSampler(tensors.n_rows, shuffle, self.seed, rank, world)
        if shuffle:
            first = sampler.rows()[:3].tolist()
            log.info(
                f"rank {rank}/{world}: {len(sampler)} of {tensors.n_rows} training rows per epoch "
                f"(epoch 0 starts with rows {first}), data on {tensors.device}"
            )
        pin = self.pin_memory if self.pin_memory is not None else device.type == "cuda"
        return SoABatchLoader(
            tensors,
            self.batch_size if shuffle else self.eval_batch_size,
            sampler,
            drop_last=self.drop_last and shuffle,
            pin_memory=pin and tensors.device.type == "cpu",
            prefetch=self.prefetch if device.type != "cpu" else 0,
        )

    def train_dataloader(self) -> SoABatchLoader:
        """Shuffled training batches; under DDP each rank gets a disjoint shard per epoch."""
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> SoABatchLoader:
        """Validation batches in stored order."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> SoABatchLoader:
        """Test batches in stored order."""
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> SoABatchLoader:
        """Test batches, for ``trainer.predict``."""
        return self._loader("test", shuffle=False)


def check_labels(data: ColumnarData, contract: InputContract) -> None:
    """Labels must exist and lie in ``[0, n_classes)``, and every class must carry a positive
    total weight; otherwise name the source and classes."""
    if len(data) == 0:
        raise ContractError(f"{data.source}: no rows (check the selection)")
    if not contract.classes:
        return
    if data.labels is None:
        raise ContractError(f"{data.source}: the source gives no labels; set its label expression")
    bad = (data.labels < 0) | (data.labels >= contract.n_classes)
    if bad.any():
        found = sorted(set(np.unique(data.labels[bad]).tolist()))[:10]
        raise ContractError(
            f"{data.source}: labels {found} are outside 0..{contract.n_classes - 1} for classes "
            f"{list(contract.classes)}; fix the label expression or the contract's classes"
        )
    weights = np.ones(len(data)) if data.weights is None else data.weights.astype(np.float64)
    totals = np.bincount(data.labels, weights=weights, minlength=contract.n_classes)
    for k, total in enumerate(totals):
        if not total > 0:
            raise ContractError(
                f"{data.source}: class {contract.classes[k]!r} has total weight {total:.6g} "
                f"after the selection ({int(np.sum(data.labels == k))} rows); a class needs rows "
                "with a positive sum of weights: check the label, selection and weight expressions"
            )
