"""Compaction: fold the log entries since the newest root into a new root, rewriting only the pages they touch.

Any process may compact at any time (a save does, every :data:`COMPACT_EVERY`
entries); compactions racing for one generation publish exactly one root
(put-if-absent), and the loser simply stops. Steps:

1. take a consistent :class:`~.view.Snapshot` (root + pending entries);
2. resolve each pending entry: an *add* whose manifest exists is folded in;
   one without a manifest is *held* while its save still holds a lease, and
   dropped once the lease is gone (the save died before its commit point);
   a *delete* whose manifest is gone is folded (the record leaves its pages),
   one whose manifest is still there (a delete in progress) is held;
3. rewrite the touched pages — the run pages and id pages holding the
   records that come or go, the chunk-index buckets of the chunks the new
   checkpoints wrote, the recent page — and write root ``gen + 1`` naming
   them, with ``upto`` = the highest sequence seen and the held entries;
4. only then delete the folded and dropped entries and roots older than the
   previous two. A reader that listed the log before step 4 either sees the
   new root when it re-lists the roots and starts again, or sees every entry.

A dropped entry relies on the lease rule gc already uses: a save whose lease
is stale is dead. :func:`rebuild` makes a root from the manifests themselves
(``repair-index``, ``upgrade``), resolving the log entries up to the top it
saw against what the listing found.

Example:
    >>> import torch, weightbank as wb
    >>> bank = wb.open("memory://")
    >>> _ = bank.save({"w": torch.ones(2)}, run="r", step=1)
    >>> bank.compact().folded
    1
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from ...format.manifest import Manifest
from ...storage.base import Storage
from .. import leases
from ..layout import log_key, manifest_key, root_key
from ..retention import metric_value
from . import bloom
from .pages import (
    ID_PAGE,
    RECENT,
    RUN_PAGE,
    ChunkEntry,
    RunPageInfo,
    bucket_rows,
    chunk_dir,
    chunk_filters,
    id_dir,
    id_row,
    id_rows,
    run_index,
)
from .records import CatalogRecord
from .store import (
    ADD,
    DEL,
    IndexDamaged,
    Root,
    delete_ref,
    put_root,
    raise_head,
    read_entry,
    read_head,
    read_root,
    write_page,
)
from .view import PageCache, Snapshot, list_gens, list_seqs, load_snapshot

__all__ = ["COMPACT_EVERY", "CompactResult", "compact", "rebuild"]

#: A save compacts the catalog once this many log entries wait to be folded. The trade-off: a
#: fresh reader (a CLI call, a replica resolving ``run@latest``) takes the entries the head lists
#: as done from the head (no request each) but reads each other pending entry and checks its
#: manifest, two requests each (a writer that died before marking its entry, or one of an older
#: release); the parsing grows with every entry waiting; a compaction costs its saver about 60
#: requests plus 2 per entry folded (measured on a 300-checkpoint bank), spread over this many
#: saves. At 16: at most 32 extra requests per fresh read, about 6 per save.
COMPACT_EVERY = 16
#: Roots kept besides the newest (a reader that just read one still finds its pages).
KEEP_ROOTS = 2

ManifestOf = Callable[[str], Manifest]
T = TypeVar("T")


@dataclass(frozen=True)
class CompactResult:
    """What one compaction did: the root it published (0: none), entries folded, held and dropped."""

    gen: int
    folded: int
    held: int
    dropped: int


def _page_info(key: str, rows: Sequence[CatalogRecord]) -> RunPageInfo:
    metrics: dict[str, tuple[float, float]] = {}
    for r in rows:
        for name in r.decoded_metrics():
            v = metric_value(r.decoded_metrics(), name)
            if v is None:
                continue
            lo, hi = metrics.get(name, (v, v))
            metrics[name] = (min(lo, v), max(hi, v))
    steps = [r.step for r in rows if r.step is not None]
    return RunPageInfo(
        key, len(rows), rows[0].order, rows[-1].order, min(steps, default=-1), max(steps, default=-1), metrics
    )


def _newest_of(snap: Snapshot, index_key: str, k: int) -> list[CatalogRecord]:
    """Up to ``k`` newest records of the run whose run index page is ``index_key``."""
    out: list[CatalogRecord] = []
    for page in reversed(run_index(snap.pages.get(index_key), index_key)):
        out.extend(snap._page_records(page.key))
        if len(out) >= k:
            break
    return out


def _write_records(storage: Storage, rows: Sequence[CatalogRecord]) -> str:
    return write_page(storage, {"records": [r.to_json() for r in rows]})


def _rechunk(rows: list[T], size: int, last: bool) -> list[list[T]]:
    """Cut a touched page's rows into pages: the last page of a list fills up to ``size``; others split at 2x."""
    if not rows:
        return []
    if last:
        return [rows[i : i + size] for i in range(0, len(rows), size)]
    if len(rows) <= 2 * size:
        return [rows]
    return [rows[i : i + size] for i in range(0, len(rows), size)]


def _update_run(
    storage: Storage,
    snap: Snapshot,
    run: str,
    add: list[CatalogRecord],
    remove: set[str],
    removed_orders: dict[str, tuple[float, int, str]],
) -> tuple[int, str, CatalogRecord] | None:
    pages = snap._run_pages(run)
    firsts = [p.first for p in pages]
    touched: dict[int, tuple[list[CatalogRecord], set[str]]] = {}
    for rec in add:
        i = max(0, bisect.bisect_right(firsts, rec.order) - 1) if pages else 0
        touched.setdefault(i, ([], set()))[0].append(rec)
    for cid in remove:
        order = removed_orders[cid]
        i = bisect.bisect_right(firsts, order) - 1
        if 0 <= i < len(pages):
            touched.setdefault(i, ([], set()))[1].add(cid)
    new_pages: list[RunPageInfo] = []
    for i in range(max(len(pages), 1 if add else 0)):
        if i not in touched:
            new_pages.append(pages[i])
            continue
        adds, gone = touched[i]
        old = snap._page_records(pages[i].key) if i < len(pages) else []
        rows = {r.id: r for r in old if r.id not in gone}
        rows.update({r.id: r for r in adds})
        ordered = sorted(rows.values(), key=lambda r: r.order)
        chunks = _rechunk(ordered, RUN_PAGE, last=i >= len(pages) - 1)
        new_pages.extend(_page_info(_write_records(storage, c), c) for c in chunks)
    if not new_pages:
        return None
    n = sum(p.n for p in new_pages)
    index_key = write_page(storage, {"pages": [p.to_json() for p in new_pages]})
    newest = snap._page_records(new_pages[-1].key)[-1]
    return n, index_key, newest


def _update_ids(storage: Storage, snap: Snapshot, add: list[CatalogRecord], remove: set[str]) -> str | None:
    directory = id_dir(snap.pages.get(snap.root.ids), snap.root.ids) if snap.root.ids else []
    firsts = [first for first, _, _ in directory]
    touched: dict[int, tuple[list[CatalogRecord], set[str]]] = {}
    for rec in add:
        i = max(0, bisect.bisect_right(firsts, rec.id) - 1) if directory else 0
        touched.setdefault(i, ([], set()))[0].append(rec)
    for cid in remove:
        i = bisect.bisect_right(firsts, cid) - 1
        if 0 <= i < len(directory):
            touched.setdefault(i, ([], set()))[1].add(cid)
    rows_out: list[list[Any]] = []
    for i in range(max(len(directory), 1 if add else 0)):
        if i not in touched:
            rows_out.append(list(directory[i]))
            continue
        adds, gone = touched[i]
        rows: dict[str, list[Any]] = {}
        if i < len(directory):
            key = directory[i][1]
            for cid, run, (created, step, _) in id_rows(snap.pages.get(key), key):
                if cid not in gone:
                    rows[cid] = [cid, run, created, step]
        rows.update({r.id: id_row(r) for r in adds})
        ordered = [rows[c] for c in sorted(rows)]
        parts = _rechunk(ordered, ID_PAGE, last=False)
        rows_out.extend([part[0][0], write_page(storage, {"ids": part}), len(part)] for part in parts)
    if not rows_out:
        return None
    return write_page(storage, {"pages": rows_out})


def _update_chunks(storage: Storage, snap: Snapshot, new: Iterable[ChunkEntry]) -> str | None:
    if snap.root.chunks:
        directory = snap.pages.get(snap.root.chunks)
        buckets = dict(chunk_dir(directory, snap.root.chunks))
        try:
            filters = chunk_filters(directory, snap.root.chunks)
        except IndexDamaged:
            filters = {}  # a hint only: the buckets rewritten now get new filters, the rest none
    else:
        buckets, filters = {}, {}
    by_bucket: dict[str, list[ChunkEntry]] = {}
    for entry in new:
        by_bucket.setdefault(entry[0][:2], []).append(entry)
    for b, entries in sorted(by_bucket.items()):
        rows = bucket_rows(snap.pages.get(buckets[b][0]), buckets[b][0]) if b in buckets else {}
        for h, owner in entries:
            # A chunk is written again only when a save could not reuse it (its owner was gone):
            # the newest writer is the owner a later save finds alive.
            rows[h] = owner
        key = write_page(storage, {"chunks": [[h, rows[h]] for h in sorted(rows)]})
        buckets[b] = (key, len(rows))
        filters[b] = write_page(storage, {"bloom": bloom.encode(bloom.build(rows, bloom.BUCKET_BITS))})
    if not buckets:
        return None
    # A bucket untouched since before filters existed has none: a save reads it as it always did.
    kept = {b: k for b, k in sorted(filters.items()) if b in buckets}
    return write_page(storage, {"buckets": {b: list(v) for b, v in sorted(buckets.items())}, "filters": kept})


def _new_chunks(manifest: Manifest, cid: str, wrote: Iterable[str]) -> list[ChunkEntry]:
    own = set(wrote)
    return [(c.hash, cid) for c in manifest.chunks if manifest.packs[c.pack] in own]


def _publish(
    storage: Storage,
    snap: Snapshot,
    add: list[CatalogRecord],
    remove: set[str],
    chunks: list[ChunkEntry],
    held: list[int],
) -> Root | None:
    removed_orders: dict[str, tuple[float, int, str]] = {}
    removed_runs: dict[str, set[str]] = {}
    for cid in remove:
        rec = snap._root_record(cid)
        if rec is not None:
            removed_orders[cid] = rec.order
            removed_runs.setdefault(rec.run, set()).add(cid)
    runs = dict(snap.root.runs)
    adds_by_run: dict[str, list[CatalogRecord]] = {}
    for rec in add:
        adds_by_run.setdefault(rec.run, []).append(rec)
    for run in sorted(set(adds_by_run) | set(removed_runs)):
        row = _update_run(
            storage, snap, run, adds_by_run.get(run, []), removed_runs.get(run, set()), removed_orders
        )
        if row is None:
            runs.pop(run, None)
        else:
            runs[run] = row
    present = set(removed_orders)
    ids = _update_ids(storage, snap, add, present) if add or present else snap.root.ids
    chunk_key = _update_chunks(storage, snap, chunks) if chunks else snap.root.chunks
    # The recent page must be exactly the new root's newest: its old rows still there are the old
    # root's newest, so with RECENT of them left the answer is among them and the adds; with fewer
    # (deletes thinned it), and more in the root, it is refilled from each run's newest pages.
    on_page = snap._page_records(snap.root.recent) if snap.root.recent else []
    kept = [r for r in on_page if r.id not in present]
    pool = {r.id: r for r in [*kept, *add]}
    if len(kept) < RECENT and snap.root.count > len(on_page):
        for _, index_key, _ in runs.values():
            pool.update({r.id: r for r in _newest_of(snap, index_key, RECENT)})
    recent_rows = sorted(pool.values(), key=lambda r: (r.created, r.id), reverse=True)[:RECENT]
    recent = _write_records(storage, recent_rows) if recent_rows else None
    root = Root(
        gen=snap.root.gen + 1,
        upto=max(snap.top, snap.root.upto),
        held=tuple(sorted(held)),
        created=time.time(),
        count=sum(n for n, _, _ in runs.values()),
        runs=runs,
        ids=ids if runs else None,
        chunks=chunk_key,
        recent=recent if runs else None,
    )
    return root if put_root(storage, root) else None


def _live_saves(storage: Storage) -> set[str]:
    now = time.time()
    return {x.save_id for x in leases.all_leases(storage) if not x.stale(now, leases.DEFAULT_TTL)}


def _clean(storage: Storage, root: Root, done: Iterable[int]) -> None:
    for seq in done:
        delete_ref(storage, log_key(seq))
    for gen in list_gens(storage):
        if gen < root.gen - KEEP_ROOTS:
            delete_ref(storage, root_key(gen))


def compact(
    storage: Storage, manifest_of: ManifestOf, cache: PageCache | None = None, *, force: bool = False
) -> CompactResult:
    """Fold the pending log entries into a new root (see the module docstring); gen 0 if none was published.

    ``manifest_of`` reads a committed manifest (the chunks a new checkpoint
    wrote go into the chunk index). Without ``force`` nothing is done when no
    entry waits.
    """
    snap = load_snapshot(storage, cache, trust_done=False)
    if not snap.entries and not force:
        return CompactResult(0, 0, 0, 0)
    live = _live_saves(storage) if snap.inflight else set()
    done: list[int] = []
    held: list[int] = []
    dropped = 0
    for seq, e in sorted(snap.entries.items()):
        if e.op == ADD and e.id in snap.inflight:
            # Leases are listed after the snapshot looked for the manifest: a save that committed
            # and released its lease in between is seen here, so look again before dropping.
            if live.intersection(e.save_ids) or storage.exists(manifest_key(e.id)):
                held.append(seq)
            else:
                dropped += 1
                done.append(seq)
        elif e.op == DEL and e.id not in snap.hidden:
            held.append(seq)  # its manifest is still there: a delete in progress
        else:
            done.append(seq)
    add = sorted(snap.added.values(), key=lambda r: r.order)
    chunks: list[ChunkEntry] = []
    for seq in done:
        e = snap.entries[seq]
        if e.op == ADD and e.id in snap.added and e.wrote:
            chunks.extend(_new_chunks(manifest_of(e.id), e.id, e.wrote))
    root = _publish(storage, snap, add, set(snap.hidden), chunks, held)
    if root is None:
        return CompactResult(0, 0, 0, 0)  # another compaction published this generation first
    # Entries an earlier compaction folded but crashed before removing are left over: they go too.
    stale = [x for x in list_seqs(storage) if x <= snap.root.upto and x not in snap.root.held]
    _clean(storage, root, [*done, *stale])
    return CompactResult(root.gen, len(done) - dropped, len(held), dropped)


def rebuild(
    storage: Storage,
    scanned: Iterable[tuple[str, Manifest]],
    manifest_of: ManifestOf,
    cache: PageCache | None = None,
) -> CompactResult:
    """A root made from ``scanned`` (every manifest a listing found), replacing whatever the index held.

    ``scanned`` is consumed as it comes: memory holds one record per
    checkpoint and one owner per unique chunk, never the manifests.

    The log is read *before* the caller's listing would miss a commit: an add
    entry up to the log's top whose manifest the listing missed but that
    exists now is included, one still in flight is held; a delete whose
    manifest still exists is held.
    """
    cache = cache or PageCache(storage)
    top_root = max(list_gens(storage), default=0)
    try:
        head, _ = read_head(storage)  # before the listing: every number up to it is then listed
    except IndexDamaged:
        head = 0
    seqs = list_seqs(storage)
    entries = {}
    for s in seqs:
        try:
            e = read_entry(storage, s)
        except IndexDamaged:  # a damaged entry is what a rebuild repairs: the listing knows better
            e = None
        if e is not None:
            entries[s] = e
    records: dict[str, CatalogRecord] = {}
    owners: dict[str, str] = {}

    def take(cid: str, m: Manifest) -> None:
        records[cid] = CatalogRecord.of(cid, m)
        for c in m.chunks:
            owners.setdefault(c.hash, cid)

    for cid, m in scanned:
        take(cid, m)
    live = _live_saves(storage)
    held: list[int] = []
    for s, e in sorted(entries.items()):
        present = storage.exists(manifest_key(e.id))
        if e.op == ADD:
            if present and e.id not in records:
                take(e.id, manifest_of(e.id))
            elif not present and live.intersection(e.save_ids):
                held.append(s)
        elif e.op == DEL:
            if present:
                held.append(s)
            else:
                records.pop(e.id, None)
    uptos = []
    for gen in list_gens(storage):
        try:
            old_root = read_root(storage, gen)
        except IndexDamaged:
            continue
        if old_root is not None:
            uptos.append(old_root.upto)
    # Numbers never go back: a long-lived reader keys what it read by them.
    top = max(max(seqs, default=0), head, *uptos)
    empty = Root(top_root, 0, (), 0.0, 0, {}, None, None, None)
    snap = Snapshot(storage, empty, {}, top, cache)
    # A chunk owned by a checkpoint a delete entry took out is owned by nobody the index lists: a save
    # that finds it checks the owner's manifest, finds it gone, and writes the chunk again.
    chunks = sorted(owners.items())
    root = _publish(storage, snap, sorted(records.values(), key=lambda r: r.order), set(), chunks, held)
    if root is None:
        return CompactResult(0, 0, 0, 0)
    _clean(storage, root, [s for s in entries if s not in held])
    raise_head(storage, top)  # a damaged head is written again
    return CompactResult(root.gen, len(records), len(held), 0)
