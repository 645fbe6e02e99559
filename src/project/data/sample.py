"""The run's validation sample: a few thousand raw SoA rows that make a run exportable anywhere.

At fit time the training run writes rows of its validation split, as the deployed graph takes
them (raw values under the contract's input names, with labels, targets and weights), to
``validation_sample.parquet`` in its run directory, and their sha256 to
``validation_sample.json``. The export takes its parity and golden rows from there, so a run
trained on a cluster exports on a laptop that has the run directory and not the training data.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from project.contract import InputContract
from project.data.columnar import ColumnarData
from project.data.expressions import TableSpec
from project.data.sources import load
from project.data.sources.parquet import ParquetSource
from project.data.writing import WEIGHT_COLUMN, soa_table, write_parquet
from project.utils import atomic_write_text, sha256_file

SAMPLE_FILE = "validation_sample.parquet"
DEFAULT_SAMPLE_ROWS = 2000


def _record(path: Path) -> Path:
    return path.with_suffix(".json")


def write_sample(
    data: ColumnarData,
    contract: InputContract,
    path: str | Path,
    max_rows: int = DEFAULT_SAMPLE_ROWS,
) -> Path:
    """Write the first ``max_rows`` rows of ``data`` (the validation split, in stored order) and
    their hash record; returns the Parquet path."""
    path = Path(path)
    sample = data.take(np.arange(min(int(max_rows), len(data))))
    write_parquet(soa_table(sample, contract), path)
    record = {
        "file": path.name,
        "sha256": sha256_file(path),
        "rows": len(sample),
        "input_names": contract.input_names,
        "weighted": sample.weights is not None,
    }
    atomic_write_text(_record(path), json.dumps(record, indent=2) + "\n")
    return path


def read_sample(path: str | Path, contract: InputContract) -> ColumnarData:
    """The sample at ``path``, its hash checked against its record.

    Raises ``FileNotFoundError`` if the sample or its record is missing, ``ValueError`` if the
    file changed since it was written or holds another contract's inputs.
    """
    path = Path(path)
    record_path = _record(path)
    if not path.is_file() or not record_path.is_file():
        raise FileNotFoundError(
            f"no validation sample {path} (and {record_path.name}): the run was trained before "
            "runs wrote one, or the files were removed; retrain, or export where the run's "
            "training data is"
        )
    record = json.loads(record_path.read_text())
    digest = sha256_file(path)
    if digest != record.get("sha256"):
        raise ValueError(
            f"{path} has sha256 {digest}, but {record_path.name} records {record.get('sha256')}: "
            "the sample changed after training"
        )
    if record.get("input_names") != contract.input_names:
        raise ValueError(
            f"{path} holds inputs {record.get('input_names')}, but the checkpoint's contract "
            f"has {contract.input_names}: the checkpoint belongs to another run"
        )
    spec = TableSpec(
        contract.reading_input_names(),
        weight=WEIGHT_COLUMN if record.get("weighted") else None,
    )
    return load(ParquetSource(str(path)), spec)
