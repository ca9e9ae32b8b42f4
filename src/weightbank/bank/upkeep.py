"""Deleting, pruning, collecting and checking: the maintenance verbs of :class:`~weightbank.Bank`.

Which checkpoints a prune deletes is the retention engine's call
(:mod:`.retention`), read from the catalog index; deleting is
:mod:`.maintenance`'s; ``gc``, ``verify`` and ``du`` read every manifest.

Example:
    >>> import torch, weightbank as wb
    >>> bank = wb.open("memory://")
    >>> for s in range(3): _ = bank.save({"w": torch.full((2,), float(s))}, run="r", step=s)
    >>> len(bank.prune(keep_last=1).deleted), bank.verify().ok
    (2, True)
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import CheckpointNotFound, CorruptObject, IncompatibleState, InvalidArgument, UnsupportedFormat
from . import maintenance, retention
from . import repack as repack_mod
from . import verify as verify_mod
from .environment import who
from .layout import check_name
from .results import DuReport, GcReport, PruneReport, RekeyReport, RepackReport, VerifyReport
from .writer import DEFAULT_KEYFRAME_EVERY

if TYPE_CHECKING:
    from ..format.manifest import Manifest
    from ..storage.base import Storage
    from .catalog import Catalog
    from .tags import TagStore

__all__ = ["Upkeep"]


class Upkeep:
    """``delete`` / ``prune`` / ``gc`` / ``repack`` / ``verify`` / ``du`` for :class:`~weightbank.Bank`."""

    if TYPE_CHECKING:
        storage: Storage
        workers: int
        _catalog: Catalog
        _tags: TagStore

        def resolve(self, ref: str) -> str: ...
        def _manifest(self, ref: str) -> tuple[str, Manifest]: ...
        def _tags_by_target(self, *, strict: bool = False) -> dict[str, list[str]]: ...

    def delete(self, ref: str, *, force: bool = False, why: str = "") -> str:
        """Delete one checkpoint (its data goes at the next ``gc``). Tagged ones need ``force``."""
        cid, m = self._manifest(ref)
        tagged = [] if force else self._tags_by_target(strict=True).get(cid, [])
        if tagged:
            raise IncompatibleState(
                f"checkpoint {cid[:12]} is tagged {', '.join(tagged)}; untag it or pass force=True"
            )
        self._catalog.writable()
        maintenance.trash(self.storage, self._catalog, cid, m, by=who(), why=why)
        return cid

    def prune(
        self,
        *,
        run: str | None = None,
        keep_last: int | None = None,
        keep_best: tuple[str, int] | tuple[str, int, str] | None = None,
        keep_every: int | None = None,
        keep_tagged: bool = True,
        older_than: float | None = None,
        dry_run: bool = False,
    ) -> PruneReport:
        """Delete checkpoints no retention rule keeps; say what that frees.

        Rules are unions: a checkpoint survives if any rule keeps it. Per run:
        ``keep_last`` newest N, ``keep_best=("val_loss", K[, "min"|"max"])``,
        ``keep_every`` M (steps divisible by M); tagged ones with
        ``keep_tagged``; only checkpoints older than ``older_than`` seconds
        are candidates. With no rule at all nothing is deleted (InvalidArgument).
        The rules are :mod:`weightbank.bank.retention`'s policy objects, so
        ties on ``keep_best`` go to the newest checkpoint, as ``run@best:metric``.

        Example:
            >>> import torch, weightbank as wb
            >>> bank = wb.open("memory://")
            >>> ids = [bank.save({"w": torch.full((1,), float(s))}, run="r", step=s, metrics={"val": 1.0}).id
            ...        for s in range(3)]
            >>> bank.prune(keep_best=("val", 1)).kept == (ids[2],)   # a three-way tie: the newest stays
            True
        """
        if keep_last is None and keep_best is None and keep_every is None and older_than is None:
            raise InvalidArgument(
                "rules",
                None,
                "prune needs at least one rule (keep_last, keep_best, keep_every, older_than)",
            )
        rules = retention.prune_rules(
            keep_last=keep_last, keep_best=keep_best, keep_every=keep_every, older_than=older_than
        )
        self._catalog.refresh()
        view = self._catalog.view()
        names = view.run_names()
        if run is not None:
            check_name("run", run)
            if run not in names:
                raise CheckpointNotFound(f"{run}@latest", names[:5], detail=f"no run {run!r}")
            names = [run]
        by_target = self._tags_by_target()
        now = time.time()
        keep: set[str] = set(self._tags.live(strict=True).values()) if keep_tagged else set()
        candidates: list[str] = []
        for name in names:
            members = view.members(name)  # the run's records (index pages), no manifest
            newest_first = [r.info(tuple(sorted(by_target.get(r.id, [])))) for r in reversed(members)]
            keep |= retention.kept(newest_first, rules, now)
            candidates.extend(r.id for r in members)
        doomed = [cid for cid in candidates if cid not in keep]
        freed = maintenance.packs_freed(self.storage, view, doomed, self._current_manifest)
        if not dry_run and doomed:
            self._catalog.writable()
            for cid in doomed:
                maintenance.trash(
                    self.storage, self._catalog, cid, self._catalog.get(cid), by=who(), why="prune"
                )
            self._catalog.maybe_compact()  # many delete entries: fold them now, not at the next save
        return PruneReport(
            deleted=tuple(doomed),
            kept=tuple(cid for cid in candidates if cid in keep),
            bytes_freed=freed,
            dry_run=dry_run,
        )

    def _current_manifest(self, cid: str) -> Manifest | None:
        """``cid``'s manifest as stored now; None if it is gone or unreadable (the caller falls back)."""
        try:
            return self._catalog.fresh(cid)
        except (CorruptObject, UnsupportedFormat):
            return None

    def gc(self, *, grace: float = 3600.0, dry_run: bool = False) -> GcReport:
        """Remove data no checkpoint needs; never touches data a save in flight may use.

        ``grace`` (seconds) spares anything younger, for clock skew and slow
        object-store listings; ``gc(grace=0)`` is safe on one machine.
        """
        if not dry_run:
            self._finish_undone_deletes()
        return maintenance.gc(self.storage, grace=grace, dry_run=dry_run, workers=max(8, self.workers))

    def _finish_undone_deletes(self) -> None:
        """Delete again what a killed repack put back after its delete finished (see maintenance)."""
        if maintenance.finish_undone_deletes(self.storage):
            self._catalog.invalidate()

    def repack(
        self,
        *,
        min_dead: float = repack_mod.DEFAULT_MIN_DEAD,
        dry_run: bool = False,
        keyframe: str | Sequence[str] | None = None,
    ) -> RepackReport:
        """Copy the live chunks of packs at least ``min_dead`` dead into new packs; no id changes.

        The manifests that used them get new locations (format-3 manifests:
        their id covers their content, not where it lies); the old packs are
        freed by the next ``gc`` that may (see :mod:`weightbank.bank.repack`).
        Packs that format-1/2 manifests use stay as they are.

        ``keyframe`` (one ref or several) first turns delta chains around
        (:mod:`weightbank.bank.recode`): each named checkpoint gets every chunk
        standalone, so it loads with no chain at all, and up to 15 of its
        ancestors become reverse deltas against it. Use it on what is loaded
        most (``run@latest`` before a resume, ``prod`` after a promote).

        Example:
            >>> import torch, weightbank as wb
            >>> bank = wb.open("memory://")
            >>> ids = [bank.save({"w": torch.full((64,), float(s))}, run="r", step=s, codec="raw").id for s in range(2)]
            >>> bank.repack(dry_run=True).packs_rewritten
            ()
            >>> bank.repack(keyframe="r@latest").recoded  # raw chunks: nothing to turn around
            0
        """
        if isinstance(min_dead, bool) or not isinstance(min_dead, (int, float)) or not 0 < min_dead <= 1:
            raise InvalidArgument("min_dead", min_dead, "a share of dead bytes in (0, 1]")
        if keyframe is None or isinstance(keyframe, str):
            refs = [] if keyframe is None else [keyframe]
        elif isinstance(keyframe, (list, tuple)) and all(isinstance(r, str) for r in keyframe):
            refs = list(keyframe)
        else:
            raise InvalidArgument("keyframe", keyframe, "a ref or a list of refs")
        keyframes = [self.resolve(r) for r in refs]
        if not dry_run:
            self._catalog.writable()
            self._finish_undone_deletes()
        return repack_mod.repack(
            self.storage,
            self._catalog,
            min_dead=float(min_dead),
            dry_run=dry_run,
            keyframes=keyframes,
            workers=max(8, self.workers),
        )

    def rekey(self, ref: str, *, keyframe_every: int = DEFAULT_KEYFRAME_EVERY) -> RekeyReport:
        """Make ``ref`` load with no delta chain, cheaply enough to run after every save.

        A save codes its chunks as deltas against its parent, so with forward
        chains the newest checkpoint — what a resume or a deploy loads — is
        the most expensive to load. A rekey re-codes ``ref`` standalone and its
        parent as reverse deltas against it; older checkpoints of the run's
        open block keep their delta payloads (only their chains move), so it
        writes about one checkpoint's keyframe plus one delta. Blocks close
        after ``keyframe_every`` checkpoints or when the oldest would cost more
        than :data:`~weightbank.bank.repack.REKEY_BUDGET` keyframe loads, so
        every checkpoint keeps a bounded chain. Ids, tags and lineage never
        change (format-3 ids cover content, not coding). ``gc`` frees the
        codings it replaced. ConcurrentUpdate while a repack or rekey runs.
        A save that will be rekeyed can skip its forward deltas
        (``save(..., keyframe_every=1)``, as ``CheckpointManager`` does): the
        rekey then codes only the reverse delta.

        Example:
            >>> import torch, weightbank as wb
            >>> bank = wb.open("memory://")
            >>> w = torch.randn(1 << 18)
            >>> for s in range(3): w[: 100 * (s + 1)] += 1; _ = bank.save({"w": w}, run="r", step=s)
            >>> [c.codec for c in bank.checkpoint("r@latest").manifest.chunks][0]  # a forward chain
            'delta'
            >>> bank.rekey("r@latest").window == tuple(bank.resolve(f"r@{s}") for s in (2, 1, 0))
            True
            >>> [c.codec for c in bank.checkpoint("r@latest").manifest.chunks]
            ['planes']
        """
        cid = self.resolve(ref)
        self._catalog.writable()
        self._finish_undone_deletes()
        if isinstance(keyframe_every, bool) or not isinstance(keyframe_every, int) or keyframe_every < 2:
            raise InvalidArgument(
                "keyframe_every", keyframe_every, "an int >= 2 (the most checkpoints a block holds)"
            )
        return repack_mod.rekey(
            self.storage, self._catalog, cid, keyframe_every=keyframe_every, workers=max(8, self.workers)
        )

    def verify(self, ref: str | None = None, *, full: bool = True) -> VerifyReport:
        """Check manifests, chunk hashes (``full``) or just presence, and tags; report problems.

        Example:
            >>> import torch, weightbank as wb
            >>> bank = wb.open("memory://"); _ = bank.save({"w": torch.ones(1)})
            >>> bank.verify().problems
            ()
        """
        ids = None if ref is None else [self.resolve(ref)]
        return verify_mod.verify(
            self.storage, self._catalog, self._tags, ids, full=full, workers=self.workers
        )

    def du(self) -> DuReport:
        """Logical, unique and stored bytes of the bank (dedup and compression at a glance)."""
        return verify_mod.disk_usage(self.storage, self._catalog)
