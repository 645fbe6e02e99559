"""The command line of ``scripts/new_analysis.py``: arguments, prompts on a terminal, report."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tools.new_analysis import examples
from tools.new_analysis.create import AnalysisReport, AnalysisSpec, create_analysis
from tools.new_analysis.errors import ForkError
from tools.new_analysis.names import (
    check_distribution,
    check_package,
    check_title,
    distribution_from_title,
    parse_author,
)

DESCRIPTION = """\
Create a new analysis project from this template, in a new folder: the template's tracked
files with the import package 'project' renamed everywhere (imports, configs' _target_,
pyproject.toml, README, CI), a new distribution name, an empty exported/, no run outputs,
none of the template's own tooling (tools/, this command, the benchmarks), and a fresh git
repository with one commit. Nothing is written unless every step succeeds. Missing arguments
are asked for on a terminal; without one they are an error."""

EPILOG = """\
The toy data and the mlp model are always kept: the fast tests use them, and make demo trains
mlp. Removing an example removes its config (configs/data/NAME.yaml, configs/model/NAME.yaml
and the experiments built on that model); the Python classes stay, except that removing jets
also removes the Pythia generator, its test and the pythia extra (pythia8mc, fastjet). Without
jets, make demo trains on the first kept real data that needs no file argument (hzz, root),
else on toy, and scores the run's validation sample.

example:
  python scripts/new_analysis.py --name "ttH classifier" --package tthml \\
      --author "A. Physicist <a.physicist@example.org>" --dest ../tthml \\
      --keep-models mlp,deepsets --keep-data root"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser (also used for ``--help``)."""
    parser = argparse.ArgumentParser(
        prog="python scripts/new_analysis.py",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--name", help='analysis name, free text, e.g. "ttH classifier"')
    parser.add_argument(
        "--package", help="import package name replacing 'project', e.g. tthml (a new identifier)"
    )
    parser.add_argument("--author", help='"Name <email>": pyproject.toml and the first commit')
    parser.add_argument("--dest", type=Path, help="new folder to create (absent or empty)")
    parser.add_argument(
        "--dist-name",
        help="distribution name for pip (default: from --name, e.g. tth-classifier)",
    )
    parser.add_argument(
        "--keep-data",
        metavar="LIST",
        help="comma-separated data examples to keep (default: all; toy always is)",
    )
    parser.add_argument(
        "--keep-models",
        metavar="LIST",
        help="comma-separated model examples to keep (default: all; mlp always is)",
    )
    parser.add_argument(
        "--include-untracked",
        action="store_true",
        help="also copy files git does not track but does not ignore (default: tracked only)",
    )
    return parser


def _split(value: str | None) -> list[str] | None:
    if value is None or value.strip().lower() in ("", "all"):
        return None
    return [v.strip() for v in value.split(",") if v.strip()]


def _ask(prompt: str, check: Callable[[str], Any], default: str | None = None) -> str:
    """Ask on the terminal until ``check`` accepts the answer."""
    while True:
        suffix = f" [{default}]" if default else ""
        answer = input(f"{prompt}{suffix}: ").strip() or (default or "")
        try:
            check(answer)
            return answer
        except ForkError as err:
            print(f"  {err}", file=sys.stderr)


def _git_identity(root: Path) -> str | None:
    def get(key: str) -> str:
        result = subprocess.run(
            ["git", "config", key], cwd=root, capture_output=True, text=True, check=False
        )
        return result.stdout.strip()

    try:
        name, email = get("user.name"), get("user.email")
    except OSError:
        return None
    return f"{name} <{email}>" if name and email else None


def _complete(args: argparse.Namespace, root: Path, interactive: bool) -> None:
    """Fill in missing arguments by asking, or fail naming them."""
    required = ("name", "package", "author", "dest")
    missing = [a for a in required if getattr(args, a) is None]
    if missing and not interactive:
        raise ForkError(
            "missing " + ", ".join(f"--{a}" for a in missing) + " (no terminal to ask on); "
            "see --help"
        )
    if args.name is None:
        args.name = _ask("Analysis name (free text)", check_title)
    if args.package is None:
        guess = distribution_from_title(args.name).replace("-", "_")
        args.package = _ask("Import package name", check_package, guess)
    if args.author is None:
        args.author = _ask('Author "Name <email>"', parse_author, _git_identity(root))
    if args.dest is None:
        args.dest = Path(_ask("New folder", lambda _: None, str(root.parent / args.package)))
    if interactive and missing:
        names = examples.available(_listing(root))
        for flag, group in (("keep_data", "data"), ("keep_models", "model")):
            if getattr(args, flag) is None:
                setattr(
                    args,
                    flag,
                    input(
                        f"{group.capitalize()} examples to keep ({', '.join(names[group])}) [all]: "
                    ),
                )


def _listing(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in (root / "configs").glob("*/*.yaml")]


def format_report(report: AnalysisReport, title: str) -> str:
    """The summary printed after a successful run."""
    n = report.names
    plan = report.examples
    pkg = n.new_package
    lines = [
        f'Created the analysis "{title}" in {report.dest}',
        f"  package       {pkg} (was {n.old_package}): src/{pkg}/",
        f"  distribution  {n.new_distribution} (was {n.old_distribution})",
        f"  files         {len(report.files)} written; {report.renamed.total} references "
        f"renamed in {report.renamed.files} files",
        "  examples      " + "; ".join(f"{g}: {', '.join(plan.kept[g])}" for g in examples.GROUPS),
    ]
    if plan.removed_files:
        lines.append(f"  removed       {', '.join(plan.removed_files)}")
    if plan.removed_extras:
        lines.append(f"  extras        without {', '.join(plan.removed_extras)} (pyproject.toml)")
    if plan.default_moved:
        lines.append(
            f"  default data  {plan.default_data} (the template's default was removed); "
            "make demo trains on it"
        )
    lines += [
        f"  git           one commit {report.commit[:10]} (branch main)",
        "",
        "Next:",
        f"  cd {report.dest}",
        "  make test      # creates .venv, installs the project, runs the fast tests",
        "  make demo",
        "Edit first:",
        "  configs/data/        your ROOT branches mapped to the input contract (docs/add-a-data-source.md)",
        f"  src/{pkg}/models/    your network (docs/add-a-model.md)",
        "  configs/experiment/  data + model + settings for one study (docs/add-an-experiment.md)",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None, template_root: Path | None = None) -> int:
    """Run the command; return the exit status (0 created, 1 refused or failed, 2 usage)."""
    root = (template_root or Path(__file__).resolve().parents[2]).resolve()
    args = build_parser().parse_args(argv)
    try:
        _complete(args, root, interactive=sys.stdin is not None and sys.stdin.isatty())
        title = check_title(args.name)
        author = parse_author(args.author)
        distribution = check_distribution(args.dist_name or distribution_from_title(title))
        spec = AnalysisSpec(
            title=title,
            package=args.package,
            distribution=distribution,
            author=author,
            dest=args.dest,
            keep={"data": _split(args.keep_data), "model": _split(args.keep_models)},
            include_untracked=args.include_untracked,
        )
        report = create_analysis(spec, root)
    except (ForkError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        print("Nothing was written.", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, EOFError):
        print("\ninterrupted; nothing was written.", file=sys.stderr)
        return 1
    for warning in report.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(format_report(report, title))
    return 0
