"""Benchmarks: ``python scripts/benchmark.py {inference,train} ...`` (``--help`` per subcommand).

One subcommand per stage; each one's logic lives in the template's own tooling
(``tools/benchmarks/inference.py``, ``tools/benchmarks/training.py``), not in the package.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the template's own tools/


def main(argv: list[str] | None = None) -> int:
    """Parse the subcommand and run it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    from tools.benchmarks import inference

    sub = commands.add_parser(
        "inference", help="latency per backend and batch size, raw vs the SoA runtime vs eager"
    )
    inference.add_arguments(sub)
    sub.set_defaults(run=inference.main)

    from tools.benchmarks import training

    sub = commands.add_parser(
        "train", help="rows/s of the template's training path vs a hand-written PyTorch loop"
    )
    training.add_arguments(sub)
    sub.set_defaults(run=training.main)

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
