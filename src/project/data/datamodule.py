"""The LightningDataModule: one source, one contract, deterministic splits, SoA batches."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_only

from project.contract import InputContract
from project.data.batching import EpochSampler, GroupedBatches, SoABatchLoader, SoATensors
from project.data.columnar import ColumnarData
from project.data.expressions import TableSpec
from project.data.fitting import LabelCheck, StandardizerFit
from project.data.reading import load_splits
from project.data.reweighting import (
    ReweightConfig,
    ReweightFit,
    Reweighting,
    fit_reweighting,
    reweighting_from_dict,
)
from project.data.sources import Source
from project.data.splitting import SPLITS, Splitting, split_rows
from project.data.stream_index import StreamIndex, index_stream
from project.data.stream_loader import StreamDataset, StreamLoader, read_head
from project.data.streaming import StreamSettings, buffer_rows, decide

log = logging.getLogger(__name__)


__all__ = ["SoADataModule", "check_labels", "fit_standardizer", "split_rows"]


def fit_standardizer(data: ColumnarData, contract: InputContract) -> InputContract:
    """Fit mean and scale of every feature and regression target on ``data`` (the training
    split) and return the fitted contract. Jagged fields are fitted on the objects the model
    sees (the first ``max_length`` of each row); see ``project.data.fitting``."""
    fit = StandardizerFit(contract)
    fit.update(data)
    return fit.result()


def _check_whole(key: str, value: Any, minimum: int, example: int) -> int:
    """``value`` if it is a whole number >= ``minimum``; otherwise an error naming the config
    key ``key`` and what to give (``example``)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(
            f"{key} must be a whole number, got {value!r} ({type(value).__name__}); give for "
            f"instance {key}={example}"
        )
    if value < minimum:
        raise ValueError(
            f"{key} must be >= {minimum}, got {value}; give for instance {key}={example}"
        )
    return int(value)


def _check_split(split: Any) -> tuple[float, ...]:
    """The three split fractions as a tuple, or an error saying what ``data.split`` takes."""
    numbers = not isinstance(split, (str, bytes)) and isinstance(split, Sequence)
    if numbers:
        numbers = all(isinstance(f, (int, float)) and not isinstance(f, bool) for f in split)
    if not numbers or len(split) != 3:
        raise ValueError(
            f"data.split must be three split fractions (train, validation, test), got "
            f"{list(split) if numbers else split!r}; split fractions must be positive and sum "
            "to 1, for instance data.split=[0.7,0.15,0.15]"
        )
    return tuple(float(f) for f in split)


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
    split_by, split_ids
        How rows are assigned to the splits: ``rows`` (a permutation of the loaded table's
        rows, in memory only), ``hash`` (a hash of the identifier columns ``split_ids``) or
        ``file`` (whole files); see ``project.data.splitting``.
    stream
        Stream the data in chunks instead of loading it: ``True``, ``False`` or ``"auto"``
        (when the table would not fit ``memory_budget``); see ``project.data.streaming``.
    memory_budget
        Bytes the data may take (a number, or text such as ``"8 GB"``); ``None``: half the
        machine's RAM. Under DDP, the budget of one rank.
    shuffle_buffer, fit_rows, workers
        Streaming: rows mixed at once; training rows the constants (and the reweighting) are
        fitted on (``None``: all); DataLoader worker processes (0: none).
    on_bad_file
        ``raise`` (an unreadable file is an error naming it and the entry range) or ``skip``
        (it is left out, logged and listed in ``report()``).
    cache_dir
        Where streaming keeps its indexing pass (the run directory), so that a resumed run
        does not redo it; ``None``: nowhere.
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
        split_by: str = "rows",
        split_ids: Sequence[str] = ("entry",),
        stream: bool | str = "auto",
        memory_budget: int | float | str | None = None,
        shuffle_buffer: int = 100_000,
        fit_rows: int | None = None,
        workers: int = 0,
        on_bad_file: str = "raise",
        cache_dir: str | None = None,
    ) -> None:
        super().__init__()
        self.source = source
        self.raw_contract = InputContract.from_dict(
            contract if isinstance(contract, InputContract) else dict(contract)
        )
        self.weight, self.nan_policy = weight, nan_policy
        self.split, self.seed = _check_split(split), _check_whole("data.seed", seed, 0, 42)
        self.batch_size = _check_whole("data.batch_size", batch_size, 1, 256)
        self.eval_batch_size = _check_whole("data.eval_batch_size", eval_batch_size, 1, 1024)
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
        self.splitting = Splitting(split_by, self.split, self.seed, tuple(split_ids))
        self.streaming = StreamSettings(
            stream, memory_budget, shuffle_buffer, fit_rows, workers, on_bad_file, cache_dir
        )
        # Set by ``setup`` when the data streams: the indexing pass's result.
        self.stream_index: StreamIndex | None = None
        self.skipped_files: dict[str, str] = {}

    def prepare_data(self) -> None:
        """Let a generating source write its cache once (rank zero), before ``setup``."""
        self.source.files()

    def table_spec(self) -> TableSpec:
        """What the source is read into: the contract's columns, labels, targets, weights."""
        return TableSpec(
            self.raw_contract,
            weight=self.weight,
            ids=self.splitting.stored_ids,
            nan_policy=self.nan_policy,
        )

    def setup(self, stage: str | None = None) -> None:
        """Load (or index, when streaming), check against the contract, split and fit;
        idempotent."""
        if self.contract is not None:
            return
        spec = self.table_spec()
        if decide(
            self.source,
            spec,
            self.splitting,
            self.streaming,
            self.batch_size,
            self.eval_batch_size,
            self.prefetch,
        ):
            self._setup_stream(spec)
            return
        loaded = load_splits(
            self.source, spec, self.raw_contract, self.splitting, self.streaming.on_bad_file
        )
        self.splits, self.skipped_files = loaded.splits, loaded.skipped
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

    def _setup_stream(self, spec: TableSpec) -> None:
        """Index the data (or read the index from ``cache_dir``) and take its constants."""
        # The streaming pass fits the reweighting beside the standardisation, on the same rows.
        fits = (
            {}
            if self.reweight is None
            else {"reweighting": ReweightFit(self.raw_contract, self.reweight)}
        )
        index = index_stream(
            self.source,
            spec,
            self.raw_contract,
            self.splitting,
            self.streaming,
            fits=fits,
            is_rank_zero=rank_zero_only.rank == 0,
        )
        self.stream_index, self.skipped_files = index, index.skipped
        if self.reweight is not None:
            self.reweighting = reweighting_from_dict(index.fitted["reweighting"], self.raw_contract)
            self.save_hyperparameters({"reweighting": self.reweighting.to_dict()})
        self.contract = index.contract

    def head(self, split: str, n_rows: int) -> ColumnarData:
        """The first ``n_rows`` rows of ``split`` in stored order (streamed or in memory),
        with the reweighted weights where the reweighting applies."""
        self.setup()
        if self.stream_index is None:
            data = self.splits[split]
            return data.take(np.arange(min(n_rows, len(data))))
        return read_head(
            self.source,
            self.table_spec(),
            self.stream_index,
            self.splitting,
            split,
            n_rows,
            self.reweighting,
        )

    def report(self) -> dict[str, Any]:
        """What the run's ``metrics.json`` says of the data: whether it streamed, the rows per
        split, and the files left out (``on_bad_file=skip``) with the reason."""
        self.setup()
        if self.stream_index is None:
            rows = {k: len(v) for k, v in self.splits.items()}
        else:
            rows = {k: int(self.stream_index.split_rows(k).sum()) for k in SPLITS}
        skipped = [{"file": f, "reason": r} for f, r in self.skipped_files.items()]
        return {"streaming": self.stream_index is not None, "rows": rows, "skipped_files": skipped}

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

    def _stream_loader(self, name: str, shuffle: bool) -> StreamLoader:
        rank, world = self._rank()
        device = self._device()
        workers = self.streaming.workers
        dataset = StreamDataset(
            self.source,
            self.table_spec(),
            self.stream_index,
            name,
            self.splitting,
            self.batch_size if shuffle else self.eval_batch_size,
            shuffle,
            buffer_rows=self.streaming.shuffle_buffer // max(workers, 1),
            drop_last=self.drop_last and shuffle,
            seed=self.seed,
            rank=rank,
            world_size=world,
            workers=workers,
            reweighting=self.reweighting,
            fixed_size=device.type != "cpu",
        )
        if shuffle:
            log.info(
                f"rank {rank}/{world}: {dataset.hi - dataset.lo} of {dataset.n_rows} training "
                f"rows per epoch in {len(dataset)} batches, streamed by {max(workers, 1)} "
                f"reader(s) with {buffer_rows(self.streaming, self.batch_size):,} buffered rows "
                "each"
            )
        pin = self.pin_memory if self.pin_memory is not None else device.type == "cuda"
        # Formed ahead in a thread for an accelerator only, as in memory: on the CPU the thread
        # would compete with the training step for the cores.
        prefetch = self.prefetch if workers or device.type != "cpu" else 0
        return StreamLoader(dataset, workers, pin_memory=pin, prefetch=prefetch)

    def _loader(self, name: str, shuffle: bool) -> SoABatchLoader | StreamLoader:
        self.setup()
        if self.stream_index is not None:
            return self._stream_loader(name, shuffle)
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

    def train_dataloader(self) -> SoABatchLoader | StreamLoader | GroupedBatches:
        """Shuffled training batches; under DDP each rank gets a disjoint shard per epoch.

        A LightningModule whose integer attribute ``steps_per_call`` is above 1 (the
        template's ``model.steps_per_call``) takes that many batches per training step: they
        come grouped in lists (``GroupedBatches``).
        """
        loader = self._loader("train", shuffle=True)
        module = self.trainer.lightning_module if self.trainer is not None else None
        steps = getattr(module, "steps_per_call", 1)
        return GroupedBatches(loader, steps) if steps > 1 else loader

    def val_dataloader(self) -> SoABatchLoader | StreamLoader:
        """Validation batches in stored order."""
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> SoABatchLoader | StreamLoader:
        """Test batches in stored order."""
        return self._loader("test", shuffle=False)

    def predict_dataloader(self) -> SoABatchLoader | StreamLoader:
        """Test batches, for ``trainer.predict``."""
        return self._loader("test", shuffle=False)


def check_labels(data: ColumnarData, contract: InputContract) -> None:
    """Labels must exist and lie in ``[0, n_classes)``, and every class must carry a positive
    total weight; otherwise name the source and classes (``project.data.fitting.LabelCheck``)."""
    labels = LabelCheck(contract)
    if len(data):
        labels.update(data)
    labels.check(data.source)
