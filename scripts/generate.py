"""Generate (or read from the cache) the data of a data config: ``python scripts/generate.py``.

Examples::

    python scripts/generate.py                                       # the default Pythia jets
    python scripts/generate.py data.source.seed=7 data.source.n_jets=2000 output=data/heldout.parquet
    python scripts/generate.py data=toy data.source.n_jets=12000000 +data.source.block_rows=100000 \
        shards.dir=data/toy-big shards.size="200 MB"                # Parquet shards, any size

Logic: ``project.data.generate``.
"""

import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))


@hydra.main(version_base="1.3", config_path="../configs", config_name="generate")
def main(cfg: DictConfig) -> None:
    """Compose the config and materialise the source."""
    from project.data.generate import generate

    generate(cfg)


if __name__ == "__main__":
    main()
