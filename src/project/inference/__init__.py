"""Standalone inference runtime: numpy, torch and onnxruntime only (no Lightning, Hydra, uproot).

>>> from project.inference import load
>>> model = load("exported/mlp")                     # fastest backend that passed parity
>>> probs = model({"jet_pt": pt, ..., "part_offsets": offsets, "part_pt": part_pt, ...})
>>> probs["prob_top"]                                 # (n_rows,) float32

- ``load(dir, "torchscript" | "aoti" | "onnx")``; the default takes the first of
  ``PREFERENCE`` whose parity check passed and that can run here. The manifest is checked
  against its hash and the schema; the artifact's and golden file's sha256 are verified;
  files outside the export directory and failed parity are refused.
- Inputs are Structure of Arrays (a mapping of column name to 1-D array, a pyarrow Table or
  RecordBatch, an awkward record array), matched by the contract's names. Contiguous columns
  of the contract's dtype go to the backend without a copy; allowed conversions go into
  buffers the model reuses. Offsets may be a view of a larger collection
  (``project.contract.OFFSETS_RULE``). Outputs: ``{output name: (n_rows,) float32}``.
- Threads: the single-threaded deployment policy is applied at load. One loaded model may be
  shared by many threads; results do not depend on their number.
- The runtime imports nothing of the project but ``project.contract``; pyarrow and awkward
  only when such inputs arrive. ``python -m project.inference`` is ``project.predict.cli``.
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
