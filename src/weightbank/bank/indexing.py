"""The catalog index's verbs on :class:`~weightbank.Bank`: ``compact``, ``repair_index``, ``upgrade``.

Saves compact the index on their own (every
:data:`~weightbank.bank.index.compact.COMPACT_EVERY` entries); these are for
operators: fold everything now, rebuild a damaged index from the manifests,
upgrade a bank written before the index existed.

Example:
    >>> import torch, weightbank as wb
    >>> bank = wb.open("memory://")
    >>> _ = bank.save({"w": torch.ones(2)})
    >>> bank.compact().folded, bank.repair_index().folded, bank.upgrade()
    (1, 1, False)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import maintenance
from .index.compact import CompactResult

if TYPE_CHECKING:
    from ..storage.base import Storage
    from .catalog import Catalog

__all__ = ["CompactResult", "Indexing"]


class Indexing:
    """``compact`` / ``repair_index`` / ``upgrade`` for :class:`~weightbank.Bank`."""

    if TYPE_CHECKING:
        storage: Storage
        _catalog: Catalog

    def compact(self) -> CompactResult:
        """Fold every pending catalog log entry into a new index snapshot now.

        Any process may compact at any time; of two racing, one publishes and
        the other returns ``gen == 0``. Upgrades a format-1 bank first.

        Example:
            >>> import torch, weightbank as wb
            >>> bank = wb.open("memory://"); _ = bank.save({"w": torch.ones(1)}, run="r")
            >>> result = bank.compact(); (result.gen, result.folded, bank.compact().gen)
            (1, 1, 0)
        """
        return self._catalog.compact()

    def repair_index(self) -> CompactResult:
        """Rebuild the catalog index from a listing of every manifest (what ``verify`` compares it with).

        The fix for an ``index`` problem ``verify`` reports: a damaged
        snapshot, page or log entry, or a record that disagrees with its
        manifest. Checkpoints, tags and data are untouched. CorruptObject if
        a manifest itself is unreadable (``verify`` names it). Upgrades a
        format-1 bank.

        Example:
            >>> import torch, weightbank as wb
            >>> bank = wb.open("memory://"); _ = bank.save({"w": torch.ones(1)})
            >>> bank.repair_index().folded
            1
        """
        self._catalog.writable()
        # A manifest a killed repack put back after its delete finished is not listed as alive.
        maintenance.finish_undone_deletes(self.storage)
        return self._catalog.rebuild()

    def upgrade(self) -> bool:
        """Give a bank written before the catalog index (format 1) its index; False if it has one already.

        Reads every manifest once, builds the index, then marks the bank
        format 2 — after which older weightbank releases refuse to open it,
        so stop them first. Nothing already in the bank is rewritten; the
        first save into a format-1 bank does the same on its own.

        Example:
            >>> import weightbank as wb
            >>> wb.open("memory://").upgrade()
            False
        """
        return self._catalog.upgrade()
