"""ROOT TTrees read column-wise through uproot, in entry ranges.

Only the branches that the contract's expressions name are read, in chunks of ``step_size``;
every check that can fail does so with one ``ContractError`` that names the file, tree,
branch or expression.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import uproot

from project.contract import ContractError
from project.data.expressions import resolve_files
from project.data.sources import Chunk, entry_ranges


class RootSource:
    """Events of a TTree in one or more ROOT files.

    Parameters
    ----------
    files
        A path, a glob pattern or a list of them; the trees are concatenated in order.
    tree
        Name (or ``dir/name`` path) of the TTree in every file, e.g. ``Events``.
    step_size
        Chunk size: entries as an int, or a memory size such as ``"100 MB"`` of the branches
        read (uproot's ``num_entries_for``).

    Notes
    -----
    The contract says what is built from the branches: expressions are Python over branch
    names and the functions of ``project.data.expressions.FUNCTIONS`` (``abs``, ``sqrt``,
    ``log``, ``hypot``, ``where``, ``num``, ``sum``, ``any`` ...), evaluated on whole arrays;
    ``and``, ``or``, ``not`` act element-wise. A branch whose name is no Python identifier can
    still be given on its own (not inside an expression). With ``per_object: Jet``, branches of
    that collection become per-object columns and event-level branches are repeated for each
    object of their event.
    """

    kind = "branch"

    def __init__(
        self, files: str | Sequence[str], tree: str, step_size: str | int = "100 MB"
    ) -> None:
        self.paths = files
        self.tree = str(tree)
        if isinstance(step_size, int) and step_size < 1:
            raise ContractError(
                f"step_size must be >= 1 entries or a size like '100 MB', got {step_size}"
            )
        self.step_size = step_size

    def files(self) -> list[str]:
        """The ROOT files, globs expanded."""
        return resolve_files(self.paths, "ROOT")

    def where(self, file: str) -> str:
        """``path:tree``."""
        return f"{file}:{self.tree}"

    def schema(self, file: str) -> tuple[list[str], set[str]]:
        """The tree's branch names, and the jagged ones."""
        with open_tree(file, self.tree) as tree:
            names = list(tree.keys())
            return names, {n for n in names if _is_jagged(tree[n])}

    def chunks(self, file: str, columns: Sequence[str]) -> list[Chunk]:
        """Entry ranges of ``step_size`` (entries, or the memory size of ``columns``)."""
        with open_tree(file, self.tree) as tree:
            n = tree.num_entries
            step = self.step_size
            if not isinstance(step, int):
                wanted = set(columns)
                step = tree.num_entries_for(step, filter_name=lambda name: name in wanted)
        return entry_ranges(n, step, file, self.where(file))

    def read(self, chunk: Chunk, columns: Sequence[str]) -> dict[str, Any]:
        """The branches ``columns`` of the chunk's entries, as awkward arrays."""
        with open_tree(chunk.file, self.tree) as tree:
            arrays = tree.arrays(
                list(columns), entry_start=chunk.start, entry_stop=chunk.stop, library="ak"
            )
        return {name: arrays[name] for name in columns}

    def __repr__(self) -> str:
        return f"RootSource({self.paths!r}, tree={self.tree!r})"


@contextlib.contextmanager
def open_tree(
    path: str | Path, name: str | None = None, choose_with: str = "the `tree` setting"
) -> Iterator[Any]:
    """The TTree ``name`` of the ROOT file at ``path`` (default: the file's only TTree), open
    while the block runs. A ``ContractError`` says so when the file cannot be read, and lists
    the file's trees when there is no such tree, or when there are several and none was named
    (``choose_with`` says how to name one, in the caller's words)."""
    try:
        file = uproot.open(path)
    except Exception as err:
        raise ContractError(f"{path} is not a readable ROOT file: {err}") from err
    with file:
        if name is None:
            classes = file.classnames()
            trees = sorted({k.split(";")[0] for k, c in classes.items() if c == "TTree"})
            ntuples = sorted({k.split(";")[0] for k, c in classes.items() if "RNTuple" in c})
            if not trees and ntuples:
                raise ContractError(
                    f"{path} holds RNTuples {ntuples} and no TTree; RNTuple is not supported yet: "
                    "write the ntuple as a TTree (or as Parquet, and use data=parquet)"
                )
            if len(trees) != 1:
                raise ContractError(
                    f"{path} has {len(trees)} TTrees {trees}; choose one with {choose_with}"
                )
            name = trees[0]
        yield _tree(file, str(path), name)


def _tree(file: Any, path: str, name: str) -> Any:
    """The TTree ``name`` of an open file, or a ``ContractError`` listing what the file holds."""
    held = dict(file.classnames(cycle=False))
    if "RNTuple" in str(held.get(name, "")):
        raise ContractError(
            f"{path}: {name!r} is an RNTuple, which this source does not read yet; write the "
            "ntuple as a TTree (or as Parquet, and use data=parquet)"
        )
    try:
        obj = file[name]
    except Exception:
        obj = None
    if not isinstance(obj, uproot.behaviors.TTree.TTree):
        trees = sorted(k for k, v in held.items() if v.startswith(("TTree", "TNtuple")))
        raise ContractError(
            f"{path}: no TTree named {name!r}; the file holds trees {trees} "
            f"(all keys: {sorted(held)})"
        )
    return obj


def _is_jagged(branch: Any) -> bool:
    """Whether a branch holds a variable-length list per entry (``x[]`` or ``std::vector``)."""
    if isinstance(branch.interpretation, uproot.interpretation.jagged.AsJagged):
        return True
    return "vector<" in branch.typename
