"""Which example data and model configs a new analysis keeps, and what removing one changes.

An example is a config: ``configs/data/<name>.yaml`` or ``configs/model/<name>.yaml``
(``configs/data/base.yaml``, which every data config builds on, is none). Removing an example
removes its config and the experiments built on a removed model. The Python classes behind
most examples stay (they are small, and other code and tests use them); an example that
brings its own code and dependencies (the Pythia jets: the generator, its test and the
``pythia`` extra) takes them along. The default data of ``train.yaml``, ``generate.yaml`` and
the experiments moves to a kept source; lists in the code that name every example of a kind
(``MODELS = ("mlp", "deepsets", "transformer")``) lose the removed ones; and the tests get a
hook that reports a test needing a removed config as skipped, naming the config.
"""

from __future__ import annotations

import ast
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from tools.new_analysis.errors import ForkError

GROUPS = ("data", "model")
# Configs of a group that are not examples: the pieces the group's configs are built from.
BUILDING_BLOCKS = {"data": ("base",), "model": ()}
# Examples a new analysis always keeps, and why.
ALWAYS_KEPT = {
    "data": {"toy": "the fast tests use it"},
    "model": {"mlp": "the fast tests and make demo use it"},
}
# What an example brings beside its config, in template paths: files that go with it and the
# optional-dependency extras that only it needs.
EXAMPLE_FILES = {
    ("data", "jets"): (
        "src/project/data/sources/pythia.py",
        "src/project/data/sources/nsubjettiness.py",
        "tests/test_pythia_source.py",
    ),
}
EXAMPLE_EXTRAS = {("data", "jets"): ("pythia",)}
# The steps of the Makefile's demo that only an example's data can run (held-out jets of
# another Pythia seed), by what marks their lines.
DEMO_HELD_OUT = {("data", "jets"): ("scripts/generate.py", "data/heldout")}
# Synthetic data that needs no file: the default data when no kept real source runs as it is.
FALLBACK_DATA = "toy"
_DEFAULTS_ENTRY = re.compile(r"^(\s*-\s*(?:override\s+)?/?(data|model)\s*:\s*)(\w+)(\s*(?:#.*)?)$")


def available(files: list[str]) -> dict[str, list[str]]:
    """Example names per group, from the ``configs/<group>/*.yaml`` files in ``files`` (the
    ``BUILDING_BLOCKS`` are not examples)."""
    found: dict[str, list[str]] = {g: [] for g in GROUPS}
    for rel in files:
        parts = Path(rel).parts
        if (
            len(parts) == 3
            and parts[0] == "configs"
            and parts[1] in GROUPS
            and rel.endswith(".yaml")
            and Path(rel).stem not in BUILDING_BLOCKS[parts[1]]
        ):
            found[parts[1]].append(Path(rel).stem)
    return found


@dataclass
class ExamplePlan:
    """What a new analysis keeps and removes, and where the default data moves."""

    kept: dict[str, list[str]]
    removed: dict[str, list[str]]
    all_names: dict[str, list[str]]
    default_data: str | None = None
    default_moved: bool = False
    removed_files: list[str] = field(default_factory=list)
    removed_extras: list[str] = field(default_factory=list)
    removed_example_files: list[str] = field(default_factory=list)
    demo_held_out: tuple[str, ...] | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def removes_anything(self) -> bool:
        """Whether any example is removed."""
        return any(self.removed.values())


def plan(root: Path, files: list[str], keep: dict[str, list[str] | None]) -> ExamplePlan:
    """Decide what to keep: ``keep[group]`` names the examples to keep (``None``: all).

    Raises ``ForkError`` for a name that is not an example of the template.
    """
    names = available(files)
    kept: dict[str, list[str]] = {}
    notes: list[str] = []
    for group in GROUPS:
        wanted = keep.get(group)
        if wanted is None:
            kept[group] = list(names[group])
            continue
        blocks = [n for n in wanted if n in BUILDING_BLOCKS[group]]
        if blocks:
            raise ForkError(
                f"--keep-{'models' if group == 'model' else 'data'}: {blocks} is what every "
                f"{group} config builds on, not an example, and is always kept; the examples "
                f"are {sorted(names[group])}"
            )
        unknown = [n for n in wanted if n not in names[group]]
        if unknown:
            raise ForkError(
                f"--keep-{'models' if group == 'model' else 'data'}: unknown {group} example(s) "
                f"{unknown}; the template has {sorted(names[group])}"
            )
        for must, why in ALWAYS_KEPT[group].items():
            if must in names[group] and must not in wanted:
                notes.append(f"kept {group} example {must!r} as well: {why}")
                wanted = [*wanted, must]
        kept[group] = [n for n in names[group] if n in wanted]
    removed = {g: [n for n in names[g] if n not in kept[g]] for g in GROUPS}
    result = ExamplePlan(kept, removed, names, notes=notes)
    result.removed_files = [f"configs/{g}/{n}.yaml" for g in GROUPS for n in removed[g]]
    for g in GROUPS:
        for n in removed[g]:
            result.removed_example_files += [f for f in EXAMPLE_FILES.get((g, n), ()) if f in files]
            result.removed_extras += EXAMPLE_EXTRAS.get((g, n), ())
            result.demo_held_out = result.demo_held_out or DEMO_HELD_OUT.get((g, n))
    result.removed_files += result.removed_example_files
    result.default_data = _default_data(root, kept["data"], removed["data"])
    result.default_moved = result.default_data in kept["data"] and any(
        _defaults_entries((root / "configs" / "train.yaml").read_text()).get("data") == n
        for n in removed["data"]
    )
    for rel in files:
        if rel.startswith("configs/experiment/") and rel.endswith(".yaml"):
            uses = _defaults_entries((root / rel).read_text())
            if uses.get("model") in removed["model"]:
                result.removed_files.append(rel)
    removed_experiments = [Path(r).stem for r in result.removed_files if "/experiment/" in r]
    result.removed["experiment"] = removed_experiments
    return result


def _defaults_entries(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        m = _DEFAULTS_ENTRY.match(line)
        if m:
            out[m.group(2)] = m.group(3)
    return out


def _default_data(root: Path, kept: list[str], removed: list[str]) -> str | None:
    """The template's default data if kept, else the first kept real source that needs no
    file argument (no ``???`` in its config), else the synthetic ``FALLBACK_DATA``."""
    current = _defaults_entries((root / "configs" / "train.yaml").read_text()).get("data")
    if current is None or current not in removed:
        return current
    for name in kept:
        text = (root / "configs" / "data" / f"{name}.yaml").read_text()
        if name != FALLBACK_DATA and "???" not in text:
            return name
    return FALLBACK_DATA if FALLBACK_DATA in kept else (kept[0] if kept else None)


def rewrite_config(rel: str, text: str, ex: ExamplePlan) -> str:
    """Point defaults-list entries at a removed data example to the new default data."""
    if not rel.startswith("configs/") or not ex.removed["data"]:
        return text
    out = []
    for line in text.splitlines(keepends=True):
        m = _DEFAULTS_ENTRY.match(line.rstrip("\n"))
        if m and m.group(2) == "data" and m.group(3) in ex.removed["data"]:
            line = f"{m.group(1)}{ex.default_data}{m.group(4)}\n"
        out.append(line)
    return "".join(out)


def prune_literals(text: str, ex: ExamplePlan) -> str:
    """Drop removed names from every list/tuple/set literal of strings that names all the
    examples of a group (``("mlp", "deepsets", "transformer")`` becomes ``("mlp",)``)."""
    removed = {n for g in GROUPS for n in ex.removed[g]}
    if not removed:
        return text
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return text
    everything = [set(ex.all_names[g]) for g in GROUPS if len(ex.all_names[g]) > 1]
    data = text.encode()
    starts = [0]
    for line in data.splitlines(keepends=True):
        starts.append(starts[-1] + len(line))
    edits = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.List, ast.Tuple, ast.Set)) or not node.elts:
            continue
        values = [e.value if isinstance(e, ast.Constant) else None for e in node.elts]
        if not all(isinstance(v, str) for v in values):
            continue
        if not any(names <= set(values) for names in everything):
            continue
        start = starts[node.lineno - 1] + node.col_offset
        end = starts[node.end_lineno - 1] + node.end_col_offset
        kept = [
            data[starts[e.lineno - 1] + e.col_offset : starts[e.end_lineno - 1] + e.end_col_offset]
            for e, v in zip(node.elts, values, strict=True)
            if v not in removed
        ]
        source = data[start:end]
        opening, closing = {ast.List: (b"[", b"]"), ast.Set: (b"{", b"}")}.get(
            type(node), (b"(", b")") if source.startswith(b"(") else (b"", b"")
        )
        body = b", ".join(kept) + (b"," if isinstance(node, ast.Tuple) and len(kept) == 1 else b"")
        edits.append((start, end, opening + body + closing))
    for start, end, new in sorted(edits, reverse=True):
        data = data[:start] + new + data[end:]
    return data.decode()


def conftest_hook(ex: ExamplePlan) -> str:
    """Text appended to the new analysis's ``tests/conftest.py`` when examples are removed."""
    entries = "".join(
        f"    {json.dumps(g)}: {json.dumps(names)},\n" for g, names in ex.removed.items() if names
    )
    removed = "{\n" + entries + "}"
    return f'''

# --- Examples removed when this analysis was created ------------------------------------------
# A test that composes one of these configs is reported as skipped, naming the config, rather
# than failed. Delete such tests, or point them at this analysis's own configs.
REMOVED_EXAMPLES = {removed}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    """Report a test that needs a removed example config as skipped."""
    outcome = yield
    report = outcome.get_result()
    missing = _removed_config(call.excinfo.value) if report.failed and call.excinfo else None
    if missing:
        report.outcome = "skipped"
        reason = f"Skipped: needs configs/{{missing}}.yaml, removed from this analysis"
        report.longrepr = (str(item.path), item.location[1] or 0, reason)


def _removed_config(err: BaseException | None) -> str | None:
    """``group/name`` of the removed config that ``err`` (or its cause) could not find."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        for group, names in REMOVED_EXAMPLES.items():
            for name in names:
                if f"Could not find '{{group}}/{{name}}'" in str(err):
                    return f"{{group}}/{{name}}"
        err = err.__cause__ or err.__context__
    return None
'''
