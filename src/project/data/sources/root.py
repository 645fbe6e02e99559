"""Any ROOT TTree, read column-wise through uproot into a ``ColumnarData`` table.

Everything is declared in the data config (see ``RootSource``); only the branches the
declared expressions name are read, in chunks of ``step_size``, and every check that can fail
does so in ``load()`` with one ``ContractError`` that names the file, tree, branch or expression.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import uproot

from project.data.columnar import ColumnarData
from project.data.contract import ContractError
from project.data.sources._expressions import TableSpec, assemble, describe, resolve_files


class RootSource:
    """Rows from a TTree: one per event, or one per object of a jagged collection.

    Parameters
    ----------
    files
        A path, a glob pattern or a list of them; the trees are concatenated in order.
    tree
        Name (or ``dir/name`` path) of the TTree in every file, e.g. ``Events``.
    flat
        Flat columns: ``{name: branch or expression}``; a list means branch names kept as
        they are. Each must give one value per row.
    jagged
        Jagged collections: ``{collection: {field: branch or expression}}``; a list of field
        names ``[pt, eta]`` means branches ``<collection>_pt``, ``<collection>_eta``. All fields
        of one collection must have the same number of objects in every event.
    label
        Expression giving each row's class index (integers >= 0, booleans become 0/1), e.g.
        ``abs(Jet_hadronFlavour) == 5``; ``None`` gives no labels.
    selection
        Boolean expression; rows where it is false are dropped, e.g. ``Jet_pt > 20``.
    per_object
        Collection prefix such as ``Jet`` (for the ``Jet_*`` branches): one row per object of
        that collection instead of one per event. Branches of the collection then become flat
        per-object columns, event-level branches are repeated for each object of their event,
        and ``selection`` and ``label`` are evaluated per object. Jagged collections are still
        built per event and each row carries its event's. Objects are counted from a
        ``<prefix>_*`` jagged branch.
    step_size
        Chunk size for ``uproot``'s iteration (entries as an int, or a size like ``"100 MB"``).

    Notes
    -----
    Expressions are Python over branch names and the functions of
    ``project.data.sources._expressions.FUNCTIONS`` (``abs``, ``sqrt``, ``log``, ``hypot``,
    ``where``, ``num``, ``sum``, ``any`` ...), evaluated on whole arrays; ``and``, ``or``,
    ``not`` act element-wise. A branch whose name is no Python identifier can still be given
    on its own (not inside an expression).
    """

    def __init__(
        self,
        files: str | Sequence[str],
        tree: str,
        flat: Mapping[str, str] | Sequence[str] | None = None,
        jagged: Mapping[str, Mapping[str, str] | Sequence[str]] | None = None,
        label: str | None = None,
        selection: str | None = None,
        per_object: str | None = None,
        step_size: str | int = "100 MB",
    ) -> None:
        self.files = files
        self.tree = str(tree)
        # Parsed here so a malformed declaration fails when Hydra builds the source.
        self.spec = TableSpec(flat, jagged, label, selection, per_object)
        self.step_size = step_size
        self._data: ColumnarData | None = None

    def load(self) -> ColumnarData:
        """Read the declared columns of every file into one validated table (cached)."""
        if self._data is None:
            files = resolve_files(self.files, "ROOT")
            source = f"{describe(files)}:{self.tree}"
            self._data = assemble(
                (part for path in files for part in self._read(path)), self.spec, source
            )
        return self._data

    def _read(self, path: str) -> Iterator[tuple[ColumnarData, int]]:
        where = f"{path}:{self.tree}"
        with open_tree(path, self.tree) as tree:
            branches = list(tree.keys())
            jagged = [name for name in branches if _is_jagged(tree[name])]
            binding = self.spec.bind(branches, set(jagged), where, "branch")
            wanted = set(binding.columns)
            for chunk, report in tree.iterate(
                filter_name=lambda name: name in wanted,
                step_size=self.step_size,
                library="ak",
                report=True,
            ):
                arrays = {name: chunk[name] for name in binding.columns}
                yield binding.build(arrays, start=report.tree_entry_start)


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
            trees = sorted({k.split(";")[0] for k, c in file.classnames().items() if c == "TTree"})
            if len(trees) != 1:
                raise ContractError(
                    f"{path} has {len(trees)} TTrees {trees}; choose one with {choose_with}"
                )
            name = trees[0]
        yield _tree(file, str(path), name)


def _tree(file: Any, path: str, name: str) -> Any:
    """The TTree ``name`` of an open file, or a ``ContractError`` listing what the file holds."""
    try:
        obj = file[name]
    except Exception:
        obj = None
    if not isinstance(obj, uproot.behaviors.TTree.TTree):
        held = {k: v for k, v in file.classnames(cycle=False).items()}
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
