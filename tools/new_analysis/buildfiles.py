"""The Makefile and CI of a new analysis: what ``make`` installs, what ``make demo`` runs, and
no command that names what the analysis leaves out.

``make demo`` runs the whole path on the data of ``experiment=mlp``: in the template the
Pythia jets, then held-out jets of another seed scored with the inference CLI. A new analysis
without the jets trains on its default data instead (see ``examples.plan``) and scores the
run's validation sample, the raw SoA rows every training run writes into its run directory.
"""

from __future__ import annotations

import re

from tools.new_analysis.errors import ForkError

# How the Makefile's demo finds what it scores when its held-out steps are gone: the newest
# run's validation sample (``experiment=mlp`` writes its runs under logs/mlp/runs/).
SAMPLE = "$$(ls -t logs/mlp/runs/*/validation_sample.parquet | head -1)"
_INSTALL = re.compile(r"""(pip install\b.*?-e\s+["']?\.\[)([^\]]*)(\])""")
_DEMO_HEADER = re.compile(r"^(#\s+make demo\s+)(.*)$")


def rewrite_makefile(
    text: str,
    package: str,
    left_out: re.Pattern[str] | None,
    drop_extras: tuple[str, ...] | list[str],
    held_out: tuple[str, ...] | None,
    demo_data: str | None,
) -> str:
    """The new analysis's Makefile.

    ``left_out`` matches a mention of what the analysis does not carry: recipe lines naming
    it go (the benchmark). ``drop_extras`` leave the install line (``".[dev,pythia]"``).
    ``held_out`` are the strings that mark the demo's held-out steps when the analysis does
    not keep their data (``None`` when it does): those steps become one that scores the
    newest run's validation sample, and the comments on ``make demo`` say what it now does on
    ``demo_data``. Raises ``ForkError`` if the Makefile has no ``demo`` rule of the expected
    shape.
    """
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
    recipe = [line for line in lines[rule + 1 : end] if not (left_out and left_out.search(line))]
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
    comment = _demo_comment(held_out is None, demo_data)
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


def _demo_comment(jets: bool, data: str | None) -> list[str]:
    if jets:
        return [
            "# The whole path on the default data: generate and train, export with parity, then run the\n",
            "# standalone inference CLI on held-out jets (another Pythia seed).\n",
        ]
    return [
        f"# The whole path on the default data (data={data}, configs/train.yaml): train the MLP,\n",
        "# export it with parity, then run the standalone inference CLI on the run's validation\n",
        "# sample (rows of its validation split, as the deployed model takes them).\n",
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
