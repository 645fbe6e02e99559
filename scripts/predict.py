"""Score files with an export: ``python scripts/predict.py export=DIR 'files=[...]' out=DIR``.

Writes one output per input (a ROOT friend tree or Parquet) into ``out``, atomically; outputs
already made by the same export are skipped, so an interrupted job resumes. ``cluster=local``
(or ``slurm``, ``htcondor``) spreads the files' chunks over Dask workers. Exits non-zero when
any file failed, after the summary table lists them. Logic: ``project.predict.job``.
"""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))


@hydra.main(version_base="1.3", config_path="../configs", config_name="predict")
def main(cfg: DictConfig) -> None:
    """Compose the predict config and run the job."""
    from project.contract import ContractError
    from project.inference import ArtifactError
    from project.predict.job import OutputError, PredictError, run_predict

    try:
        report = run_predict(cfg)
    except (PredictError, OutputError, ArtifactError, ContractError) as err:
        print(f"predict refused: {err}", file=sys.stderr)
        sys.exit(2)
    if report.failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
