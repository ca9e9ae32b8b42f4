"""The Bank's two-phase save: ``save_part`` in every process, ``commit`` in one.

A job whose state is spread over processes (``torch.distributed`` ranks, or
any workers) saves one checkpoint in two phases: each process writes its
tensors — whole, or :class:`~weightbank.TensorShard` boxes of bigger tensors —
with :meth:`TwoPhase.save_part` and hands the returned part (JSON-safe via
``to_json()``) to one process, which calls :meth:`TwoPhase.commit`. The
checkpoint appears at the commit and not before; see :mod:`.parts` for what
keeps uncommitted parts safe from ``gc`` and what happens when a process dies.
A part that will never be committed (the save failed somewhere) is given up
with :meth:`TwoPhase.abandon_part`, so ``gc`` need not wait for its lease to
go stale.

Example:
    >>> import torch, weightbank as wb
    >>> bank = wb.open("memory://")
    >>> parts = [bank.save_part({"b": torch.ones(2)}), bank.save_part({"c": torch.zeros(1)})]
    >>> sorted(bank.load(bank.commit(parts, run="r", step=1).id))
    ['b', 'c']
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Final

import numpy as np
import torch

from ..errors import InvalidName, InvalidState
from ..format.jsonsafe import encode
from ..format.manifest import Manifest
from . import leases
from .catalog import Catalog
from .environment import capture_env
from .layout import check_name, check_new_name
from .listing import scan_manifests
from .parts import SavePart, TensorShard, abandon_part, commit_parts, load_parts, pieces_of
from .results import CheckpointInfo, SaveResult
from .writer import DEFAULT_KEYFRAME_EVERY, SaveOptions, write_part

if TYPE_CHECKING:
    from ..storage.base import Storage
    from .tags import TagStore

__all__ = ["AUTO", "Auto", "TwoPhase", "checkpoint_header"]


class Auto:
    """The type of :data:`AUTO` (a typed sentinel: ``parent: str | Auto | None = AUTO``)."""

    def __repr__(self) -> str:
        return "AUTO"


AUTO: Final = Auto()
"""Default for ``save(parent=...)`` and ``commit(parent=...)``: the run's newest checkpoint."""


def checkpoint_header(
    *,
    run: str,
    step: int | None,
    metrics: Mapping[str, Any] | None,
    config: Mapping[str, Any] | None,
    message: str,
    meta: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """The manifest's metadata fields for a new checkpoint, validated (parent and created not set)."""
    check_name("run", run)
    if step is not None and (isinstance(step, bool) or not isinstance(step, int) or step < 0):
        raise InvalidState("step", f"step must be a non-negative int or None, not {step!r}")
    if not isinstance(message, str):
        raise InvalidState("message", "message must be a string")
    return {
        "run": run,
        "step": step,
        "message": message,
        "metrics": encode(dict(metrics or {}), "metrics"),
        "config": encode(dict(config or {}), "config"),
        "meta": encode(dict(meta or {}), "meta"),
        "env": capture_env(),
    }


class TwoPhase:
    """``save_part`` / ``commit`` for :class:`~weightbank.Bank` (see the module docstring)."""

    if TYPE_CHECKING:
        storage: Storage
        workers: int
        _catalog: Catalog
        _tags: TagStore

        def resolve(self, ref: str) -> str: ...
        def _info(
            self, cid: str, m: Manifest, tags_by_target: Mapping[str, list[str]] | None = None
        ) -> CheckpointInfo: ...
        def _move_tag_retrying(self, name: str, cid: str, why: str) -> None: ...

    def _check_run(self, run: str) -> str:
        """``run`` if a save may add to it: a valid name, and one that cannot read as an id unless the
        run already exists (made before such names were refused, it goes on)."""
        check_name("run", run)
        try:
            return check_new_name("run", run)
        except InvalidName:
            self._catalog.refresh()  # only for a name that reads as an id: is it an existing run?
            if self._catalog.view().latest(run) is not None:
                return run
            raise

    def _parent_of(self, run: str, parent: str | Auto | None) -> str | None:
        """The id a new checkpoint of ``run`` records as its parent (``AUTO``: the run's newest)."""
        if isinstance(parent, Auto):
            self._catalog.refresh()
            newest = self._catalog.view().latest(run)
            return newest.id if newest is not None else None
        return None if parent is None else self.resolve(str(parent))

    def save_part(
        self,
        tensors: Mapping[str, torch.Tensor | np.ndarray | TensorShard | Sequence[TensorShard]],
        *,
        codec: str = "auto",
        parent: str | None = None,
        chunk_size: int | None = None,
        keyframe_every: int = DEFAULT_KEYFRAME_EVERY,
        lossy: str | None = None,
    ) -> SavePart:
        """Write this process's tensors of a checkpoint that :meth:`commit` will make visible.

        ``tensors`` maps names to tensors, or to :class:`~weightbank.TensorShard`
        boxes (one or several) of a bigger tensor whose other boxes other
        processes write. Chunks the bank already holds are not written again;
        ``parent`` (a ref) is what new chunks are delta-coded against
        (``codec="auto"``). The packs are durable when this returns; a lease
        naming this process keeps ``gc`` away from them until the commit —
        or until this process is gone, if no commit ever comes.

        Example:
            >>> import torch, weightbank as wb
            >>> bank = wb.open("memory://")
            >>> part = bank.save_part({"w": wb.TensorShard(torch.ones(2, 4), offsets=(2, 0), shape=(4, 4))})
            >>> part.tensors[0].offsets, part.stats.new_chunks
            ((2, 0), 1)
        """
        options = SaveOptions(
            codec=codec,
            workers=self.workers,
            keyframe_every=keyframe_every,
            lossy=lossy,
            **({"chunk_size": chunk_size} if chunk_size else {}),
        )
        pieces = pieces_of(tensors)
        self._catalog.writable()  # a format-1 bank gets its index before any data is written
        base = None if parent is None else self.resolve(str(parent))
        return write_part(self.storage, self._catalog, pieces, options, parent=base)

    def commit(
        self,
        parts: Iterable[SavePart | Mapping[str, Any]],
        *,
        state: object = None,
        run: str = "main",
        step: int | None = None,
        metrics: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
        tags: Iterable[str] = (),
        message: str = "",
        meta: Mapping[str, Any] | None = None,
        parent: str | Auto | None = AUTO,
    ) -> SaveResult:
        """Make one checkpoint of ``parts`` (from :meth:`save_part`, or their ``to_json()``) and return its info.

        ``state`` is the checkpoint's structure — what ``load`` returns — with
        a :class:`~weightbank.TensorRef` where each tensor of the parts goes and
        JSON-safe values elsewhere; by default, a flat dict of every tensor.
        Pieces of one tensor must tile it exactly. The manifest is written
        (the commit point), then every part's lease is released and the tags
        are moved. ``parent`` is a ref (``AUTO``: the run's newest checkpoint).

        Example:
            >>> import torch, weightbank as wb
            >>> bank = wb.open("memory://")
            >>> part = bank.save_part({"model.w": torch.ones(2)})
            >>> info = bank.commit([part.to_json()], state={"model": {"w": wb.TensorRef("model.w")}, "epoch": 3})
            >>> bank.load(info.id)["epoch"], info.n_tensors
            (3, 1)
        """
        self._check_run(run)
        tag_names = [check_new_name("tag", t) for t in ([tags] if isinstance(tags, str) else tags)]
        header = checkpoint_header(
            run=run, step=step, metrics=metrics, config=config, message=message, meta=meta
        )
        loaded = load_parts(parts)
        if tag_names:
            self._tags.check_writable()  # a store that cannot move tags fails before the commit
        header["parent"] = self._parent_of(run, parent)
        header["created"] = time.time()
        cid, manifest, stats = commit_parts(self.storage, self._catalog, loaded, state=state, header=header)
        for name in tag_names:
            self._move_tag_retrying(
                name, cid, why=f"saved {run}@{step}" if step is not None else f"saved {run}"
            )
        info = self._info(cid, manifest, {cid: tag_names})
        return SaveResult(**info.__dict__, save_stats=stats)

    def abandon_part(self, part: SavePart | Mapping[str, Any]) -> bool:
        """Give up a part that will never be committed: delete the packs it wrote and release its lease.

        Only the part's own new packs are deleted, never the packs of chunks
        it reused. If a committed checkpoint already references the part —
        it was committed after all — nothing is deleted and this returns
        False (the lease is released either way); True when the packs went.
        Call it only once no process can still commit the part: a commit in
        flight elsewhere refuses a part whose packs are gone, but only if it
        checks before they go.

        Example:
            >>> import torch, weightbank as wb
            >>> bank = wb.open("memory://")
            >>> part = bank.save_part({"w": torch.ones(4)})
            >>> bank.abandon_part(part), bank.gc(grace=0).packs_kept_for_inflight
            (True, 0)
            >>> done = bank.save_part({"w": torch.zeros(4)}); _ = bank.commit([done])
            >>> bank.abandon_part(done)  # committed: its packs stay
            False
        """
        loaded = part if isinstance(part, SavePart) else SavePart.from_json(part)
        own = set(loaded.own_packs())
        # A manifest that names one of these packs is the commit point having passed; a manifest
        # that cannot be read might be one, so its packs are left to gc, which knows as much.
        # Every manifest is read (the index could lag a commit in flight); abandoning is rare.
        committed = False
        for _, result in scan_manifests(self.storage):
            if not isinstance(result, Manifest) or own.intersection(result.packs):
                committed = True
                break
        if committed:
            with contextlib.suppress(Exception):
                leases.release(self.storage, loaded.save_id)
            return False
        abandon_part(self.storage, loaded)
        return True
