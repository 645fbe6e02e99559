"""The git side of a new analysis: what the template tracks, and the first commit."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

from tools.new_analysis.errors import ForkError
from tools.new_analysis.names import Author


def git(args: list[str], cwd: Path, env: dict[str, str] | None = None) -> str:
    """Run ``git args`` in ``cwd``; its output, or ``ForkError`` with git's message."""
    try:
        result = subprocess.run(
            ["git", *args], cwd=cwd, env=env, capture_output=True, text=True, check=False
        )
    except FileNotFoundError as err:
        raise ForkError("git is not installed; install it (apt-get install git) and retry") from err
    if result.returncode != 0:
        raise ForkError(f"git {' '.join(args[:3])} failed in {cwd}: {result.stderr.strip()}")
    return result.stdout


def template_files(root: Path, include_untracked: bool) -> tuple[list[str], list[str]]:
    """The template's files to copy (tracked, plus untracked-but-not-ignored if asked) and
    the untracked files left out. Raises ``ForkError`` if ``root`` is not a git checkout."""
    try:
        top = git(["rev-parse", "--show-toplevel"], root).strip()
    except ForkError as err:
        raise ForkError(
            f"{root} is not a git checkout, so its tracked files are unknown: create new "
            f"analyses from a clone of the template (git clone ...). ({err})"
        ) from err
    if Path(top).resolve() != root.resolve():
        raise ForkError(f"{root} is inside the git checkout {top}, not its root")
    tracked = git(["ls-files", "-z", "--cached"], root).split("\0")
    untracked = git(["ls-files", "-z", "--others", "--exclude-standard"], root).split("\0")
    tracked, untracked = [f for f in tracked if f], [f for f in untracked if f]
    files = sorted(set(tracked) | (set(untracked) if include_untracked else set()))
    return files, ([] if include_untracked else sorted(untracked))


def template_origin(root: Path) -> str:
    """The template commit a new analysis starts from, for its first commit message."""
    try:
        origin = git(["rev-parse", "--short", "HEAD"], root).strip()
        dirty = bool(git(["status", "--porcelain", "--untracked-files=no"], root).strip())
    except ForkError:
        return "a checkout without commits"
    return origin + (" with uncommitted changes" if dirty else "")


def commit_all(repo: Path, author: Author, message: str) -> str:
    """``git init`` in ``repo`` and one commit of everything, as ``author``, on branch
    ``main``, with no hooks run; return the commit hash."""
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": author.name,
        "GIT_AUTHOR_EMAIL": author.email,
        "GIT_COMMITTER_NAME": author.name,
        "GIT_COMMITTER_EMAIL": author.email,
    }
    identity = ["-c", f"user.name={author.name}", "-c", f"user.email={author.email}"]
    git(["-c", "init.defaultBranch=main", "init", "-q"], repo, env)
    git([*identity, "add", "-A"], repo, env)
    git(
        [*identity, "-c", "commit.gpgsign=false", "commit", "-q", "--no-verify", "-m", message],
        repo,
        env,
    )
    return git(["rev-parse", "HEAD"], repo, env).strip()
