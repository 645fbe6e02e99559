"""An instant synthetic source with the schema of the Pythia jets source, for unit tests.

The numbers are not physics: two classes differ in jet mass, N-subjettiness ratios and
constituent multiplicity enough for a model to learn something in a few steps.
"""

from __future__ import annotations

import numpy as np

from project.data.columnar import ColumnarData, Jagged

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


class ToyJetSource:
    """Synthetic jets: flat ``jet_*`` columns, a jagged ``part`` collection, labels 0/1.

    Parameters
    ----------
    n_jets
        Number of rows.
    seed
        Seed of the generator: the same seed gives the same table.
    max_constituents
        Upper bound of the constituent multiplicity; rows with zero constituents occur.
    """

    def __init__(self, n_jets: int = 512, seed: int = 0, max_constituents: int = 40) -> None:
        self.n_jets, self.seed, self.max_constituents = n_jets, seed, max_constituents

    def load(self) -> ColumnarData:
        """Generate the table (vectorised, milliseconds)."""
        rng = np.random.default_rng(self.seed)
        n = self.n_jets
        label = rng.integers(0, 2, n)
        counts = np.where(
            rng.random(n) < 0.03,
            0,
            np.clip(rng.poisson(np.where(label == 1, 25, 15)), 1, self.max_constituents),
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
        return ColumnarData(
            flat={k: v.astype(np.float32) for k, v in flat.items()},
            jagged={
                "part": Jagged.from_counts(
                    counts, {k: v.astype(np.float32) for k, v in fields.items()}
                )
            },
            labels=label.astype(np.int64),
            source=f"toy jets (n_jets={n}, seed={self.seed})",
        ).validate()
