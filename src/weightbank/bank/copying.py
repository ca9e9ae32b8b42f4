"""``Bank.copy_to``: checkpoints into another bank, ids, lineage and tags kept (see :mod:`.transfer`).

Example:
    >>> import torch, weightbank as wb
    >>> train, serve = wb.open("memory://"), wb.open("memory://")
    >>> ids = [train.save({"w": torch.full((4,), float(s))}, run="r", step=s).id for s in range(3)]
    >>> _ = train.tag("prod", "r@latest")
    >>> report = train.copy_to(serve, "prod", ancestors=True)
    >>> report.copied == tuple(ids), report.tags, serve.resolve("prod~2") == ids[0]
    (True, ('prod',), True)
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, cast

from ..errors import CheckpointNotFound, ConcurrentUpdate, InvalidArgument, NotMovable
from ..format.manifest import COMPACT_FORMAT
from . import transfer
from .results import CopyReport

if TYPE_CHECKING:
    from .bank import Bank

__all__ = ["Copying"]


class Copying:
    """``copy_to`` for :class:`~weightbank.Bank`."""

    def copy_to(
        self,
        dest: Bank | str | os.PathLike[str],
        refs: str | Sequence[str] | None = None,
        *,
        ancestors: bool = False,
        tags: bool = True,
        move_tags: bool = False,
    ) -> CopyReport:
        """Copy checkpoints into the bank ``dest`` (a Bank, or a path or URL opened and created if needed).

        ``refs``: what to copy (one ref or several; None: every checkpoint);
        ``ancestors``: their parents too, back to the first. Ids stay the same
        (a format-3 id covers content, not locations), so lineage links and
        refs like ``prod~1`` keep working where the parents were copied. A
        checkpoint the destination has is skipped, so a copy can be rerun.
        ``tags``: every tag here whose target was copied (or was there) is
        created there too (its current target; the history stays here). A tag
        the destination already has on another checkpoint is left where it is
        and listed in ``tags_left`` — a copy never rolls a serving bank's
        ``prod`` back — unless ``move_tags`` moves it. Every chunk is
        hash-checked as it is read; the destination commits each checkpoint
        as a save does, crash-safe. A named checkpoint of format 1 or 2
        raises NotMovable (an InvalidArgument) before anything is copied;
        unnamed ones (``refs=None``, ancestors) are listed in ``refused``.

        Example:
            >>> import torch, weightbank as wb
            >>> src, dst = wb.open("memory://"), wb.open("memory://")
            >>> a = src.save({"w": torch.zeros(2)}, tags=["prod"]).id
            >>> b = dst.save({"w": torch.ones(2)}, tags=["prod"]).id
            >>> r = src.copy_to(dst, a); r.copied == (a,), r.tags_left, dst.resolve("prod") == b
            (True, ('prod',), True)
        """
        from .bank import Bank
        from .bank import open as open_bank

        src = cast("Bank", self)  # a mixin of Bank
        t0 = time.perf_counter()
        if refs is None or isinstance(refs, str):
            names = None if refs is None else [refs]
        elif isinstance(refs, (list, tuple)) and all(isinstance(r, str) for r in refs):
            names = list(refs)
        else:
            raise InvalidArgument("refs", refs, "a ref, a list of refs, or None for every checkpoint")
        if isinstance(dest, os.PathLike):
            dest = os.fspath(dest)
        if not isinstance(dest, (Bank, str)):
            raise InvalidArgument("dest", dest, "a Bank or a bank path or URL")
        named = {} if names is None else {src.resolve(r): r for r in names}
        for cid, ref in named.items():
            record = src._catalog.record(cid)
            if record is not None and record.format < COMPACT_FORMAT:
                raise NotMovable(cid, ref)
        wanted = [c.id for c in reversed(src.log())] if names is None else list(named)
        if ancestors:
            wanted = _with_ancestors(src, wanted)
        else:
            wanted = sorted(dict.fromkeys(wanted), key=lambda c: src.info(c).created)
        target = open_bank(dest) if isinstance(dest, str) else dest
        try:
            same = target.storage is src.storage or (target.url == src.url and src.url != "memory://")
            if same:
                raise InvalidArgument("dest", target.url, "another bank (this is the bank itself)")
            copied: list[str] = []
            skipped: list[str] = []
            refused: list[str] = []
            written = reused = 0
            for cid in wanted:
                try:
                    stats = transfer.copy_checkpoint(
                        src.storage, target.storage, target._catalog, cid, src._pool()
                    )
                except NotMovable as e:
                    if cid in named:
                        raise NotMovable(cid, named[cid]) from e
                    refused.append(cid)  # its children still copy: their lineage starts there
                    continue
                if stats is None:
                    skipped.append(cid)
                else:
                    copied.append(cid)
                    written += stats.written_bytes
                    reused += stats.reused_bytes
            moved: list[str] = []
            left: list[str] = []
            if tags:
                here = set(copied) | set(skipped)
                there = {t.name: t.target for t in target.tags()}
                for t in src.tags():
                    if t.target is None or t.target not in here or there.get(t.name) == t.target:
                        continue
                    expect = there.get(t.name)
                    if expect is not None and not move_tags:
                        left.append(t.name)
                        continue
                    why = f"copied from {src.url}"
                    try:
                        target.tag(t.name, t.target, why=why, expect=expect)
                    except ConcurrentUpdate:
                        left.append(t.name)  # moved there meanwhile: that move stands
                        continue
                    except CheckpointNotFound:
                        target.tag(t.name, t.target, why=why)  # it names a checkpoint deleted there
                    moved.append(t.name)
            return CopyReport(
                tuple(copied),
                tuple(skipped),
                written,
                reused,
                tuple(moved),
                time.perf_counter() - t0,
                tags_left=tuple(left),
                refused=tuple(refused),
            )
        finally:
            if isinstance(dest, str):
                target.close()


def _with_ancestors(bank: Bank, ids: list[str]) -> list[str]:
    """``ids`` and every ancestor each has here, parents before children."""
    order: list[str] = []
    seen: set[str] = set()
    for cid in ids:
        chain = []
        nxt: str | None = cid
        while nxt is not None and nxt not in seen:
            seen.add(nxt)
            chain.append(nxt)
            try:
                nxt = bank.info(nxt).parent
            except CheckpointNotFound:
                chain.pop()  # a parent deleted here: the lineage starts at its child
                break
        order.extend(reversed(chain))
    return order
