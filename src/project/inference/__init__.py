"""Standalone inference runtime: numpy, torch and onnxruntime only (no Lightning, Hydra, uproot).

>>> from project.inference import load
>>> model = load("exported/mlp")                     # fastest backend that passed parity
>>> probs = model({"jet_pt": pt, ..., "part_offsets": offsets, "part_pt": part_pt, ...})
>>> probs["prob_top"]                                 # (n_rows,) float32

- Backends: ``load(dir, "torchscript" | "aoti" | "onnx")``; the default takes the first of
  ``PREFERENCE`` (aoti, onnx, torchscript: fastest first, as measured) whose parity check
  passed and that can run here. The artifact's sha256 is verified; failed parity is refused.
- Inputs are Structure of Arrays (a mapping of column name to 1-D array, a pyarrow Table or
  RecordBatch, an awkward record array), matched by the contract's names. Columns already of
  the contract's dtype go to the backend without a copy; allowed conversions go into buffers
  the model reuses. Outputs: ``{output name: (n_rows,) float32}``.
- Threads: the single-threaded deployment policy is applied at load (``model.policy``,
  ``model.threads``). One loaded model may be shared by many threads: each thread gets its own
  buffers, and results do not depend on the number of threads.
- ``python -m project.inference EXPORT_DIR INPUT --out OUTPUT`` scores a Parquet or ROOT file.
  pyarrow and awkward are imported only when such inputs are used; a ROOT file is opened by
  the data layer's ROOT source (uproot), so the runtime itself imports no training-side or
  file-format package.
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
