"""The Makefile and CI of a new analysis: what ``make`` installs, what ``make demo`` runs, and
no command that names what the analysis leaves out.

``make demo`` runs the whole path on the data of ``experiment=mlp``: in the template the
Pythia jets, then held-out jets of another seed scored with the inference CLI. A new analysis
without the jets trains on its default data instead (see ``examples.plan``) and scores the
run's validation sample, the raw SoA rows every training run writes into its run directory.
"""

from __future__ import annotations

import re
import textwrap

from tools.new_analysis.errors import ForkError

# How the Makefile's demo finds what it scores when its held-out steps are gone: the newest
# run's validation sample (``experiment=mlp`` writes its runs under logs/mlp/runs/).
SAMPLE = "$$(ls -t logs/mlp/runs/*/validation_sample.parquet | head -1)"
_INSTALL = re.compile(r"""(pip install\b.*?-e\s+["']?\.\[)([^\]]*)(\])""")
_DEMO_HEADER = re.compile(r"^(#\s+make demo\s+)(.*)$")


def rewrite_makefile(
    text: str,
    package: str,
    left_out: tuple[str, ...] | list[str],
    drop_extras: tuple[str, ...] | list[str],
    held_out: tuple[str, ...] | None,
    demo_data: str | None,
) -> str:
    """The new analysis's Makefile.

    ``left_out`` are the names of what the analysis does not carry (``benchmark.py``, see
    ``leftout.LeftOut.names``): recipe lines naming one go, and so does the clause of the demo's
    comment that speaks of it (``benchmark the standalone inference runtime``).
    ``drop_extras`` leave the install line (``".[dev,pythia]"``). ``held_out`` are the strings
    that mark the demo's held-out steps when the analysis does not keep their data (``None``
    when it does): those steps become one that scores the newest run's validation sample,
    and the comments on ``make demo`` say what it now does on ``demo_data``. Raises
    ``ForkError`` if the Makefile has no ``demo`` rule of the expected shape.
    """
    mention = (
        re.compile(rf"(?<![\w.\-])(?:{'|'.join(re.escape(n) for n in left_out)})")
        if left_out
        else None
    )
    lines = text.splitlines(keepends=True)
    try:
        rule = next(i for i, line in enumerate(lines) if line.startswith("demo:"))
    except StopIteration:
        raise ForkError("the Makefile has no demo rule; is this the template?") from None
    start = rule
    while start > 0 and lines[start - 1].startswith("#"):
        start -= 1
    end = rule + 1
    while end < len(lines) and lines[end].startswith("\t"):
        end += 1
    recipe = [line for line in lines[rule + 1 : end] if not (mention and mention.search(line))]
    dropped = [line for line in lines[rule + 1 : end] if line not in recipe]
    words = {n.split(".")[0] for n in left_out if any(n in line for line in dropped)}
    if held_out is not None:
        steps = [line for line in recipe if not any(h in line for h in held_out)]
        if len(steps) == len(recipe) or not any("scripts/train.py" in s for s in steps):
            raise ForkError(
                "the Makefile's demo rule has no held-out steps or no training step to adapt; "
                "update tools/new_analysis/buildfiles.py to its new shape"
            )
        recipe = [
            *steps,
            f'\t$(BIN)/python -m {package}.inference exported/mlp "{SAMPLE}" '
            "--out data/demo-scores.parquet\n",
        ]
    if held_out is None:
        comment = _without_clauses(lines[start:rule], words)
    else:
        comment = [
            f"# The whole path on the default data (data={demo_data}, configs/train.yaml): train\n",
            "# the MLP, export it with parity, then run the standalone inference CLI on the run's\n",
            "# validation sample (rows of its validation split, as the deployed model takes them).\n",
        ]
    lines[start:end] = [*comment, lines[rule], *recipe]
    out = []
    for line in lines:
        header = _DEMO_HEADER.match(line)
        if header and held_out is not None:
            line = f"{header.group(1)}create .venv, install, train, export, run inference\n"
        line = _INSTALL.sub(
            lambda m: m.group(1) + _without(m.group(2), drop_extras) + m.group(3), line
        )
        out.append(line)
    return "".join(out)


def _without(extras: str, drop: tuple[str, ...] | list[str]) -> str:
    return ",".join(e for e in (x.strip() for x in extras.split(",")) if e and e not in drop)


def _without_clauses(comment: list[str], words: set[str]) -> list[str]:
    """A comment without its comma-separated clauses that mention one of ``words``, rewrapped
    to the Makefile's width; unchanged when none does."""
    text = " ".join(line.lstrip("#").strip() for line in comment)
    clauses = text.split(", ")
    kept = [c for c in clauses if not any(re.search(rf"\b{re.escape(w)}", c) for w in words)]
    if len(kept) == len(clauses):
        return comment
    return [
        f"# {line}\n"
        for line in textwrap.wrap(
            ", ".join(kept), width=93, break_on_hyphens=False, break_long_words=False
        )
    ]


def drop_folder_arguments(text: str, folders: tuple[str, ...] | list[str]) -> str:
    """Command lines that run ruff without the left-out ``folders`` among their paths
    (``ruff check src tests scripts tools`` becomes ``ruff check src tests scripts``)."""
    out = []
    for line in text.splitlines(keepends=True):
        if re.search(r"\bruff\b", line):
            for folder in folders:
                line = re.sub(rf"[ \t]+{re.escape(folder)}/?(?=[ \t\r\n]|$)", "", line)
        out.append(line)
    return "".join(out)
