"""Data sources. Each turns some storage into one ``ColumnarData`` (SoA) table.

A source is any object with ``load() -> ColumnarData``, built from the data config by Hydra
(``_target_``). Sources never build Python objects per event: they read or produce columns.
"""

from __future__ import annotations

from typing import Protocol

from project.data.columnar import ColumnarData


class Source(Protocol):
    """What the DataModule needs from a source."""

    def load(self) -> ColumnarData:
        """Read (or generate) the whole table, labels included."""
        ...
