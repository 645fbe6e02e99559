"""Train a model: ``python scripts/train.py [group=option ...] [key=value ...]``.

Examples::

    python scripts/train.py                                   # MLP on Pythia jets, auto device
    python scripts/train.py model=transformer trainer=gpu
    python scripts/train.py model=mlp trainer.devices=4       # DDP on 4 GPUs
    python scripts/train.py trainer=cpu trainer.devices=2 trainer.strategy=ddp
    python scripts/train.py ckpt_path=last                    # resume this task's newest run

All logic lives in ``project.training.run``; this file only composes the config. A wrong
config value, data file or checkpoint is reported in one message (``HYDRA_FULL_ERROR=1``
shows the traceback).
"""

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parents[1]))

from project.training.run import USER_ERRORS, describe_error, register_resolvers, train

register_resolvers()  # hydra.run.dir of configs/train.yaml follows a resumed run


@hydra.main(version_base="1.3", config_path="../configs", config_name="train")
def main(cfg: DictConfig) -> float | None:
    """Compose the config, train, and return the metric a sweeper optimises."""
    try:
        metrics = train(cfg)
    except USER_ERRORS as err:
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"training failed: {describe_error(err)}", file=sys.stderr)
        sys.exit(1)
    return metrics.get(cfg.get("optimized_metric"))


if __name__ == "__main__":
    main()
