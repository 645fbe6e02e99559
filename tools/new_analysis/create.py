"""Create a new analysis: copy the template's tracked files, rename, verify, commit, publish.

Everything is built in a hidden folder beside the destination and moved into place with one
``rename`` only after the leftover scan passed and the first commit exists, so a failure at
any step (bad input, a reference the rules could not rename, git refusing) leaves nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tools.new_analysis import buildfiles, examples, metadata
from tools.new_analysis.errors import ForkError
from tools.new_analysis.imports import resort_imports
from tools.new_analysis.leftout import (
    TEMPLATE_ONLY,
    TEMPLATE_ONLY_REQUIREMENTS,
    LeftOut,
    find_dangling,
)
from tools.new_analysis.names import (
    TEMPLATE_DISTRIBUTION,
    Author,
    check_distribution,
    check_package,
    check_title,
)
from tools.new_analysis.rename import Names, RenameCount, Renamer, find_leftovers
from tools.new_analysis.repo import commit_all, git, template_files, template_origin

# Run outputs and environments: never part of a new analysis, even if force-added to git.
_NEVER_COPIED = (".venv/", "logs/", "data/", "outputs/", "multirun/", "build/", ".git/")


@dataclass(frozen=True)
class AnalysisSpec:
    """What to create.

    ``keep`` maps ``"data"`` and ``"model"`` to the example names to keep (``None``: all).
    ``include_untracked`` also copies files git does not track but does not ignore.
    """

    title: str
    package: str
    distribution: str
    author: Author
    dest: Path
    keep: dict[str, list[str] | None] = field(default_factory=dict)
    include_untracked: bool = False


@dataclass
class AnalysisReport:
    """What ``create_analysis`` did."""

    dest: Path
    names: Names
    files: list[str]
    renamed: RenameCount
    examples: examples.ExamplePlan
    commit: str
    warnings: list[str]


def _copyable(rel: str, root: Path, excluded: tuple[str, ...]) -> bool:
    path = root / rel
    # A folder entry ("logs/") also excludes a link of that name (a .venv linked elsewhere).
    if rel.startswith(excluded) or rel in excluded or f"{rel}/" in excluded:
        return False
    if rel.startswith("exported/") and rel != "exported/README.md":
        return False
    return path.is_symlink() or path.is_file()


def _check_dest(dest: Path, root: Path) -> Path:
    dest = dest.expanduser().resolve()
    if dest == root or root in dest.parents:
        raise ForkError(
            f"destination {dest} is inside the template's checkout {root}; choose a folder "
            f"outside it, for example {root.parent / dest.name}"
        )
    if dest.exists() and not dest.is_dir():
        raise ForkError(f"destination {dest} exists and is not a folder; choose another")
    if dest.is_dir() and any(dest.iterdir()):
        raise ForkError(
            f"destination {dest} exists and is not empty; choose a new folder or empty it"
        )
    if not dest.parent.is_dir():
        raise ForkError(f"the folder {dest.parent} does not exist; create it first")
    return dest


def _modules(files: list[str], package: str) -> tuple[str, ...]:
    prefix = f"src/{package}/"
    found = set()
    for rel in files:
        if rel.startswith(prefix):
            first = rel[len(prefix) :].split("/")[0]
            if "/" in rel[len(prefix) :] or first.endswith(".py"):
                found.add(first.removesuffix(".py"))
    return tuple(sorted(found - {"__init__", "__main__"}))


def create_analysis(spec: AnalysisSpec, template_root: Path) -> AnalysisReport:
    """Create the analysis ``spec`` describes from the template at ``template_root``.

    Raises ``ForkError`` (and writes nothing) on bad input or if any step fails.
    """
    root = template_root.resolve()
    title = check_title(spec.title)
    warnings = check_package(spec.package)
    distribution = check_distribution(spec.distribution)
    dest = _check_dest(Path(spec.dest), root)
    old_package = "project"
    if not (root / "src" / old_package).is_dir():
        raise ForkError(f"{root} has no src/{old_package}/: is it the template?")

    files, left_out = template_files(root, spec.include_untracked)
    if left_out:
        shown = ", ".join(left_out[:5]) + (" ..." if len(left_out) > 5 else "")
        warnings.append(
            f"{len(left_out)} untracked file(s) not copied ({shown}); commit them or pass "
            "--include-untracked"
        )
    changed = git(["status", "--porcelain", "--untracked-files=no"], root).splitlines()
    if changed:
        warnings.append(
            f"{len(changed)} tracked file(s) have uncommitted changes; they were copied as they "
            "are in the working tree"
        )
    plan = examples.plan(root, files, spec.keep)
    warnings += plan.notes
    excluded = (*TEMPLATE_ONLY, *_NEVER_COPIED, *plan.removed_files)
    files = [f for f in files if _copyable(f, root, excluded)]
    names = Names(
        old_package, spec.package, TEMPLATE_DISTRIBUTION, distribution, _modules(files, old_package)
    )
    left = LeftOut.of(
        [_target_path(p, names) for p in (*TEMPLATE_ONLY, *plan.removed_example_files)],
        names.new_package,
    )

    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.partial-", dir=dest.parent))
    except OSError as err:
        raise ForkError(f"cannot write in {dest.parent}: {err}") from err
    try:
        umask = os.umask(0)
        os.umask(umask)
        staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
        count = RenameCount()
        written = _write_files(root, staging, files, names, plan, left, count, title, spec.author)
        leftovers = find_leftovers(staging, written, names)
        if leftovers:
            listing = "\n  ".join(leftovers[:20])
            raise ForkError(
                f"{len(leftovers)} reference(s) to the template's package or distribution "
                f"would remain, so nothing was written:\n  {listing}\nRename them in the "
                "template (or extend tools/new_analysis/rename.py) and retry."
            )
        dangling, mentions = find_dangling(staging, written, left)
        if dangling:
            listing = "\n  ".join(dangling[:20])
            raise ForkError(
                f"{len(dangling)} place(s) need what a new analysis does not carry "
                f"({', '.join(left.names())}), so nothing was written:\n  {listing}\nMove "
                "them out of the files an analysis keeps in the template (see "
                "tools/new_analysis/leftout.py) and retry."
            )
        if mentions:
            shown = "; ".join(mentions[:5]) + (" ..." if len(mentions) > 5 else "")
            warnings.append(
                f"{len(mentions)} comment(s) or docs line(s) name what this analysis does not "
                f"carry: {shown}"
            )
        kept = "; ".join(f"{g}: {', '.join(plan.kept[g])}" for g in examples.GROUPS)
        message = (
            f"Start {title}\n\n"
            f"Created from {names.old_distribution} ({template_origin(root)}) by "
            f"scripts/new_analysis.py:\npackage {names.new_package} (was {names.old_package}), "
            f"distribution {names.new_distribution}.\nExamples kept: {kept}.\n"
        )
        commit = commit_all(staging, spec.author, message)
        try:
            os.rename(staging, dest)  # atomic; replaces dest only if it is an empty folder
        except OSError as err:
            raise ForkError(f"cannot move the new analysis into {dest}: {err}") from err
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return AnalysisReport(dest, names, written, count, plan, commit, warnings)


def _target_path(rel: str, names: Names) -> str:
    old = f"src/{names.old_package}/"
    return f"src/{names.new_package}/{rel[len(old) :]}" if rel.startswith(old) else rel


def _write_files(
    root: Path,
    staging: Path,
    files: list[str],
    names: Names,
    plan: examples.ExamplePlan,
    left: LeftOut,
    count: RenameCount,
    title: str,
    author: Author,
) -> list[str]:
    """Copy ``files`` from ``root`` into ``staging``, renamed and adapted; return their new
    relative paths."""
    renamer = Renamer(names)
    folders = [p.rstrip("/") for p in left.paths if p.endswith("/")]
    written = []
    for rel in files:
        source, new_rel = root / rel, _target_path(rel, names)
        target = staging / new_rel
        target.parent.mkdir(parents=True, exist_ok=True)
        written.append(new_rel)
        if source.is_symlink():
            os.symlink(os.readlink(source), target)
            continue
        data = source.read_bytes()
        text = None if b"\0" in data else _decode(data)
        if text is None:
            target.write_bytes(data)
        else:
            text = renamer.rewrite(new_rel, text, count)
            text = examples.rewrite_config(new_rel, text, plan)
            if new_rel.endswith(".py"):
                text = examples.prune_literals(text, plan)
                text = resort_imports(text, names.old_package, names.new_package)
            if new_rel == "tests/conftest.py" and plan.removes_anything:
                text = text.rstrip("\n") + "\n" + examples.conftest_hook(plan)
            if new_rel == "pyproject.toml":
                text = metadata.rewrite_pyproject(
                    text,
                    names.new_distribution,
                    title,
                    author,
                    drop_extras=plan.removed_extras,
                    drop_requirements=TEMPLATE_ONLY_REQUIREMENTS,
                    drop_folders=folders,
                )
            if new_rel == "README.md":
                text = metadata.rewrite_readme(text, title, left.names())
            if new_rel == "Makefile":
                text = buildfiles.rewrite_makefile(
                    text,
                    names.new_package,
                    left.names(),
                    plan.removed_extras,
                    plan.demo_held_out,
                    plan.default_data,
                )
            if new_rel == "Makefile" or new_rel.startswith((".github/", ".ci/")):
                text = buildfiles.drop_folder_arguments(text, folders)
            target.write_text(text)
        shutil.copymode(source, target)
    (staging / "exported").mkdir(exist_ok=True)
    return written


def _decode(data: bytes) -> str | None:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None
