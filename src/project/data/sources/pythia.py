"""Boosted top-quark jets against QCD jets, generated with Pythia 8 and clustered with FastJet.

``PythiaJetSource`` generates ``pp -> t tbar`` with both W bosons decaying to quarks (signal,
label 1) and ``HardQCD:all`` dijets (background, label 0) at 13 TeV, clusters the visible final
state with anti-kt, keeps jets in a pT window and computes per-jet features (kinematics,
N-subjettiness) and per-constituent features. The result is one ``ColumnarData`` table cached
as Parquet under ``cache_dir``, keyed by a hash of the settings that affect it.

Generation is split into fixed chunks of ``chunk_size`` jets of one class. A chunk's Pythia seed
derives from ``(seed, class, chunk index)`` only, so the output is byte-identical whatever the
number of worker processes. Events come from ``Pythia.nextBatch`` as Awkward arrays and are
clustered with FastJet's multi-event interface, so no Python code runs per particle or per jet.

Pythia and FastJet are the optional extra ``pythia`` (``pip install -e ".[pythia]"``); they
are imported only when jets are generated, so a cached table reads without them.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import multiprocessing
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock
from tqdm.auto import tqdm

from project.data.columnar import ColumnarData, Jagged, gather_objects
from project.data.sources import Chunk
from project.data.sources.parquet import ParquetSource
from project.data.writing import LABEL_COLUMN, arrow_table, write_parquet
from project.utils import atomic_write_text

FLAT_COLUMNS = (
    "jet_pt", "jet_eta", "jet_phi", "jet_mass", "jet_n_constituents",
    "jet_tau1", "jet_tau2", "jet_tau3", "jet_tau21", "jet_tau32",
)  # fmt: skip
PART_FIELDS = ("pt", "eta", "phi", "energy", "deta", "dphi", "ptrel", "erel", "dr")
CLASSES = ("qcd", "top")

# Bump whenever generation or feature code changes what a given set of settings produces:
# it is part of the cache key, so stale caches are never read.
_FORMAT_VERSION = 1
_PYTHIA_SEED_MAX = 900_000_000
_PARTICLE_ETA_MAX = 2.5  # tracker-like acceptance for the clustering inputs
_NEUTRINOS = (12, 14, 16)
_QCD_LEADING = 2  # QCD jets are taken from the two leading jets of the event
_SHUFFLE_STREAM = 0x5F3759DF  # SeedSequence key of the row shuffle, apart from chunk keys
# Give up on a chunk that saw this many events without a single accepted jet (bad window).
_MAX_EVENTS_WITHOUT_JETS = 20_000


@dataclass(frozen=True)
class _ChunkTask:
    """One unit of work: ``n_jets`` jets of class ``label`` from Pythia seed ``pythia_seed``."""

    label: int
    index: int
    n_jets: int
    pythia_seed: int
    pt_min: float
    pt_max: float
    radius: float
    eta_max: float


def _chunk_seed(seed: int, label: int, index: int) -> int:
    state = np.random.SeedSequence([seed, label, index]).generate_state(1, dtype=np.uint32)[0]
    # 0 would mean "seed from the clock" to Pythia.
    return 1 + int(state) % _PYTHIA_SEED_MAX


def _pythia_config(task: _ChunkTask) -> list[str]:
    # Generate the hard scale somewhat below the window: jets lose pT to out-of-cone radiation,
    # so a cut at pt_min would bias the window's lower edge. Halving guards tiny pt_min.
    pthat_min = max(task.pt_min - 100.0, 0.5 * task.pt_min)
    lines = [
        "Beams:eCM = 13000",
        f"PhaseSpace:pTHatMin = {pthat_min:.6g}",
        "Print:quiet = on",
        "Random:setSeed = on",
        f"Random:seed = {task.pythia_seed}",
        # MPI off: it roughly halves the event multiplicity and makes generation ~2.5x faster
        # (measured ~40 -> ~100 jets per CPU-second), which brings the default 20k jets from
        # ~4-5 to under 2 minutes on 2 idle cores. The underlying event adds only a soft,
        # diffuse contribution at this jet pT; ISR, FSR and hadronisation stay on.
        "PartonLevel:MPI = off",
    ]
    if task.label == 1:
        lines += [
            "Top:gg2ttbar = on",
            "Top:qqbar2ttbar = on",
            "24:onMode = off",
            "24:onIfAny = 1 2 3 4 5",
        ]
    else:
        # Events far above the window almost never give a jet inside it: capping the hard
        # scale saves their generation time without changing the window's spectrum.
        lines += ["HardQCD:all = on", f"PhaseSpace:pTHatMax = {task.pt_max + 150.0:.6g}"]
    return lines


def _wrap(phi: np.ndarray) -> np.ndarray:
    return (phi + np.pi) % (2 * np.pi) - np.pi


def _eta(px: np.ndarray, py: np.ndarray, pz: np.ndarray) -> np.ndarray:
    return np.arcsinh(pz / np.maximum(np.hypot(px, py), 1e-12))


def _slots(group: np.ndarray) -> np.ndarray:
    """Position of each element within its run of equal ``group`` values (``group`` sorted)."""
    first = np.searchsorted(group, group, side="left")
    return np.arange(len(group)) - first


def _contained_in_top(
    parts: dict[str, np.ndarray],
    event: np.ndarray,
    start: np.ndarray,
    n_events: int,
    jet_event: np.ndarray,
    jet_eta: np.ndarray,
    jet_phi: np.ndarray,
    radius: float,
) -> np.ndarray:
    """Which jets contain a hadronic top: ``dR(jet, top) < R`` and its b and W quarks too."""
    aid = np.abs(parts["id"])
    base = start[event]  # Pythia indices are per event; this makes them global
    m1 = parts["mother1"] + base
    d1 = parts["daughter1"] + base
    eta = _eta(parts["px"], parts["py"], parts["pz"])
    phi = np.arctan2(parts["py"], parts["px"])

    # The top's last copy is the one that decays (its daughter is no longer a top).
    tops = np.flatnonzero((aid == 6) & (parts["daughter1"] > 0) & (aid[d1] != 6))
    if len(tops) == 0:
        return np.zeros(len(jet_event), dtype=bool)
    quark = (aid >= 1) & (aid <= 5)
    # Quarks straight from the top decay (the b), or from a W whose first copy comes from a top.
    parent = np.where(quark & (aid[m1] == 6), m1, -1)
    w = np.where(quark & (aid[m1] == 24), m1, -1)
    for _ in range(100):  # climb W recoil copies to the first W
        up = w >= 0
        up[up] = aid[m1[w[up]]] == 24
        if not up.any():
            break
        w[up] = m1[w[up]]
    has_w = w >= 0
    w_top = np.full_like(w, -1)
    w_top[has_w] = np.where(aid[m1[w[has_w]]] == 6, m1[w[has_w]], -1)
    parent = np.where(parent >= 0, parent, w_top)

    # Dense (event, top slot) and (event, top slot, quark slot) grids; NaN where absent.
    t_slot = _slots(event[tops])
    keep = t_slot < 2
    tops, t_slot = tops[keep], t_slot[keep]
    top_eta = np.full((n_events, 2), np.nan)
    top_phi = np.full((n_events, 2), np.nan)
    top_eta[event[tops], t_slot] = eta[tops]
    top_phi[event[tops], t_slot] = phi[tops]
    quarks = np.flatnonzero(parent >= 0)
    row = np.searchsorted(tops, parent[quarks])
    ok = (row < len(tops)) & (tops[np.minimum(row, len(tops) - 1)] == parent[quarks])
    quarks, row = quarks[ok], row[ok]
    order = np.argsort(row, kind="stable")
    quarks, row = quarks[order], row[order]
    q_slot = _slots(row)
    keep = q_slot < 3
    quarks, row, q_slot = quarks[keep], row[keep], q_slot[keep]
    q_eta = np.full((n_events, 2, 3), np.nan)
    q_phi = np.full((n_events, 2, 3), np.nan)
    q_eta[event[tops[row]], t_slot[row], q_slot] = eta[quarks]
    q_phi[event[tops[row]], t_slot[row], q_slot] = phi[quarks]

    def dr(e: np.ndarray, p: np.ndarray, je: np.ndarray, jp: np.ndarray) -> np.ndarray:
        return np.hypot(e - je, _wrap(p - jp))

    je, jp = jet_eta[:, None], jet_phi[:, None]
    near_top = dr(top_eta[jet_event], top_phi[jet_event], je, jp) < radius
    q_in = dr(q_eta[jet_event], q_phi[jet_event], je[..., None], jp[..., None]) < radius
    # NaN compares False, so a top missing any of its three quarks never matches.
    return np.any(near_top & q_in.all(axis=2), axis=1)


def _jets_from_batch(batch: Any, task: _ChunkTask) -> dict[str, np.ndarray]:
    """Accepted jets of one ``nextBatch`` result, in event order, as flat arrays."""
    import awkward as ak
    import fastjet

    from project.data.sources.nsubjettiness import momenta_as_events, nsubjettiness

    prt = batch["prt"]
    n_events = len(prt)
    per_event = np.asarray(ak.num(prt), dtype=np.int64)
    flat = ak.flatten(prt)
    parts = {
        k: ak.to_numpy(flat[k]).astype(np.int64) for k in ("id", "status", "mother1", "daughter1")
    }
    parts.update({k: ak.to_numpy(flat["p"][k]) for k in ("px", "py", "pz")})
    parts["e"] = ak.to_numpy(flat["p"]["e"])
    start = np.zeros(n_events, dtype=np.int64)
    np.cumsum(per_event[:-1], out=start[1:])
    event = np.repeat(np.arange(n_events), per_event)

    pt = np.hypot(parts["px"], parts["py"])
    visible = (
        (parts["status"] > 0)
        & ~np.isin(np.abs(parts["id"]), _NEUTRINOS)
        & (pt > 0)
        & (np.abs(_eta(parts["px"], parts["py"], parts["pz"])) < _PARTICLE_ETA_MAX)
    )
    vis = np.flatnonzero(visible)
    vis_off = np.zeros(n_events + 1, dtype=np.int64)
    np.cumsum(np.bincount(event[vis], minlength=n_events), out=vis_off[1:])
    vpx, vpy, vpz, ve = (parts[k][vis] for k in ("px", "py", "pz", "e"))

    cs = fastjet.ClusterSequence(
        momenta_as_events(vis_off, vpx, vpy, vpz, ve),
        fastjet.JetDefinition(fastjet.antikt_algorithm, task.radius),
    )
    jets = cs.inclusive_jets(task.pt_min).layout
    jet_event = np.repeat(np.arange(n_events), np.diff(jets.offsets.data))
    jpx, jpy, jpz, je = (jets.content.content(k).data for k in ("px", "py", "pz", "E"))
    jpt = np.hypot(jpx, jpy)
    jeta = _eta(jpx, jpy, jpz)
    jphi = np.arctan2(jpy, jpx)
    cidx = cs.constituent_index(task.pt_min).layout.content  # jets -> indices into the event

    accept = (jpt >= task.pt_min) & (jpt <= task.pt_max) & (np.abs(jeta) < task.eta_max)
    # Leading-first within each event: the chunk keeps the first n_jets in this order.
    order = np.lexsort((-jpt, jet_event))
    if task.label == 0:
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = _slots(jet_event[order])
        accept &= rank < _QCD_LEADING
    else:
        accept &= _contained_in_top(
            parts, event, start, n_events, jet_event, jeta, jphi, task.radius
        )
    sel = order[accept[order]]

    c_off, obj = gather_objects(np.asarray(cidx.offsets.data, dtype=np.int64), sel)
    counts = np.diff(c_off)
    c_jet = np.repeat(np.arange(len(sel)), counts)
    c_idx = np.asarray(cidx.content.data, dtype=np.int64)[obj] + vis_off[jet_event[sel]][c_jet]
    cpx, cpy, cpz, ce = vpx[c_idx], vpy[c_idx], vpz[c_idx], ve[c_idx]
    cpt = np.hypot(cpx, cpy)
    by_pt = np.lexsort((-cpt, c_jet))  # stays grouped by jet, hardest constituent first
    cpx, cpy, cpz, ce, cpt = cpx[by_pt], cpy[by_pt], cpz[by_pt], ce[by_pt], cpt[by_pt]

    s_pt, s_eta, s_phi, s_e = jpt[sel], jeta[sel], _wrap(jphi[sel]), je[sel]
    s_mass = np.sqrt(np.maximum(s_e**2 - jpx[sel] ** 2 - jpy[sel] ** 2 - jpz[sel] ** 2, 0.0))
    taus = nsubjettiness(c_off, cpx, cpy, cpz, ce, task.radius, n_max=3)
    ceta = _eta(cpx, cpy, cpz)
    cphi = _wrap(np.arctan2(cpy, cpx))
    deta = ceta - s_eta[c_jet]
    dphi = _wrap(cphi - s_phi[c_jet])
    zeros = np.zeros(len(sel))
    out = {
        "jet_pt": s_pt, "jet_eta": s_eta, "jet_phi": s_phi, "jet_mass": s_mass,
        "jet_n_constituents": counts.astype(np.float64),
        "jet_tau1": taus[:, 0], "jet_tau2": taus[:, 1], "jet_tau3": taus[:, 2],
        "jet_tau21": np.divide(taus[:, 1], taus[:, 0], out=zeros.copy(), where=taus[:, 0] > 0),
        "jet_tau32": np.divide(taus[:, 2], taus[:, 1], out=zeros.copy(), where=taus[:, 1] > 0),
        "counts": counts,
        "part_pt": cpt, "part_eta": ceta, "part_phi": cphi, "part_energy": ce,
        "part_deta": deta, "part_dphi": dphi, "part_ptrel": cpt / s_pt[c_jet],
        "part_erel": ce / s_e[c_jet], "part_dr": np.hypot(deta, dphi),
    }  # fmt: skip
    return out


def _concat_chunks(pieces: list[dict[str, np.ndarray]], n_jets: int) -> dict[str, np.ndarray]:
    """Concatenate per-batch jets and keep the first ``n_jets`` (and their constituents)."""
    out = {k: np.concatenate([p[k] for p in pieces]) for k in pieces[0]}
    n_parts = int(out["counts"][:n_jets].sum())
    return {k: v[:n_parts] if k.startswith("part_") else v[:n_jets] for k, v in out.items()}


def _generate_chunk(task: _ChunkTask) -> dict[str, np.ndarray]:
    """Generate exactly ``task.n_jets`` jets of one class; runs in a worker process.

    Returns flat per-jet arrays (``FLAT_COLUMNS`` and ``counts``) and per-constituent arrays
    (``part_<field>``), float64 except ``counts``.
    """
    import pythia8mc

    pythia = pythia8mc.Pythia("", False)
    for line in _pythia_config(task):
        if not pythia.readString(line):
            raise RuntimeError(f"Pythia rejected setting {line!r}")
    if not pythia.init():
        raise RuntimeError(f"Pythia failed to initialise for {task}")
    pieces: list[dict[str, np.ndarray]] = []
    have, n_events, requested = 0, 0, 0
    batch = 64
    while have < task.n_jets:
        # errorMode "skip" drops events Pythia failed on, so count what came back.
        events = pythia.nextBatch(batch, "skip")
        requested += batch
        n_events += len(events)
        if len(events):
            jets = _jets_from_batch(events, task)
            pieces.append(jets)
            have += len(jets["jet_pt"])
        if have == 0 and requested >= _MAX_EVENTS_WITHOUT_JETS:
            raise RuntimeError(
                f"no jet accepted in {requested} events of class {CLASSES[task.label]!r}: check "
                f"the window pt in [{task.pt_min}, {task.pt_max}], |eta| < {task.eta_max}"
            )
        # Size the next batch from the efficiency so far (the random stream is the same
        # whatever the batching, so this only trades memory against call overhead).
        need = task.n_jets - have
        batch = int(min(max(1.05 * need * n_events / max(have, 1), 8), 1000))
    return _concat_chunks(pieces, task.n_jets)


def _run_task(item: tuple[int, _ChunkTask]) -> tuple[int, dict[str, np.ndarray]]:
    return item[0], _generate_chunk(item[1])


class PythiaJetSource:
    """Top jets (label 1) against QCD jets (label 0) from Pythia 8, cached as Parquet.

    The source generates its cache when first asked for its files, and reads it as a
    ``ParquetSource`` from then on. Stored columns (float32): ``jet_pt``, ``jet_eta``, ``jet_phi``, ``jet_mass``,
    ``jet_n_constituents``, ``jet_tau1``, ``jet_tau2``, ``jet_tau3`` (N-subjettiness, beta = 1,
    exclusive-kt axes, normalised by ``sum pT_i * R``), ``jet_tau21``, ``jet_tau32`` (0 where
    the denominator is 0); list columns ``part_<field>`` (constituents, hardest first) for
    ``pt``, ``eta``, ``phi``, ``energy``, ``deta``, ``dphi`` (wrapped to [-pi, pi)),
    ``ptrel``, ``erel``, ``dr``; ``label`` int64. Rows shuffled with ``seed``.

    Top jets must contain a hadronically decaying top: ``dR(jet, top) < radius`` and the b and
    both W-decay quarks within ``radius`` of the jet axis. QCD jets are those of the two leading
    jets of an event that fall in the window. Clustering inputs are the visible final-state
    particles with ``|eta| < 2.5``; anti-kt can attach a few very soft particles slightly
    beyond ``radius`` from the axis, so ``part.dr`` is not strictly bounded by it.
    Multi-parton interactions are off to keep generation fast (see ``_pythia_config``).

    Generation costs about 10 ms of CPU per jet (~100 jets per CPU-second, both classes
    together); the default 20k jets take 200 CPU-seconds.

    Parameters
    ----------
    n_jets
        Total number of jets; half per class, the background gets the extra one if odd.
    seed
        Master seed (non-negative): chunk seeds and the row shuffle derive from it.
    pt_min, pt_max
        Jet transverse-momentum window in GeV (inclusive).
    radius
        Anti-kt radius, also the matching and N-subjettiness radius.
    eta_max
        Jets need ``|eta| < eta_max``.
    cache_dir
        Directory of the Parquet cache (created if missing).
    workers
        Worker processes (default ``os.cpu_count()``); 1 generates in this process. Does not
        change the output. Workers are started with "spawn", which re-imports the main module:
        scripts that call ``load()`` need the ``if __name__ == "__main__":`` guard.
    progress
        Show a progress bar of jets generated.
    chunk_size
        Jets per generation chunk (one Pythia seed each). Changes the output.
    """

    def __init__(
        self,
        n_jets: int = 20000,
        seed: int = 42,
        pt_min: float = 550.0,
        pt_max: float = 650.0,
        radius: float = 0.8,
        eta_max: float = 2.0,
        cache_dir: str = "data",
        workers: int | None = None,
        progress: bool = True,
        chunk_size: int = 250,
    ) -> None:
        if int(n_jets) < 2:
            raise ValueError(f"n_jets must be >= 2 (one per class), got {n_jets}")
        if int(seed) < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if not 0 < float(pt_min) < float(pt_max):
            raise ValueError(f"need 0 < pt_min < pt_max, got {pt_min}, {pt_max}")
        if float(radius) <= 0 or float(eta_max) <= 0:
            raise ValueError(f"radius and eta_max must be > 0, got {radius}, {eta_max}")
        if int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        if workers is not None and int(workers) < 1:
            raise ValueError(f"workers must be >= 1 or None, got {workers}")
        self.n_jets = int(n_jets)
        self.seed = int(seed)
        self.pt_min = float(pt_min)
        self.pt_max = float(pt_max)
        self.radius = float(radius)
        self.eta_max = float(eta_max)
        self.cache_dir = Path(cache_dir)
        self.workers = None if workers is None else int(workers)
        self.progress = bool(progress)
        self.chunk_size = int(chunk_size)

    @property
    def settings(self) -> dict[str, Any]:
        """Everything that determines the output (the cache key), library versions included."""
        return {
            "format_version": _FORMAT_VERSION,
            "n_jets": self.n_jets,
            "seed": self.seed,
            "pt_min": self.pt_min,
            "pt_max": self.pt_max,
            "radius": self.radius,
            "eta_max": self.eta_max,
            "chunk_size": self.chunk_size,
            "pythia8mc": importlib.metadata.version("pythia8mc"),
            "fastjet": importlib.metadata.version("fastjet"),
        }

    @property
    def cache_path(self) -> Path:
        """Parquet cache file, ``<cache_dir>/jets-<12 hex of the settings hash>.parquet``."""
        key = hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()
        return self.cache_dir / f"jets-{key[:12]}.parquet"

    kind = "column"

    def files(self) -> list[str]:
        """The cache file, generated first if it does not exist.

        Under torchrun or SLURM every rank starts at once: one generates, the others wait on
        the lock and then read the cache it wrote.
        """
        path = self.cache_path
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            with FileLock(str(path.with_name(f".{path.name}.lock"))):
                if not path.exists():
                    self._write_cache(self._generate(), path)
        return [str(path)]

    def where(self, file: str) -> str:
        """The cache path."""
        return file

    def schema(self, file: str) -> tuple[list[str], set[str]]:
        """The cache's columns (see ``ParquetSource.schema``)."""
        return self._cache.schema(file)

    def chunks(self, file: str, columns: Sequence[str]) -> list[Chunk]:
        """The cache's row groups."""
        return self._cache.chunks(file, columns)

    def read(self, chunk: Chunk, columns: Sequence[str]) -> dict[str, Any]:
        """A row group of the cache."""
        return self._cache.read(chunk, columns)

    @property
    def _cache(self) -> ParquetSource:
        return ParquetSource(str(self.cache_path))

    def _write_cache(self, data: ColumnarData, path: Path) -> None:
        """The table and, beside it, the settings that made it (both atomically)."""
        table = arrow_table({**data.flat, LABEL_COLUMN: data.labels}, data.jagged)
        write_parquet(table, path)
        settings = json.dumps(self.settings, indent=2, sort_keys=True) + "\n"
        atomic_write_text(path.with_suffix(".json"), settings)

    def _tasks(self) -> list[_ChunkTask]:
        per_class = (self.n_jets - self.n_jets // 2, self.n_jets // 2)  # background gets extra
        tasks = []
        for label, n in enumerate(per_class):
            for index, begin in enumerate(range(0, n, self.chunk_size)):
                tasks.append(_ChunkTask(
                    label, index, min(self.chunk_size, n - begin),
                    _chunk_seed(self.seed, label, index),
                    self.pt_min, self.pt_max, self.radius, self.eta_max,
                ))  # fmt: skip
        return tasks

    def _generate(self) -> ColumnarData:
        """Run all chunks (in a process pool when ``workers > 1``) and assemble the table."""
        tasks = self._tasks()
        results: list[dict[str, np.ndarray] | None] = [None] * len(tasks)
        workers = min(self.workers or os.cpu_count() or 1, len(tasks))
        # Slow top chunks first so the pool's tail is not one long chunk.
        schedule = sorted(enumerate(tasks), key=lambda it: (-it[1].label, it[1].index))
        bar = tqdm(total=self.n_jets, unit="jet", desc="pythia jets", disable=not self.progress)
        with bar:
            if workers == 1:
                done = map(_run_task, schedule)
                for i, res in done:
                    results[i] = res
                    bar.update(tasks[i].n_jets)
            else:
                # spawn: forking a parent that holds torch/OpenMP threads can deadlock.
                with multiprocessing.get_context("spawn").Pool(workers) as pool:
                    for i, res in pool.imap_unordered(_run_task, schedule):
                        results[i] = res
                        bar.update(tasks[i].n_jets)
        chunks = [r for r in results if r is not None]
        merged = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
        labels = np.concatenate([np.full(t.n_jets, t.label, dtype=np.int64) for t in tasks])
        data = ColumnarData(
            flat={k: merged[k].astype(np.float32) for k in FLAT_COLUMNS},
            jagged={"part": Jagged.from_counts(
                merged["counts"],
                {f: merged[f"part_{f}"].astype(np.float32) for f in PART_FIELDS},
            )},
            labels=labels,
            source=str(self.cache_path),
        )  # fmt: skip
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, _SHUFFLE_STREAM]))
        return data.take(rng.permutation(len(labels))).validate()

    def __repr__(self) -> str:
        keys = ("n_jets", "seed", "pt_min", "pt_max", "radius", "eta_max", "chunk_size")
        return f"PythiaJetSource({', '.join(f'{k}={getattr(self, k)!r}' for k in keys)})"


__all__ = ["CLASSES", "FLAT_COLUMNS", "PART_FIELDS", "PythiaJetSource"]
