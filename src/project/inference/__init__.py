"""Standalone inference runtime: numpy, torch and onnxruntime only (no Lightning, Hydra, uproot).

>>> from project.inference import load
>>> model = load("exported/mlp")                     # fastest backend that passed parity
>>> probs = model({"jet_pt": pt, ..., "part_offsets": offsets, "part_pt": part_pt, ...})
>>> probs["prob_top"]                                 # (n_rows,) float32

The export is checked before use (manifest hash and schema, artifact and golden sha256, no file
outside the directory, parity). Inputs are SoA columns (a mapping, an Arrow table or batch, an
awkward record array) matched by name, without a copy where they have the contract's dtype;
offsets may be a view of a larger collection (``OFFSETS_RULE``). One thread per call by
default; threads may share a model. ``load(dir, device="cuda")`` runs the CUDA artifacts on
device columns (``InferenceModel``). It imports nothing of the project but ``project.contract``.
``python -m project.inference`` is ``project.predict.cli``.
"""

from project.inference.backends import FORMATS
from project.inference.errors import (
    ArtifactError,
    InputError,
    IntegrityError,
    MissingManifestError,
    ParityFailedError,
)
from project.inference.export_dir import PREFERENCE
from project.inference.model import DEFAULT_MAX_BATCH, InferenceModel, check_golden, load
from project.inference.threads import ThreadPolicy, ThreadPolicyError

__all__ = [
    "DEFAULT_MAX_BATCH",
    "FORMATS",
    "PREFERENCE",
    "ArtifactError",
    "InferenceModel",
    "InputError",
    "IntegrityError",
    "MissingManifestError",
    "ParityFailedError",
    "ThreadPolicy",
    "ThreadPolicyError",
    "check_golden",
    "load",
]
