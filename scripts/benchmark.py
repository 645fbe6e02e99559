"""Benchmarks: ``python scripts/benchmark.py {inference,train} ...`` (``--help`` per subcommand).

One subcommand per stage; each one's logic lives in the package
(``project.deploy.benchmark``, ``project.training.benchmark``).
"""

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    """Parse the subcommand and run it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    from project.deploy import benchmark as inference

    sub = commands.add_parser(
        "inference", help="latency per backend and batch size, raw vs the SoA runtime vs eager"
    )
    inference.add_arguments(sub)
    sub.set_defaults(run=inference.main)

    from project.training import benchmark as training

    sub = commands.add_parser(
        "train", help="rows/s of the template's training path vs a hand-written PyTorch loop"
    )
    training.add_arguments(sub)
    sub.set_defaults(run=training.main)

    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
