"""HDF5 files in the layout the ATLAS salt/UPP chain writes, read through h5py.

A file holds one flat compound dataset of jets, shape ``(n_jets,)``, one field per jet
variable, and per constituent collection (tracks, flow objects, hits) a padded compound
dataset of shape ``(n_jets, max_objects)`` whose boolean field ``valid`` marks the slots that
hold an object. Read here:

- every field of the jets dataset is a per-row column under its own name (``pt``,
  ``HadronConeExclTruthLabelID``);
- every field of a collection dataset ``tracks`` is a jagged column ``tracks_<field>``
  (``tracks_d0``), its objects the ``valid`` slots of each row in stored order, so the padding
  never reaches the table: the contract's jagged fields read them as for ROOT or Parquet
  (``{name: d0}`` in collection ``tracks`` reads ``tracks_d0``), and the SoA assembler pads
  again to the contract's ``max_length``.

A file's chunks are row ranges of the jets dataset, as long as its HDF5 chunks (or
``step`` rows), so that a read touches whole chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import awkward as ak
import h5py
import numpy as np

from project.contract import ContractError
from project.data.expressions import resolve_files
from project.data.sources import Chunk, entry_ranges

VALID = "valid"
# Rows per chunk of a contiguous (unchunked) jets dataset.
DEFAULT_STEP = 100_000


class H5Source:
    """Rows of salt/UPP-style HDF5 files: one per entry of the jets dataset.

    Parameters
    ----------
    files
        A path, a glob pattern or a list of them; the files are concatenated in order.
    jets
        Name of the flat compound dataset (``jets``).
    collections
        Names of the padded constituent datasets to read (``[tracks]``); ``None``: every
        two-dimensional compound dataset at the file's top level that has a ``valid`` field.
    step
        Rows per chunk; ``None``: the jets dataset's HDF5 chunk length (``DEFAULT_STEP`` for a
        contiguous dataset).
    """

    kind = "field"

    def __init__(
        self,
        files: str | Sequence[str],
        jets: str = "jets",
        collections: Sequence[str] | None = None,
        step: int | None = None,
    ) -> None:
        self.paths = files
        self.jets = str(jets)
        self.collections = None if collections is None else [str(c) for c in collections]
        if step is not None and (isinstance(step, bool) or int(step) < 1):
            raise ContractError(f"data.source.step must be a whole number >= 1, got {step!r}")
        self.step = None if step is None else int(step)

    def files(self) -> list[str]:
        """The HDF5 files, globs expanded."""
        return resolve_files(self.paths, "HDF5")

    def where(self, file: str) -> str:
        """The path."""
        return file

    def schema(self, file: str) -> tuple[list[str], set[str]]:
        """The jets dataset's field names, then ``<collection>_<field>`` of each collection
        (the jagged columns); checks the layout (see ``_layout``)."""
        with _open(file) as h5:
            jets, collections = self._layout(h5, file)
            names = list(jets.dtype.names)
            jagged: list[str] = []
            for cname, ds in collections.items():
                jagged += [f"{cname}_{f}" for f in ds.dtype.names if f != VALID]
        clash = sorted(set(names) & set(jagged))
        if clash:
            raise ContractError(
                f"{file}: jets fields {clash} have the names of collection fields "
                "(<collection>_<field>); rename them, or leave the collection out "
                "(data.source.collections)"
            )
        return names + jagged, set(jagged)

    def chunks(self, file: str, columns: Sequence[str]) -> list[Chunk]:
        """Row ranges of the jets dataset, one HDF5 chunk (or ``step`` rows) each."""
        with _open(file) as h5:
            jets, _ = self._layout(h5, file)
            n = jets.shape[0]
            step = self.step or (jets.chunks[0] if jets.chunks else DEFAULT_STEP)
        return entry_ranges(n, step, file, file)

    def read(self, chunk: Chunk, columns: Sequence[str]) -> dict[str, Any]:
        """The chunk's rows of ``columns``: numpy arrays for jets fields, awkward arrays (the
        ``valid`` slots of each row) for collection fields."""
        with _open(chunk.file) as h5:
            jets, collections = self._layout(h5, chunk.file)
            out: dict[str, Any] = {}
            flat = [c for c in columns if c in jets.dtype.names]
            if flat:
                for name in flat:
                    _check_field(jets, name, chunk.file)
                values = jets.fields(flat)[chunk.start : chunk.stop]
                out.update({name: np.ascontiguousarray(values[name]) for name in flat})
            for cname, ds in collections.items():
                prefix = f"{cname}_"
                wanted = [
                    c
                    for c in columns
                    if c.startswith(prefix) and c[len(prefix) :] in ds.dtype.names
                ]
                if not wanted:
                    continue
                fields = [c[len(prefix) :] for c in wanted]
                for name in fields:
                    _check_field(ds, name, chunk.file)
                values = ds.fields([*fields, VALID])[chunk.start : chunk.stop]
                valid = values[VALID]
                counts = valid.sum(axis=1)
                for column, name in zip(wanted, fields, strict=True):
                    out[column] = ak.unflatten(np.ascontiguousarray(values[name][valid]), counts)
        return out

    def _layout(self, h5: h5py.File, file: str) -> tuple[h5py.Dataset, dict[str, h5py.Dataset]]:
        """The jets dataset and the collection datasets, checked: a clear error for a missing
        dataset, a dataset that is not compound, a wrong shape, or a ``valid`` field that is
        missing or not boolean."""
        present = sorted(k for k in h5 if isinstance(h5[k], h5py.Dataset))
        if self.jets not in h5 or not isinstance(h5[self.jets], h5py.Dataset):
            raise ContractError(
                f"{file} has no dataset {self.jets!r} (its datasets: {present}); give the flat "
                "jets dataset's name as data.source.jets"
            )
        jets = h5[self.jets]
        if jets.dtype.names is None or jets.ndim != 1:
            raise ContractError(
                f"{file}: dataset {self.jets!r} has dtype {jets.dtype} and shape {jets.shape}; "
                "expected a one-dimensional compound dataset (one record per jet, one field per "
                "variable), as salt and UPP write"
            )
        if self.collections is None:
            names = [
                k
                for k in present
                if k != self.jets and h5[k].dtype.names is not None and VALID in h5[k].dtype.names
            ]
        else:
            names = self.collections
        collections = {}
        for cname in names:
            if cname not in h5 or not isinstance(h5[cname], h5py.Dataset):
                raise ContractError(
                    f"{file} has no dataset {cname!r} (its datasets: {present}); fix "
                    "data.source.collections"
                )
            ds = h5[cname]
            if ds.dtype.names is None or ds.ndim != 2 or ds.shape[0] != jets.shape[0]:
                raise ContractError(
                    f"{file}: dataset {cname!r} has dtype {ds.dtype} and shape {ds.shape}; "
                    f"expected a compound dataset of shape ({jets.shape[0]}, max_objects), one "
                    f"row per entry of {self.jets!r}, padded, with a boolean field {VALID!r}"
                )
            if VALID not in ds.dtype.names:
                raise ContractError(
                    f"{file}: dataset {cname!r} has no field {VALID!r} (fields: "
                    f"{list(ds.dtype.names)}); the padded layout needs it to tell objects from "
                    "padding"
                )
            if ds.dtype[VALID] != np.bool_:
                raise ContractError(
                    f"{file}: field {cname}.{VALID} has dtype {ds.dtype[VALID]}; expected bool "
                    "(True for a slot that holds an object)"
                )
            collections[cname] = ds
        return jets, collections

    def __repr__(self) -> str:
        return f"H5Source({self.paths!r}, jets={self.jets!r}, collections={self.collections!r})"


def _open(path: str) -> h5py.File:
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise ContractError(f"{path} is not a readable HDF5 file: {err}") from err


def _check_field(ds: h5py.Dataset, name: str, file: str) -> None:
    dtype = ds.dtype[name]
    if dtype.kind not in "biuf" or dtype.shape != ():
        raise ContractError(
            f"{file}: field {ds.name.lstrip('/')}.{name} has dtype {dtype}; expected a number "
            "or a boolean per slot (a scalar field)"
        )
