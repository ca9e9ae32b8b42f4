"""``Checkpoint``: one checkpoint of a bank, resolved once, with the reads integrations need.

:meth:`Bank.checkpoint <weightbank.Bank.checkpoint>` resolves a ref and
returns this handle: the id, the parsed manifest and the checkpoint's info
(without tags), plus reads that work from them without resolving the ref
again — whole tensors (:meth:`Checkpoint.read`, :meth:`Checkpoint.load_tensors`),
subtrees of the state (:meth:`Checkpoint.tree_value`) and regions of stored
boxes (:meth:`Checkpoint.iter_regions`, what a resharding DCP load asks for).
Every read is verified against the chunk hashes like any load, and uses the
bank's storage, load threads and disk cache as they are at the time of the
read (:class:`ReadOptions`, from :meth:`Bank.read_options <weightbank.Bank.read_options>`).

A checkpoint's content is immutable, so a handle never goes stale: when a
``repack`` has moved its chunks and ``gc`` has freed the old packs, ``read``,
``read_regions`` and ``iter_regions`` read the manifest's new locations and
go on. A handle
kept after the checkpoint was deleted reads its data until ``gc`` removes it
(then a read raises MissingObject), as an open file outlives its name.

Example:
    >>> import torch, weightbank as wb
    >>> bank = wb.open("memory://"); _ = bank.save({"w": torch.ones(2), "step": 3}, run="r", step=3, tags=["prod"])
    >>> ck = bank.checkpoint("prod")
    >>> ck.info.step, ck.tensor_names, ck.load_tensors(["w"])["w"].tolist()
    (3, ('w',), [1.0, 1.0])
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from ..errors import IncompatibleState, MissingObject
from ..format.manifest import COMPACT_FORMAT, Manifest
from ..format.tree import tensor_indices, unflatten
from ..storage.base import Storage
from ..storage.diskcache import DiskCache
from .layout import PACKS
from .reader import check_device
from .results import CheckpointInfo
from .shards import Region, iter_regions, read_assembled, read_regions
from .trust import Verify, check_verify

__all__ = ["Checkpoint", "ReadOptions", "relocated"]

_T = TypeVar("_T")


def relocated(
    cid: str, m: Manifest, error: MissingObject, fresh: Callable[[str], Manifest | None] | None
) -> Manifest | None:
    """The manifest of ``cid`` as stored now, if ``error`` (a read through ``m``) is a pack a repack
    moved the chunks out of and gc freed; None when that is not what happened (re-raise ``error``)."""
    if fresh is None or m.format < COMPACT_FORMAT or not error.key.startswith(PACKS):
        return None
    moved = fresh(cid)
    return None if moved is None or moved.packs == m.packs else moved


@dataclass(frozen=True)
class ReadOptions:
    """How a bank reads: its storage, its number of load workers, its load threads and its disk cache.

    Example:
        >>> import weightbank as wb
        >>> opts = wb.open("memory://", workers=3).read_options()
        >>> opts.workers, opts.cache is None, sorted(opts.kwargs())
        (3, True, ['cache', 'pool', 'verify', 'workers'])
    """

    storage: Storage
    workers: int
    pool: ThreadPoolExecutor
    """The bank's load threads (kept across reads: a small read pays no thread start-up)."""
    cache: DiskCache | None
    """The local disk cache reads go through first (None: they read storage)."""
    fresh: Callable[[str], Manifest | None] | None = None
    """The manifest of an id as storage holds it now (None if gone): how a read follows a repack."""
    verify: Verify = "always"
    """How reads check chunks (:mod:`weightbank.bank.trust`): the bank's ``read_verify``."""

    def kwargs(self) -> dict[str, Any]:
        """The keyword arguments (``workers``, ``pool``, ``cache``, ``verify``) of the readers in :mod:`weightbank.bank.reader`.

        Example:
            >>> import weightbank as wb
            >>> wb.open("memory://", workers=2).read_options().kwargs()["workers"]
            2
        """
        return {"workers": self.workers, "pool": self.pool, "cache": self.cache, "verify": self.verify}


@dataclass(frozen=True, repr=False)
class Checkpoint:
    """One checkpoint of a bank, resolved once: make it with :meth:`Bank.checkpoint <weightbank.Bank.checkpoint>`.

    Two handles are equal when they name the same checkpoint (the same id).
    ``options`` gives the bank's :class:`ReadOptions` at the time of each read.
    """

    id: str
    manifest: Manifest = field(compare=False)
    """The parsed, verified manifest: the state tree, the tensor and chunk tables."""
    info: CheckpointInfo = field(compare=False)
    """Its metadata, as :meth:`Bank.info <weightbank.Bank.info>` gives it (no tags)."""
    options: Callable[[], ReadOptions] = field(compare=False)

    def __repr__(self) -> str:
        return f"Checkpoint({self.id[:12]!r}, run={self.info.run!r}, step={self.info.step!r})"

    @property
    def tensor_names(self) -> tuple[str, ...]:
        """The name of every tensor, in the manifest's order (a tensor's index is its position here).

        Example:
            >>> import torch, weightbank as wb
            >>> bank = wb.open("memory://"); cid = bank.save({"a": torch.ones(1), "b": [torch.zeros(1)]}).id
            >>> bank.checkpoint(cid).tensor_names
            ('a', 'b.0')
        """
        return tuple(t.name for t in self.manifest.tensors)

    def read(
        self,
        indices: Sequence[int],
        *,
        device: str | torch.device | None = None,
        into: Mapping[int, torch.Tensor] | None = None,
        verify: Verify | None = None,
    ) -> dict[int, torch.Tensor]:
        """The tensors at ``indices`` (positions in :attr:`tensor_names`), read and verified.

        Sharded tensors come back whole; tensors that alias each other come
        back as one tensor. ``device`` places them (``"cuda:0"``). With
        ``into`` (index → an existing tensor of the right dtype and shape)
        the bytes are verified before they are copied into place, and the
        result maps to those same tensors. ``verify`` overrides the bank's
        read verification (``"always"``, ``"once"``, ``"never"``).

        Example:
            >>> import torch, weightbank as wb
            >>> bank = wb.open("memory://"); cid = bank.save({"a": torch.ones(2), "b": torch.zeros(1)}).id
            >>> out = torch.empty(2); bank.checkpoint(cid).read([0], into={0: out})[0] is out, out.tolist()
            (True, [1.0, 1.0])
        """
        dev = check_device(device)
        opts = self.options()
        kw = opts.kwargs()
        if verify is not None:
            kw["verify"] = check_verify(verify)
        target = None if into is None else dict(into)
        return self._moved_ok(
            opts,
            lambda m: read_assembled(opts.storage, self.id, m, indices, device=dev, into=target, **kw),
        )

    def _moved_ok(self, opts: ReadOptions, read: Callable[[Manifest], _T]) -> _T:
        """``read(manifest)``, once more with the manifest's new locations if a repack moved its chunks."""
        try:
            return read(self.manifest)
        except MissingObject as e:
            moved = relocated(self.id, self.manifest, e, opts.fresh)
            if moved is None:
                raise
            return read(moved)

    def load_tensors(
        self,
        names: Sequence[str],
        *,
        device: str | torch.device | None = None,
        verify: Verify | None = None,
    ) -> dict[str, torch.Tensor]:
        """Exactly the named tensors (no glob matching): :meth:`Bank.load_tensors <weightbank.Bank.load_tensors>` on this handle.

        Unknown names raise IncompatibleState listing them.

        Example:
            >>> import torch, weightbank as wb
            >>> bank = wb.open("memory://"); cid = bank.save({"a": torch.ones(1), "b": torch.zeros(1)}).id
            >>> list(bank.checkpoint(cid).load_tensors(["b"]))
            ['b']
        """
        index = {t.name: i for i, t in enumerate(self.manifest.tensors)}
        unknown = [n for n in names if n not in index]
        if unknown:
            raise IncompatibleState(
                f"checkpoint {self.id[:12]} has no tensor(s) {', '.join(map(repr, unknown[:8]))}", unknown
            )
        loaded = self.read([index[n] for n in names], device=device, verify=verify)
        return {n: loaded[index[n]] for n in names}

    def tree_value(self, node: dict[str, Any]) -> Any:
        """The value of a subtree of the manifest's state tree, with the tensors it holds read (and verified).

        ``node`` is a node of ``manifest.tree`` (the whole tree gives what ``Bank.load`` gives).

        Example:
            >>> import torch, weightbank as wb
            >>> bank = wb.open("memory://"); ck = bank.checkpoint(bank.save({"w": torch.ones(1), "n": 3}).id)
            >>> ck.tree_value(ck.manifest.tree)["n"], ck.tree_value(ck.manifest.tree)["w"].tolist()
            (3, [1.0])
        """
        wanted = tensor_indices(node)
        tensors: list[torch.Tensor | None] = [None] * len(self.manifest.tensors)
        if wanted:
            for i, t in self.read(wanted).items():
                tensors[i] = t
        return unflatten(node, tensors)

    def iter_regions(self, regions: Sequence[Region]) -> Iterator[tuple[int, torch.Tensor]]:
        """``(position in regions, tensor)`` for each region of a stored box, reading only the chunks it overlaps.

        Regions come from :func:`~weightbank.bank.shards.region_of` on this
        handle's manifest; see :func:`~weightbank.bank.shards.iter_regions`
        for the batching (a caller that copies each tensor out holds about
        256 MiB of chunks at a time).

        Example:
            >>> import torch, weightbank as wb
            >>> from weightbank.bank.shards import region_of
            >>> bank = wb.open("memory://"); ck = bank.checkpoint(bank.save({"w": torch.arange(6.0).reshape(2, 3)}).id)
            >>> [(n, t.tolist()) for n, t in ck.iter_regions([region_of(ck.manifest, 0, None, (1, 1), (1, 2))])]
            [(0, [[4.0, 5.0]])]
        """
        opts = self.options()
        done: set[int] = set()
        try:
            for n, t in iter_regions(opts.storage, self.id, self.manifest, regions, **opts.kwargs()):
                done.add(n)
                yield n, t
        except MissingObject as e:
            # A repack moved its chunks and gc freed the old packs: the rest from the new locations.
            moved = relocated(self.id, self.manifest, e, opts.fresh)
            if moved is None:
                raise
            left = [i for i in range(len(regions)) if i not in done]
            rest = [regions[i] for i in left]
            for n, t in iter_regions(opts.storage, self.id, moved, rest, **opts.kwargs()):
                yield left[n], t

    def read_regions(self, regions: Sequence[Region]) -> list[torch.Tensor]:
        """The tensors of ``regions``, in order, all held at once (see :meth:`iter_regions`).

        Example:
            >>> import torch, weightbank as wb
            >>> from weightbank.bank.shards import region_of
            >>> bank = wb.open("memory://"); ck = bank.checkpoint(bank.save({"w": torch.arange(4.0)}).id)
            >>> [t.tolist() for t in ck.read_regions([region_of(ck.manifest, 0, None, (2,), (2,))])]
            [[2.0, 3.0]]
        """
        opts = self.options()
        return self._moved_ok(
            opts, lambda m: read_regions(opts.storage, self.id, m, regions, **opts.kwargs())
        )
