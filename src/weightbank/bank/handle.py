"""A resolved checkpoint: the public door for integrations (DCP, training, serving) into one checkpoint.

A mixin of the bank (as :mod:`.tagging` is): :meth:`Handles.info` gives a
checkpoint's metadata without its per-tensor table, :meth:`Handles.checkpoint`
resolves a ref once and returns a :class:`~weightbank.Checkpoint` to read
from (:mod:`.checkpoint`), and :meth:`Handles.read_options` says how the
bank reads. Integrations use these, never the bank's private parts.

Example:
    >>> import torch, weightbank as wb
    >>> bank = wb.open("memory://"); cid = bank.save({"w": torch.ones(2)}, run="r", step=1, tags=["prod"]).id
    >>> bank.info("prod").step, bank.info("prod", tags=True).tags, bank.checkpoint("prod").id == cid
    (1, ('prod',), True)
"""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from .checkpoint import Checkpoint, ReadOptions
from .results import CheckpointInfo

if TYPE_CHECKING:
    from ..format.manifest import Manifest
    from ..storage.base import Storage
    from ..storage.diskcache import DiskCache
    from .catalog import Catalog
    from .trust import Verify

__all__ = ["Handles"]


class Handles:
    """``info`` / ``checkpoint`` / ``read_options`` for :class:`~weightbank.Bank`."""

    if TYPE_CHECKING:
        storage: Storage
        workers: int
        cache: DiskCache | None
        read_verify: Verify
        _catalog: Catalog

        def resolve(self, ref: str) -> str: ...
        def _manifest(self, ref: str) -> tuple[str, Manifest]: ...
        def _info(
            self, cid: str, m: Manifest, tags_by_target: Mapping[str, list[str]] | None = None
        ) -> CheckpointInfo: ...
        def _tags_by_target(self, *, strict: bool = False) -> dict[str, list[str]]: ...
        def _pool(self) -> ThreadPoolExecutor: ...

    def info(self, ref: str, *, tags: bool = False) -> CheckpointInfo:
        """The metadata of the checkpoint ``ref`` names: no per-tensor table, and no tags unless asked.

        ``tags=True`` also lists the tags pointing at it, which reads every tag;
        :meth:`show` gives the per-tensor table too. CheckpointNotFound if
        ``ref`` names nothing.

        Example:
            >>> import torch, weightbank as wb
            >>> bank = wb.open("memory://"); _ = bank.save({"w": torch.ones(1)}, run="r", step=2, tags=["prod"])
            >>> bank.info("r@2").tags, bank.info("r@2", tags=True).tags, bank.info("prod").n_tensors
            ((), ('prod',), 1)
        """
        cid = self.resolve(ref)
        names = tuple(sorted(self._tags_by_target().get(cid, []))) if tags else ()
        rec = self._catalog.record(cid)  # the catalog index's record: no manifest read
        if rec is not None:
            return rec.info(names)
        cid, m = self._manifest(cid)  # not in the index (committed just now elsewhere, or scanning)
        return self._info(cid, m, {cid: list(names)})

    def checkpoint(self, ref: str) -> Checkpoint:
        """The checkpoint ``ref`` names, resolved once: a handle to read it from (see :class:`~weightbank.Checkpoint`).

        A tag moved later does not move the handle. CheckpointNotFound if
        ``ref`` names nothing.

        Example:
            >>> import torch, weightbank as wb
            >>> bank = wb.open("memory://"); cid = bank.save({"w": torch.ones(2)}, tags=["prod"]).id
            >>> ck = bank.checkpoint("prod"); _ = bank.save({"w": torch.zeros(2)}, tags=["prod"])
            >>> ck.id == cid, ck.load_tensors(["w"])["w"].tolist()
            (True, [1.0, 1.0])
        """
        cid, m = self._manifest(ref)
        return Checkpoint(cid, m, self._info(cid, m, {}), self.read_options)

    def read_options(self) -> ReadOptions:
        """How this bank reads now: its storage, load workers, load threads (started on first use) and disk cache.

        Example:
            >>> import weightbank as wb
            >>> bank = wb.open("memory://", workers=2)
            >>> bank.read_options().workers, bank.read_options().pool is bank.read_options().pool
            (2, True)
        """
        return ReadOptions(
            storage=self.storage,
            workers=self.workers,
            pool=self._pool(),
            cache=self.cache,
            fresh=self._catalog.fresh,
            verify=self.read_verify,
        )
