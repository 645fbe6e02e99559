"""N-subjettiness of many jets at once, from flat constituent arrays.

``tau_N = sum_i pT_i * min_k dR(i, axis_k) / d0`` with ``beta = 1`` and ``d0 = sum_i pT_i * R``
(the normalised measure of Thaler & Van Tilburg). The ``N`` axes are the exclusive kt subjets of
the jet's constituents, as in FastJet contrib's ``KT_Axes``. Distances are in (rapidity, phi),
like FastJet's ``PseudoJet::delta_R``. All jets are reclustered in one FastJet call by treating
each jet as an "event" of the multi-event interface, so nothing loops over jets in Python.
"""

from __future__ import annotations

import warnings

import awkward as ak
import fastjet
import numpy as np

# FastJet's largest allowed R (contrib's KT_Axes uses it): beam distances then never win, so
# the exclusive clustering is the pure pairwise kt sequence.
_KT_AXES_R = 1000.0


def _rapidity(e: np.ndarray, pz: np.ndarray) -> np.ndarray:
    # Clip so a massless object along the beam gives a large finite rapidity, not inf/nan.
    num = np.maximum(e + pz, 1e-12)
    den = np.maximum(e - pz, 1e-12)
    return 0.5 * np.log(num / den)


def momenta_as_events(
    offsets: np.ndarray, px: np.ndarray, py: np.ndarray, pz: np.ndarray, e: np.ndarray
) -> ak.Array:
    """Flat four-momenta grouped by ``offsets`` as the Awkward array FastJet's multi-event
    ``ClusterSequence`` takes (a list of ``Momentum4D`` records per group)."""
    record = ak.contents.RecordArray(
        [
            ak.contents.NumpyArray(np.ascontiguousarray(a, dtype=np.float64))
            for a in (px, py, pz, e)
        ],
        ["px", "py", "pz", "E"],
        parameters={"__record__": "Momentum4D"},
    )
    return ak.Array(ak.contents.ListOffsetArray(ak.index.Index64(offsets), record))


def nsubjettiness(
    offsets: np.ndarray,
    px: np.ndarray,
    py: np.ndarray,
    pz: np.ndarray,
    e: np.ndarray,
    radius: float,
    n_max: int = 3,
) -> np.ndarray:
    """``tau_1 .. tau_n_max`` of every jet.

    Parameters
    ----------
    offsets
        ``(n_jets + 1,)`` int64 offsets of the constituents of each jet.
    px, py, pz, e
        ``(n_constituents,)`` constituent four-momenta, grouped by jet as ``offsets`` says.
    radius
        Jet radius ``R`` in the normalisation ``d0 = sum pT_i * R``.
    n_max
        Largest ``N`` computed.

    Returns
    -------
    numpy.ndarray
        ``(n_jets, n_max)`` float64; column ``N - 1`` holds ``tau_N``. A jet with at most ``N``
        constituents, or with no transverse momentum, gets ``tau_N = 0``.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    n_jets = len(offsets) - 1
    out = np.zeros((n_jets, n_max), dtype=np.float64)
    if n_jets == 0 or offsets[-1] == 0:
        return out
    counts = np.diff(offsets)
    jet_of = np.repeat(np.arange(n_jets), counts)
    pt = np.hypot(px, py)
    rap = _rapidity(e, pz)
    phi = np.arctan2(py, px)
    d0 = np.bincount(jet_of, weights=pt, minlength=n_jets) * radius

    cs = fastjet.ClusterSequence(
        momenta_as_events(offsets, px, py, pz, e),
        fastjet.JetDefinition(fastjet.kt_algorithm, _KT_AXES_R),
    )
    for n in range(1, n_max + 1):
        with warnings.catch_warnings():
            # The wrapper warns about exclusive jets unless it recognises kt; this *is* kt.
            warnings.simplefilter("ignore")
            axes = cs.exclusive_jets_up_to(n)
        ax_off = np.asarray(axes.layout.offsets.data, dtype=np.int64)
        ax = axes.layout.content
        ax_e = ax.content("E").data
        ax_rap = _rapidity(ax_e, ax.content("pz").data)
        ax_phi = np.arctan2(ax.content("py").data, ax.content("px").data)
        # Scatter the (up to n) axes of each jet into a dense (n_jets, n) grid; missing axes
        # (jets with fewer than n constituents) get an unreachable rapidity.
        grid_rap = np.full((n_jets, n), 1e9)
        grid_phi = np.zeros((n_jets, n))
        ax_jet = np.repeat(np.arange(n_jets), np.diff(ax_off))
        slot = np.arange(len(ax_e)) - ax_off[ax_jet]
        grid_rap[ax_jet, slot] = ax_rap
        grid_phi[ax_jet, slot] = ax_phi
        dphi = (phi[:, None] - grid_phi[jet_of] + np.pi) % (2 * np.pi) - np.pi
        dr = np.sqrt((rap[:, None] - grid_rap[jet_of]) ** 2 + dphi**2).min(axis=1)
        num = np.bincount(jet_of, weights=pt * dr, minlength=n_jets)
        out[:, n - 1] = np.divide(num, d0, out=np.zeros(n_jets), where=d0 > 0)
    return out
