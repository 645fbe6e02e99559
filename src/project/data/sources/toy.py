"""An instant synthetic source with the columns of the Pythia jets cache, for tests and demos.

The numbers are not physics: the two classes differ in jet mass, N-subjettiness ratios and
constituent multiplicity enough for a model to learn something in a few steps. Beside the
features the table has what an analysis' samples carry: an event weight ``gen_weight`` (about
5% negative, as at NLO), a per-class cross-section ``xsec``, and a regression target
``jet_truth_mass``, a smooth function of the inputs with a little noise.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from typing import Any

import awkward as ak
import numpy as np

from project.data.sources import Chunk, entry_ranges

FLAT = (
    "jet_pt",
    "jet_eta",
    "jet_phi",
    "jet_mass",
    "jet_n_constituents",
    "jet_tau1",
    "jet_tau2",
    "jet_tau3",
    "jet_tau21",
    "jet_tau32",
)
FIELDS = ("pt", "eta", "phi", "energy", "deta", "dphi", "ptrel", "erel", "dr")
EXTRA = ("label", "gen_weight", "xsec", "jet_truth_mass")


class ToyJetSource:
    """Synthetic jets: flat ``jet_*`` columns, list columns ``part_*``, ``label`` 0/1, and the
    extra columns of the module docstring.

    Parameters
    ----------
    n_jets
        Number of rows.
    seed
        Seed of the generator: the same seed gives the same table.
    max_constituents
        Upper bound of the constituent multiplicity; rows with zero constituents occur.
    chunk_size
        Rows per chunk (``None``: one chunk), to exercise chunked and streamed reading.
    block_rows
        Generate the table in independent blocks of this many rows, block ``i`` from the seed
        ``(seed, i)``, each when its chunk is read and never all at once: a table of any size
        (``scripts/generate.py`` writes such tables as Parquet shards). The chunks are then
        the blocks, and the rows differ from those of ``block_rows=None``.
    """

    kind = "column"

    def __init__(
        self,
        n_jets: int = 512,
        seed: int = 0,
        max_constituents: int = 40,
        chunk_size: int | None = None,
        block_rows: int | None = None,
    ) -> None:
        self.n_jets, self.seed, self.max_constituents = int(n_jets), int(seed), max_constituents
        self.chunk_size = chunk_size
        if block_rows is not None and (isinstance(block_rows, bool) or int(block_rows) < 1):
            raise ValueError(f"block_rows must be a whole number >= 1, got {block_rows!r}")
        self.block_rows = None if block_rows is None else int(block_rows)

    @property
    def name(self) -> str:
        """The one 'file' of this source, as named in messages."""
        blocks = "" if self.block_rows is None else f", block_rows={self.block_rows}"
        return f"toy jets (n_jets={self.n_jets}, seed={self.seed}{blocks})"

    def files(self) -> list[str]:
        """One stream."""
        return [self.name]

    def where(self, file: str) -> str:
        """The stream's name."""
        return file

    def schema(self, file: str) -> tuple[list[str], set[str]]:
        """Column names, and the list columns ``part_*``."""
        names = [*FLAT, *(f"part_{f}" for f in FIELDS), *EXTRA]
        return names, {n for n in names if n.startswith("part_")}

    def chunks(self, file: str, columns: Sequence[str]) -> list[Chunk]:
        """Rows in pieces of ``chunk_size`` (or the blocks of ``block_rows``)."""
        step = self.block_rows or self.chunk_size or self.n_jets
        return entry_ranges(self.n_jets, step, file, file)

    def read(self, chunk: Chunk, columns: Sequence[str]) -> dict[str, Any]:
        """The chunk's rows of ``columns``."""
        if self.block_rows is None:
            return {c: self.table[c][chunk.start : chunk.stop] for c in columns}
        block, offset = divmod(chunk.start, self.block_rows)
        if offset or chunk.stop > min(chunk.start + self.block_rows, self.n_jets):
            raise ValueError(
                f"{chunk.describe()} is not one block of {self.block_rows} rows of this source"
            )
        table = generate_jets(chunk.n_rows, [self.seed, block], self.max_constituents)
        return {c: table[c] for c in columns}

    @cached_property
    def table(self) -> dict[str, Any]:
        """The generated columns (vectorised, milliseconds; generated once per instance)."""
        return generate_jets(self.n_jets, self.seed, self.max_constituents)

    def __repr__(self) -> str:
        blocks = "" if self.block_rows is None else f", block_rows={self.block_rows}"
        return f"ToyJetSource(n_jets={self.n_jets}, seed={self.seed}{blocks})"


def generate_jets(n: int, seed: int | Sequence[int], max_constituents: int) -> dict[str, Any]:
    """``n`` toy jets from ``numpy.random.default_rng(seed)``: the columns of ``ToyJetSource``."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, n)
    counts = np.where(
        rng.random(n) < 0.03,
        0,
        np.clip(rng.poisson(np.where(label == 1, 25, 15)), 1, max_constituents),
    )
    pt = rng.uniform(550, 650, n)
    eta = rng.uniform(-2, 2, n)
    phi = rng.uniform(-np.pi, np.pi, n)
    mass = np.where(label == 1, rng.normal(172, 20, n), rng.lognormal(4.2, 0.4, n)).clip(1)
    tau1 = rng.uniform(0.1, 0.4, n)
    tau21 = np.where(label == 1, rng.uniform(0.3, 0.7, n), rng.uniform(0.4, 0.9, n))
    tau32 = np.where(label == 1, rng.uniform(0.3, 0.6, n), rng.uniform(0.5, 0.9, n))
    tau2, tau3 = tau1 * tau21, tau1 * tau21 * tau32
    flat = dict(
        zip(
            FLAT,
            (pt, eta, phi, mass, counts.astype(np.float64), tau1, tau2, tau3, tau21, tau32),
            strict=True,
        )
    )

    total = int(counts.sum())
    row = np.repeat(np.arange(n), counts)
    frac = rng.exponential(1.0, total)
    # Sorted by decreasing pT within each row, as the real sources store constituents.
    order = np.lexsort((-frac, row))
    frac = frac[order]
    norm = np.bincount(row, weights=frac, minlength=n)
    ptrel = frac / np.maximum(norm[row], 1e-9)
    width = np.where(label == 1, 0.35, 0.2)[row]
    deta = rng.normal(0, 1, total) * width
    dphi = rng.normal(0, 1, total) * width
    cpt = ptrel * pt[row]
    ceta = eta[row] + deta
    energy = cpt * np.cosh(ceta)
    jet_energy = np.bincount(row, weights=energy, minlength=n)
    fields = {
        "pt": cpt,
        "eta": ceta,
        "phi": phi[row] + dphi,
        "energy": energy,
        "deta": deta,
        "dphi": dphi,
        "ptrel": ptrel,
        "erel": energy / np.maximum(jet_energy[row], 1e-9),
        "dr": np.hypot(deta, dphi),
    }
    # What a sample carries beside its features: generator weights (some negative) and a
    # cross-section per class, and a truth quantity to regress.
    gen_weight = np.where(rng.random(n) < 0.05, -1.0, 1.0)
    xsec = np.where(label == 1, 0.8, 2.5)
    truth_mass = mass * (1.0 + 0.25 * (tau21 - 0.6)) * (pt / 600.0) + rng.normal(0, 2.0, n)
    table: dict[str, Any] = {k: v.astype(np.float32) for k, v in flat.items()}
    for name, values in fields.items():
        table[f"part_{name}"] = ak.unflatten(values.astype(np.float32), counts)
    table["label"] = label.astype(np.int64)
    table["gen_weight"] = gen_weight.astype(np.float32)
    table["xsec"] = xsec.astype(np.float32)
    table["jet_truth_mass"] = truth_mass.astype(np.float32)
    return table
