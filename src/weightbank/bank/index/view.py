"""A consistent picture of the catalog: the newest root, the log entries after it, and queries on both.

How a reader gets it (:func:`load_snapshot`):

1. list ``index/roots/`` and read the newest root (an empty bank has none);
2. read the *head* (``index/head.json``: the highest number any writer
   claimed, and copies of the entries whose work is done), list
   ``index/log/`` and take the entries the root has not folded: its
   ``held`` ones and every one after ``upto``, up to the higher of the
   newest listed and the head's number — from the head's copy when it has
   one, else by reading the entry. The sequence must have no gap: entries
   are only ever deleted by a compaction *after* it published a root that folds them, so a
   gap means a newer root (start again) or damage — a lost newest entry, or a
   lost root whose entries were compacted away, is a gap below the head;
3. list the roots again: a new one means a compaction ran meanwhile (start
   again). Otherwise the picture is exact.

An *add* entry is an intent written just before its manifest: it counts only
once the manifest exists (an entry without one is a save in flight, or one
that died). A *delete* entry hides its checkpoint once the manifest is gone
(before that, the delete is still in progress and the checkpoint is still
there). So every answer agrees with the manifests, the bank's truth, and a
reader checks the existence of at most the few entries since the last
compaction — none, for a checkpoint whose entries the head lists as done
(see :func:`_settled`): a writer copies its entry there only after its
manifest was written (or removed), so the copy says what a look would.
Damage anywhere raises :class:`~.store.IndexDamaged` and the catalog lists
manifests instead.

Example:
    >>> from weightbank.storage import open_storage
    >>> snap = load_snapshot(open_storage("memory://"))
    >>> snap.count(), snap.run_names()
    (0, [])
"""

from __future__ import annotations

import bisect
import heapq
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ...errors import MissingObject
from ..layout import INDEX_LOG, INDEX_ROOTS, log_key, log_seq_from_key, manifest_key, root_gen_from_key
from ..retention import best_first, metric_value
from .pages import (
    RunPageInfo,
    bucket_filter,
    bucket_rows,
    chunk_dir,
    chunk_filters,
    id_dir,
    id_rows,
    run_index,
    run_page_rows,
)
from .records import CatalogRecord
from .store import (
    ADD,
    DEL,
    EMPTY_ROOT,
    IndexDamaged,
    LogEntry,
    Root,
    read_entry,
    read_head_state,
    read_page,
    read_root,
)

__all__ = [
    "Memo",
    "PageCache",
    "Snapshot",
    "list_gens",
    "list_seqs",
    "load_snapshot",
    "log_damage",
    "pending_count",
]

_ATTEMPTS = 16


_FLIP = str.maketrans("0123456789abcdef", "fedcba9876543210")


def _newest_key(r: CatalogRecord) -> tuple[float, str]:
    """Sorts newest first, as ``log`` lists the whole bank (created, then id, both descending)."""
    return (-r.created, r.id.translate(_FLIP))


class PageCache:
    """Parsed pages by key (pages are immutable, so an entry never goes stale); bounded, thread-safe."""

    def __init__(self, storage: Any, limit: int = 512) -> None:
        self._storage = storage
        self._limit = limit
        self._lock = threading.Lock()
        self._pages: dict[str, dict[str, Any]] = {}

    def get(self, key: str) -> dict[str, Any]:
        with self._lock:
            page = self._pages.get(key)
        if page is not None:
            return page
        try:
            page = read_page(self._storage, key)
        except MissingObject:
            raise IndexDamaged(key, "a page the root names is gone") from None
        with self._lock:
            if len(self._pages) >= self._limit:
                self._pages.pop(next(iter(self._pages)))
            self._pages[key] = page
        return page


def list_gens(storage: Any) -> list[int]:
    return sorted(g for g in (root_gen_from_key(k) for k in storage.list_refs(INDEX_ROOTS)) if g is not None)


def list_seqs(storage: Any) -> list[int]:
    return sorted(s for s in (log_seq_from_key(k) for k in storage.list_refs(INDEX_LOG)) if s is not None)


def _parallel(fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    if len(items) <= 2:
        return [fn(x) for x in items]
    with ThreadPoolExecutor(max_workers=min(8, len(items))) as pool:
        return list(pool.map(fn, items))


class Memo:
    """What one process already read of the index and may reuse: roots and entries never change once
    written (only whole objects come and go), and a manifest seen committed stays so until a delete
    entry names it. A refresh then costs two listings and the reads of what is new."""

    def __init__(self) -> None:
        self.roots: dict[int, Root] = {}
        self.entries: dict[int, LogEntry] = {}
        self.committed: set[str] = set()
        self.gone: dict[str, int] = {}  # a deleted checkpoint → the newest entry naming it then

    def keep_only(self, gens: list[int], seqs: set[int]) -> None:
        self.roots = {g: r for g, r in self.roots.items() if g in gens[-1:]}
        self.entries = {s: e for s, e in self.entries.items() if s in seqs}


def pending_count(storage: Any, memo: Memo | None = None) -> int:
    """How many log entries wait above the newest root's ``upto`` (held ones and leftovers aside)."""
    gens = list_gens(storage)
    if not gens:
        return len(list_seqs(storage))
    root = (memo.roots.get(gens[-1]) if memo else None) or read_root(storage, gens[-1])
    upto = root.upto if root is not None else 0
    return sum(1 for s in list_seqs(storage) if s > upto)


def _unfolded(root: Root, seqs: list[int]) -> list[int]:
    """The listed entries ``root`` has not folded: its held ones and every one after its ``upto``."""
    held = set(root.held)
    return [s for s in seqs if s > root.upto or s in held]


def log_damage(storage: Any) -> list[IndexDamaged]:
    """What is wrong with the log entries a reader would use (``verify``'s look at the log).

    A reader takes an entry the head lists as done from the head, so damage to
    the entry itself goes unnoticed until a compaction removes it; this reads
    each one, and compares it with the head's copy.
    """
    gens = list_gens(storage)
    root = (read_root(storage, gens[-1]) if gens else None) or EMPTY_ROOT
    state = read_head_state(storage)
    out: list[IndexDamaged] = []
    for seq in _unfolded(root, list_seqs(storage)):  # folded ones: no reader uses them
        try:
            entry = read_entry(storage, seq)
        except IndexDamaged as e:
            out.append(e)
            continue
        copy = state.done.get(seq)
        if entry is not None and copy is not None and copy != entry:
            out.append(IndexDamaged(log_key(seq), "the head's copy of this entry differs from it"))
    return out


def load_snapshot(
    storage: Any, pages: PageCache | None = None, memo: Memo | None = None, *, trust_done: bool = True
) -> Snapshot:
    """The catalog as it stands now (see the module docstring). IndexDamaged if it cannot be trusted.

    ``trust_done=False`` (what a compaction asks) still takes entries from the
    head's copies but looks for every manifest: what it folds into a root is
    then what the manifests say, whatever a reader may briefly have misread.
    """
    cache = pages or PageCache(storage)
    memo = memo or Memo()
    for _ in range(_ATTEMPTS):
        gens = list_gens(storage)
        root = EMPTY_ROOT
        if gens:
            found = memo.roots.get(gens[-1]) or read_root(storage, gens[-1])
            if found is None:
                continue  # replaced meanwhile
            root = memo.roots[gens[-1]] = found
        # The head first: a number is claimed (its entry put) before the head is raised, so every
        # entry up to the head read here is in the listing that follows, unless it is lost.
        state = read_head_state(storage)
        head = state.seq
        seqs = list_seqs(storage)
        top = max(max(seqs, default=0), head if head > root.upto else 0)
        above = [s for s in seqs if s > root.upto]
        # Counted, never enumerated: the numbers come from storage, and a crafted one can be huge.
        missing_above = (top - root.upto) - len(above)
        wanted = _unfolded(root, seqs)
        # A listed entry the head lists as done is taken from there: its writer wrote both.
        memo.entries.update({s: state.done[s] for s in wanted if s in state.done and s not in memo.entries})
        fresh = [s for s in wanted if s not in memo.entries]
        read = _parallel(lambda s: read_entry(storage, s), fresh)
        memo.entries.update({s: e for s, e in zip(fresh, read, strict=True) if e is not None})
        entries = {s: memo.entries[s] for s in wanted if s in memo.entries}
        lost = [s for s in root.held if s not in entries] + [s for s in above if s not in entries]
        if missing_above > 0:
            lost.append(next(s for s in range(root.upto + 1, top + 1) if s not in entries))
        missing = set(lost)
        if list_gens(storage)[-1:] != gens[-1:]:
            continue  # a compaction published meanwhile: its entries may be gone
        if missing:
            raise IndexDamaged(log_key(min(missing)), "a log entry is missing (a gap in the sequence)")
        memo.keep_only(gens, set(entries))
        # An entry the root holds was unresolved when it was made (a delete and a save of the same
        # content crossing): such a checkpoint is always looked at.
        done = {s for s in entries if s in state.done and s not in root.held} if trust_done else set()
        return Snapshot.resolve(storage, root, entries, top, cache, memo, done)
    raise IndexDamaged(INDEX_ROOTS, "the index kept changing while it was read")


def _settled(entries: dict[int, LogEntry], done: set[int]) -> dict[str, bool]:
    """Whether each checkpoint's manifest exists, for those the done entries alone settle.

    Every entry of the checkpoint is done and all are adds (its manifest was
    written, and no delete is pending) or all deletes (it was removed, and no
    save of the same content is pending). A mix, or any entry not done, is
    left to a look at the manifest: an add and a delete of the same content
    may have crossed in either order.

    This rests on ids not repeating: an id covers its creation time, so the
    same id is committed again only by copying a manifest by hand. Where one
    is, a reader may misread it until the next save or delete trims the
    copies; a compaction never trusts the copies, so no misread is folded into
    a root, and entries a root holds (unresolved when it was made) are never
    settled here.
    """
    ops: dict[str, set[str]] = {}
    unsettled: set[str] = set()
    for seq, e in entries.items():
        ops.setdefault(e.id, set()).add(e.op)
        if seq not in done:
            unsettled.add(e.id)
    return {cid: op == {ADD} for cid, op in ops.items() if cid not in unsettled and len(op) == 1}


@dataclass
class Snapshot:
    """Root + pending log entries, resolved against the manifests (see the module docstring)."""

    storage: Any
    root: Root
    entries: dict[int, LogEntry]
    top: int  # the highest sequence number in the log
    pages: PageCache
    added: dict[str, CatalogRecord] = field(default_factory=dict)
    hidden: set[str] = field(default_factory=set)
    inflight: dict[str, LogEntry] = field(default_factory=dict)

    @classmethod
    def resolve(
        cls,
        storage: Any,
        root: Root,
        entries: dict[int, LogEntry],
        top: int,
        pages: PageCache,
        memo: Memo | None = None,
        done: set[int] | None = None,
    ) -> Snapshot:
        """Resolve ``entries`` against the manifests; ``done``: the entries the head lists as done."""
        snap = cls(storage, root, entries, top, pages)
        memo = memo or Memo()
        deleting = {e.id for e in entries.values() if e.op == DEL}
        newest = {e.id: (seq, e.op) for seq, e in sorted(entries.items())}  # each id's newest entry
        # Gone stays gone unless a newer entry names it again (the same content saved once more).
        exists = {c: False for c, s in memo.gone.items() if newest.get(c, (0, DEL))[0] <= s}
        exists.update(dict.fromkeys(memo.committed - deleting, True))
        exists.update(_settled(entries, done or set()))
        ids = sorted({e.id for e in entries.values()} - set(exists))
        exists.update(zip(ids, _parallel(lambda c: storage.exists(manifest_key(c)), ids), strict=True))
        touched = {e.id for e in entries.values()}
        memo.committed = {c for c in touched if exists[c]}
        # Remembered as gone only when the newest entry naming it is a delete: a pending add (a save of
        # the same content, its manifest perhaps not written yet) is looked at again next time.
        memo.gone = {c: newest[c][0] for c in touched & deleting if not exists[c] and newest[c][1] == DEL}
        for seq in sorted(entries):
            e = entries[seq]
            if e.op == ADD and e.record is not None:
                if exists[e.id]:
                    snap.added[e.id] = e.record
                elif not any(x.op == DEL and x.id == e.id for x in entries.values()):
                    snap.inflight[e.id] = e
            elif e.op == DEL and not exists[e.id]:
                snap.hidden.add(e.id)
        for cid in snap.hidden:
            snap.added.pop(cid, None)
        return snap

    # -- pages ---------------------------------------------------------------
    def _run_pages(self, run: str) -> list[RunPageInfo]:
        row = self.root.runs.get(run)
        if row is None:
            return []
        return run_index(self.pages.get(row[1]), row[1])

    def _page_records(self, key: str) -> list[CatalogRecord]:
        return run_page_rows(self.pages.get(key), key)

    def _id_page(self, cid: str) -> str | None:
        """The key of the id page that would hold ``cid`` (None in an empty snapshot)."""
        if self.root.ids is None:
            return None
        directory = id_dir(self.pages.get(self.root.ids), self.root.ids)
        i = bisect.bisect_right([first for first, _, _ in directory], cid) - 1
        return directory[i][1] if i >= 0 else None

    def _root_record(self, cid: str) -> CatalogRecord | None:
        """The snapshot's record of ``cid``: its id page says run and order, the run's pages hold it."""
        key = self._id_page(cid)
        row = next((r for r in id_rows(self.pages.get(key), key) if r[0] == cid), None) if key else None
        if row is None:
            return None
        _, run, order = row
        pages = self._run_pages(run)
        i = bisect.bisect_right([p.first for p in pages], order) - 1
        if i < 0:
            raise IndexDamaged(key or "", f"id page places {cid[:12]} before every page of run {run!r}")
        found = next((r for r in self._page_records(pages[i].key) if r.id == cid), None)
        if found is None:
            raise IndexDamaged(pages[i].key, f"run page lacks {cid[:12]}, which its id page lists")
        return found

    # -- queries -------------------------------------------------------------
    def record(self, cid: str) -> CatalogRecord | None:
        """The record of checkpoint ``cid`` if it is committed and not deleted."""
        if cid in self.hidden:
            return None
        return self.added.get(cid) or self._root_record(cid)

    def count(self) -> int:
        return sum(self.run_count(r) for r in self.run_names())

    def _hidden_records(self) -> list[CatalogRecord]:
        out = []
        for cid in sorted(self.hidden):
            rec = self._root_record(cid)
            if rec is not None:
                out.append(rec)
        return out

    def run_count(self, run: str) -> int:
        n = self.root.runs[run][0] if run in self.root.runs else 0
        n += sum(1 for r in self.added.values() if r.run == run)
        n -= sum(1 for r in self._hidden_records() if r.run == run)
        return n

    def run_names(self) -> list[str]:
        names = set(self.root.runs) | {r.run for r in self.added.values()}
        if self.hidden:
            return sorted(r for r in names if self.run_count(r) > 0)
        return sorted(names)

    def members(self, run: str) -> list[CatalogRecord]:
        """Every checkpoint of ``run``, oldest first."""
        out = {r.id: r for p in self._run_pages(run) for r in self._page_records(p.key)}
        out.update({r.id: r for r in self.added.values() if r.run == run})
        return sorted((r for r in out.values() if r.id not in self.hidden), key=lambda r: r.order)

    def newest(self, run: str) -> Iterator[CatalogRecord]:
        """The run's checkpoints newest first, reading pages only as far as the caller iterates."""
        pending = sorted((r for r in self.added.values() if r.run == run), key=lambda r: r.order)
        for page in reversed(self._run_pages(run)):
            mine = [p for p in pending if p.order >= page.first]
            pending = pending[: len(pending) - len(mine)]
            for rec in sorted([*self._page_records(page.key), *mine], key=lambda r: r.order, reverse=True):
                if rec.id not in self.hidden:
                    yield rec
        for rec in reversed(pending):
            if rec.id not in self.hidden:
                yield rec

    def latest(self, run: str) -> CatalogRecord | None:
        row = self.root.runs.get(run)
        candidates = [r for r in self.added.values() if r.run == run]
        if row is not None and row[2].id not in self.hidden:
            candidates.append(row[2])
            return max(candidates, key=lambda r: r.order)
        if row is None:
            return max(candidates, key=lambda r: r.order) if candidates else None
        return next(self.newest(run), None)  # the root's newest was deleted: look further back

    def at_step(self, run: str, step: int) -> list[CatalogRecord]:
        """The run's checkpoints at ``step``, oldest first."""
        out = {
            r.id: r
            for p in self._run_pages(run)
            if p.min_step <= step <= p.max_step
            for r in self._page_records(p.key)
            if r.step == step
        }
        out.update({r.id: r for r in self.added.values() if r.run == run and r.step == step})
        return sorted((r for r in out.values() if r.id not in self.hidden), key=lambda r: r.order)

    def steps(self, run: str) -> list[int]:
        return sorted({r.step for r in self.members(run) if r.step is not None})

    def best(self, run: str, metric: str, mode: str) -> CatalogRecord | None:
        """The run's checkpoint with the best finite ``metric`` (the newest on ties), reading only pages that can hold it."""
        sign = 1.0 if mode == "max" else -1.0
        pages = [p for p in self._run_pages(run) if metric in p.metrics]
        bound = {
            p.key: sign * (p.metrics[metric][1] if mode == "max" else p.metrics[metric][0]) for p in pages
        }
        pages.sort(key=lambda p: -bound[p.key])
        pool = [r for r in self.added.values() if r.run == run]
        best_score: float | None = None
        for p in pages:
            if best_score is not None and bound[p.key] < best_score:
                break  # no record of this page (or a later one) can beat or tie the best found
            pool.extend(self._page_records(p.key))
            scores = [metric_value(r.decoded_metrics(), metric) for r in pool if r.id not in self.hidden]
            finite = [sign * s for s in scores if s is not None]
            best_score = max(finite) if finite else None
        live = sorted({r.id: r for r in pool if r.id not in self.hidden}.values(), key=lambda r: r.order)
        newest_first = live[::-1]
        values = [metric_value(r.decoded_metrics(), metric) for r in newest_first]
        order = best_first(values, "max" if mode == "max" else "min")
        return newest_first[order[0]] if order else None

    def match(self, prefix: str) -> list[str]:
        """Ids of committed checkpoints starting with ``prefix``."""
        out = {cid for cid in self.added if cid.startswith(prefix)}
        if self.root.ids is not None:
            directory = id_dir(self.pages.get(self.root.ids), self.root.ids)
            firsts = [first for first, _, _ in directory]
            lo = max(0, bisect.bisect_right(firsts, prefix) - 1)
            for first, key, _ in directory[lo:]:
                if first > prefix and not first.startswith(prefix):
                    break
                out.update(r[0] for r in id_rows(self.pages.get(key), key) if r[0].startswith(prefix))
        return sorted(out - self.hidden)

    def recent(self, n: int) -> list[CatalogRecord]:
        """The ``n`` newest checkpoints of the bank, newest first.

        The recent page holds the root's newest records, so those of them
        still there are the root's newest; with at least ``n`` of them, the
        answer is among them and the pending adds. Fewer (deletes thinned the
        page), and a pending add from a machine whose clock lags could sort
        below root records off the page: then each run's newest are merged,
        reading only as many of its pages as the answer needs.
        """
        on_page = self._page_records(self.root.recent) if self.root.recent is not None else []
        kept = [r for r in on_page if r.id not in self.hidden]
        pending = [r for r in self.added.values() if r.id not in self.hidden]
        key = _newest_key
        if len(kept) >= n or len(on_page) >= self.root.count:
            return sorted({r.id: r for r in [*kept, *pending]}.values(), key=key)[:n]
        runs = [self.newest(run) for run in self.run_names()]
        merged = heapq.merge(*runs, key=key)
        out: list[CatalogRecord] = []
        seen: set[str] = set()
        for rec in merged:
            if rec.id not in seen:
                seen.add(rec.id)
                out.append(rec)
                if len(out) == n:
                    break
        return out

    def everything(self) -> Iterator[CatalogRecord]:
        """Every committed checkpoint, run by run (oldest first within a run)."""
        for run in self.run_names():
            yield from self.members(run)

    def bucket(self, b: str) -> dict[str, str]:
        """The chunk index's bucket ``b`` as of the root: hash → the checkpoint that wrote the chunk."""
        if self.root.chunks is None:
            return {}
        buckets = chunk_dir(self.pages.get(self.root.chunks), self.root.chunks)
        row = buckets.get(b)
        return {} if row is None else bucket_rows(self.pages.get(row[0]), row[0])

    def bucket_filter(self, b: str) -> bytes | None:
        """Bucket ``b``'s Bloom filter (None: the bucket has none, or it is unreadable: read the bucket)."""
        if self.root.chunks is None:
            return None
        try:
            key = chunk_filters(self.pages.get(self.root.chunks), self.root.chunks).get(b)
            return None if key is None else bucket_filter(self.pages.get(key), key)
        except (IndexDamaged, MissingObject):
            return None  # a hint only: without it the bucket itself answers
