"""Repack: copy the live chunks of partly dead packs into new packs, so gc can free the old ones.

gc frees whole packs only. After a prune a pack often holds a few chunks
that surviving checkpoints still use next to many that nobody does; its
bytes stay until every one of them is dead. A repack copies the live chunks
of such packs (as stored: same codec, same bytes; every later read still
verifies them against their hash) into new packs and rewrites the *location
head* of each format-3 manifest that used them. A format-3 id covers the
content alone (:mod:`weightbank.format.stored`), so no id, tag, lineage link
or run history changes.

The steps, each durable before the next, make it crash-safe like a save:

1. take a lease (gc keeps the new packs and location segments while it lives);
2. list the leases and read every manifest (as gc does: the index is never
   trusted for data), and pick the packs whose dead share is at least
   ``min_dead``. Packs a format-1/2 manifest uses are *pinned* (their
   locations are part of those ids) and so are packs of saves in flight;
3. write the new packs;
4. write a release record naming the old packs (:mod:`.releases`: until it
   is stamped, gc keeps them);
5. rewrite each affected manifest object in place (same content, new
   locations) — an atomic replace, so a reader sees the old head or the new,
   both valid while the old packs exist;
6. stamp the release record, drop the lease.

A crash before 4 leaves only unreferenced new packs (gc frees them once the
lease is stale); after 4, every manifest points at packs that exist, and gc
stamps the record of a dead repack itself. Readers holding old locations keep
working for the grace period, and a load that finds an old pack gone reads
the manifest again (:meth:`~weightbank.Bank.load`); a save reuses chunks only
at locations it read after its lease began (:meth:`.Catalog.fresh`), and
the release rule keeps the old packs for every lease older than the stamp.

Two repacks at once are safe (each manifest ends at one of them, the other's
packs are unreferenced and freed by gc) but wasteful: run one at a time.

Example:
    >>> import torch, weightbank as wb
    >>> bank = wb.open("memory://")
    >>> for s in range(2): _ = bank.save({"a": torch.full((64,), float(s)), "b": torch.ones(64)}, run="r", step=s, codec="raw")
    >>> _ = bank.prune(keep_last=1)  # step 0's pack: its "a" is dead, its "b" is step 1's
    >>> report = bank.repack(); report.manifests_rewritten, len(report.packs_rewritten)
    (1, 1)
    >>> bank.gc(grace=0).bytes_freed, bank.load("r@latest")["a"][0].item()
    (512, 1.0)
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from ..errors import CorruptObject, MissingObject
from ..format.manifest import COMPACT_FORMAT, ChunkRecord, Manifest
from ..format.stored import relocate, seal_segment, split_object
from ..storage.base import ObjectWriter, Storage
from . import leases, locks, recode, releases
from .catalog import Catalog
from .layout import (
    PACKS,
    manifest_key,
    pack_key,
    save_id_from_pack,
    segment_hash_from_key,
    segment_key,
    trash_key,
)
from .listing import read_compact, scan_manifests
from .results import RekeyReport, RepackReport
from .writer import DEFAULT_KEYFRAME_EVERY

__all__ = ["DEFAULT_MIN_DEAD", "REKEY_BUDGET", "PackWriter", "rekey", "repack"]

#: A pack is rewritten once at least this share of its bytes is dead.
DEFAULT_MIN_DEAD = 0.2
#: New packs roll over at this size.
REPACK_PACK_SIZE = 512 << 20
_ALIGN = 64  # as a save aligns chunks (weightbank.bank.writer.CHUNK_ALIGN)
#: Most a rekeyed block's oldest checkpoint may cost to load, in keyframe loads over a
#: keyframe load (:func:`.recode.chain_cost`): a block closes before passing it, so the
#: oldest loads in at most ~4× a keyframe's time. Every delta of a block is against the
#: adjacent checkpoint, so a longer block costs only its first keyframe in bytes; old
#: checkpoints are loaded rarely (a rollback a few steps back reads a short chain).
REKEY_BUDGET = 3.0

Extent = tuple[int, int]  # (offset, stored_len) of one chunk's bytes in a pack


class PackWriter:
    """New packs named by one writer id (a repack, a recode, a copy), written payload after payload.

    ``done`` lists the packs committed so far (durable), ``bytes`` the payload bytes appended.

    Example:
        >>> from weightbank.storage import MemoryStorage
        >>> w = PackWriter(MemoryStorage(), "ab" * 14)
        >>> key, at = w.append(b"payload"); w.close()
        >>> w.done == [key], at, w.bytes
        (True, 0, 7)
    """

    def __init__(self, storage: Storage, repack_id: str, seq: Iterator[int] | None = None) -> None:
        self.storage = storage
        self.repack_id = repack_id
        self._seq = itertools.count() if seq is None else seq  # shared by writers of one id
        self.done: list[str] = []
        self.bytes = 0
        self._w: ObjectWriter | None = None
        self._key = ""
        self._offset = 0

    def append(self, data: bytes) -> tuple[str, int]:
        """Append ``data`` (aligned); the pack key and offset it lands at. A full pack is committed first."""
        if self._w is None or self._offset >= REPACK_PACK_SIZE:
            self.close()
            self._key = pack_key(self.repack_id, next(self._seq))
            self._w = self.storage.open_writer(self._key)
            self._offset = 0
        pad = -self._offset % _ALIGN
        if pad:
            self._w.write(bytes(pad))
            self._offset += pad
        at = self._offset
        self._w.write(data)
        self._offset += len(data)
        self.bytes += len(data)
        return self._key, at

    def close(self) -> None:
        """Commit the open pack (durable once this returns) and add it to ``done``."""
        if self._w is not None:
            self._w.commit()
            self.done.append(self._key)
            self._w = None

    def abort(self) -> None:
        """Drop the open pack unwritten (packs in ``done`` stay; the caller deletes them if it must)."""
        if self._w is not None:
            with contextlib.suppress(Exception):
                self._w.abort()
            self._w = None


@dataclass
class _Survey:
    """What every manifest says: live extents by pack, format-3 users by pack, pinned packs, segments."""

    live: dict[str, dict[int, int]] = field(default_factory=dict)
    users: dict[str, set[str]] = field(default_factory=dict)
    pinned: set[str] = field(default_factory=set)
    segments: dict[str, tuple[str, ...]] = field(default_factory=dict)


def _survey(storage: Storage, inflight: set[str], workers: int) -> _Survey:
    """Read every manifest (as gc does: the index is never trusted for data)."""
    out = _Survey()
    live, users, pinned = out.live, out.users, out.pinned
    broken = []
    for cid, m in scan_manifests(storage, workers=workers):
        if not isinstance(m, Manifest):
            broken.append(cid)
            continue
        for c in m.chunks:
            live.setdefault(m.packs[c.pack], {})[c.offset] = c.stored_len
        if m.format >= COMPACT_FORMAT:
            for p in m.packs:
                users.setdefault(p, set()).add(cid)
            if m.segments:
                out.segments[cid] = m.segments
        else:
            pinned.update(m.packs)  # their locations are part of their ids
    if broken:
        bad = ", ".join(c[:12] for c in broken[:8])
        raise CorruptObject(
            manifest_key(broken[0]),
            detail=f"repack refuses to run while manifests are unreadable ({bad}); run `weightbank verify`",
        )
    pinned.update(p for p in live if save_id_from_pack(p) in inflight)
    return out


def _moved(m: Manifest, moves: dict[tuple[str, int], tuple[str, int]]) -> Manifest | None:
    """``m`` with its chunks at their new places (None if none of them moved)."""
    packs: dict[str, int] = {}
    chunks: list[ChunkRecord] = []
    changed = False
    for c in m.chunks:
        old = m.packs[c.pack]
        new = moves.get((old, c.offset))
        pack, offset = new if new is not None else (old, c.offset)
        changed |= new is not None
        chunks.append(dataclasses.replace(c, pack=packs.setdefault(pack, len(packs)), offset=offset))
    if not changed:
        return None
    return dataclasses.replace(m, packs=tuple(packs), chunks=tuple(chunks))


class _Record:
    """The repack's release record, rewritten (durably) when a delete crosses a rewrite."""

    def __init__(self, storage: Storage, rel: releases.Release) -> None:
        self.storage = storage
        self.rel = rel
        self._lock = threading.Lock()

    def hold(self, cid: str, keys: tuple[str, ...]) -> None:
        with self._lock:
            self.rel = dataclasses.replace(self.rel, held={**self.rel.held, cid: keys})
            self.rel.write(self.storage)


def _rewrite(
    storage: Storage, record: _Record, cid: str, change: Callable[[Manifest], Manifest | None]
) -> bool:
    """Give manifest ``cid`` the head ``change`` makes of its current one (same content, so the
    same id); False if not rewritten.

    A checkpoint being deleted (its trash entry is there) is left alone; one
    whose delete began while it was rewritten is deleted again, its new
    head's keys held in the record (see :mod:`.releases`).
    """
    if storage.exists(trash_key(cid)):
        return False  # being deleted: its data goes with it
    try:
        data, m = read_compact(storage, cid)
    except MissingObject:
        return False  # deleted meanwhile
    moved = change(m)
    if moved is None:
        return False
    content, _ = split_object(data, manifest_key(cid))
    draft = relocate(content, cid, moved)
    old_keys = {segment_hash_from_key(k): k for k in m.segments}
    keys = {}
    for h, text in draft.segments.items():
        if h in old_keys:
            keys[h] = old_keys[h]
        else:
            keys[h] = segment_key(record.rel.repack, h)
            storage.write(keys[h], seal_segment(text))
    storage.write(manifest_key(cid), draft.object(keys))
    if storage.exists(trash_key(cid)):
        # A delete began meanwhile and may not have seen this head: keep what it names for as
        # long as the trash entry protects the checkpoint, and finish the delete our write undid.
        record.hold(cid, tuple(sorted({*moved.packs, *keys.values()})))
        storage.delete(manifest_key(cid))
    return True


def _chosen(
    storage: Storage, live: dict[str, dict[int, int]], pinned: set[str], min_dead: float
) -> tuple[list[str], int, int, int]:
    """(packs to rewrite, their bytes, their live bytes, packs dead enough but pinned)."""
    chosen, total, kept, held = [], 0, 0, 0
    for info in storage.list(PACKS):
        extents = live.get(info.key)
        if not extents or info.size <= 0:
            continue  # wholly dead: gc's work
        used = sum(extents.values())
        if 1 - used / info.size < min_dead:
            continue
        if info.key in pinned:
            held += 1  # dead enough, but a format-1/2 manifest (or a save in flight) uses it
            continue
        chosen.append(info.key)
        total += info.size
        kept += used
    return sorted(chosen), total, kept, held


def repack(
    storage: Storage,
    catalog: Catalog,
    *,
    min_dead: float = DEFAULT_MIN_DEAD,
    dry_run: bool = False,
    keyframes: Sequence[str] = (),
    keyframe_every: int = DEFAULT_KEYFRAME_EVERY,
    lease_ttl: float = leases.DEFAULT_TTL,
    workers: int = 8,
) -> RepackReport:
    """Re-code chains onto ``keyframes`` (checkpoint ids, see :mod:`.recode`), then rewrite packs
    at least ``min_dead`` dead (see the module docstring); what it did."""
    t0 = time.perf_counter()
    repack_id = leases.new_id()
    if dry_run:
        would = sum(
            len(recode.window(storage, cid, keyframe_every).members) for cid in dict.fromkeys(keyframes)
        )
        report = _repack(storage, catalog, repack_id, min_dead, True, lease_ttl, workers, t0)
        return dataclasses.replace(report, recoded=would)
    # One repack at a time: two could each move a manifest's chunks while a save reuses them.
    with locks.hold(storage, "repack", repack_id, ttl=lease_ttl):
        recoded = written = 0
        for cid in dict.fromkeys(keyframes):
            n, nbytes, _ = _recode_chain(storage, catalog, cid, keyframe_every, workers)
            recoded += n
            written += nbytes
        leases.acquire(storage, repack_id)
        try:
            report = _repack(storage, catalog, repack_id, min_dead, False, lease_ttl, workers, t0)
        finally:
            with contextlib.suppress(Exception):
                leases.release(storage, repack_id)
    return dataclasses.replace(report, recoded=recoded, recode_written=written)


def rekey(
    storage: Storage,
    catalog: Catalog,
    cid: str,
    *,
    keyframe_every: int = DEFAULT_KEYFRAME_EVERY,
    budget: float = REKEY_BUDGET,
    lease_ttl: float = leases.DEFAULT_TTL,
    workers: int = 8,
) -> RekeyReport:
    """Make ``cid`` the keyframe of its run's open block (:func:`.recode.rekey_window`); what it did.

    Only the recode: no pack survey, so it costs what the block holds, not the
    bank. Holds the repack lock (:class:`~weightbank.errors.ConcurrentUpdate`
    while another repack or rekey runs).
    """
    t0 = time.perf_counter()
    with locks.hold(storage, "repack", leases.new_id(), ttl=lease_ttl):
        win = recode.rekey_window(storage, cid, keyframe_every, budget)
        n, nbytes, chunks = _recode_chain(storage, catalog, cid, keyframe_every, workers, win=win)
    return RekeyReport(cid, tuple(win.ids), n, chunks, nbytes, time.perf_counter() - t0)


def _recode_chain(
    storage: Storage,
    catalog: Catalog,
    cid: str,
    keyframe_every: int,
    workers: int,
    win: recode.Window | None = None,
) -> tuple[int, int, int]:
    """Make ``cid`` the keyframe of its chains (:mod:`.recode`); (heads rewritten, bytes and chunks written).

    ``win``: a rekey's window (reverse chains unbounded within it: the block
    bounds them), else the chain behind ``cid`` bounded by the decode budget.

    Crash-safe like a save: a lease of its own keeps the new packs while the
    heads point elsewhere, they are durable before a head names them, and a
    release record keeps every pack and segment the old heads named for as
    long as a reader may hold them.
    """
    rid = leases.new_id()
    leases.acquire(storage, rid)
    try:
        budget = None if win is None else math.inf
        if win is None:
            win = recode.window(storage, cid, keyframe_every)
        # The keyframe's codings in packs of their own: the next rekey replaces them (they become
        # reverse deltas), so those packs die whole and gc frees them without a repack.
        seq = itertools.count()
        writers = (PackWriter(storage, rid, seq), PackWriter(storage, rid, seq))
        try:
            decided = recode.recode(
                storage,
                win,
                lambda data, newest: writers[0 if newest else 1].append(data),
                keyframe_every=keyframe_every,
                budget=budget,
            )
            for w in writers:
                w.close()
        except BaseException:
            for w in writers:
                w.abort()
            raise
        members = win.members
        old_packs = sorted({p for mem in members for p in mem.manifest.packs})
        dropped = sorted({k for mem in members for k in mem.manifest.segments})
        record = _Record(storage, releases.begin(storage, rid, old_packs, dropped))

        def change(m: Manifest) -> Manifest | None:
            return recode.recoded_manifest(m, decided.coded)

        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(members)))) as pool:
            done = list(pool.map(lambda mem: _rewrite(storage, record, mem.cid, change), members))
        for mem in members:
            catalog.evict(mem.cid)
        releases.stamp(storage, record.rel)
        return sum(done), decided.written, decided.chunks_written
    finally:
        with contextlib.suppress(Exception):
            leases.release(storage, rid)


def _repack(
    storage: Storage,
    catalog: Catalog,
    repack_id: str,
    min_dead: float,
    dry_run: bool,
    lease_ttl: float,
    workers: int,
    t0: float,
) -> RepackReport:
    now = time.time()
    inflight = {lease.save_id for lease in leases.all_leases(storage) if not lease.stale(now, lease_ttl)}
    inflight.discard(repack_id)
    survey = _survey(storage, inflight, workers)
    live, users, pinned = survey.live, survey.users, survey.pinned
    chosen, before, kept, pinned_count = _chosen(storage, live, pinned, min_dead)
    if dry_run or not chosen:
        return RepackReport(
            tuple(chosen), before, kept, (), 0, pinned_count, dry_run, time.perf_counter() - t0
        )
    writer = PackWriter(storage, repack_id)
    moves: dict[tuple[str, int], tuple[str, int]] = {}
    try:
        for pack in chosen:
            for offset, n in sorted(live[pack].items()):
                data = storage.read(pack, offset, n)
                if len(data) != n:
                    raise CorruptObject(pack, detail=f"pack ends before the chunk at {offset} (+{n})")
                moves[(pack, offset)] = writer.append(data)
        writer.close()
    except BaseException:
        writer.abort()
        raise
    touched = sorted({cid for p in chosen for cid in users.get(p, ())})
    # Every segment a rewritten head may stop naming (its location segments, which a save may
    # have read): the record keeps them like the packs.
    dropped = sorted({k for cid in touched for k in survey.segments.get(cid, ())})
    record = _Record(storage, releases.begin(storage, repack_id, chosen, dropped))
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(touched)))) as pool:
        done = list(pool.map(lambda c: _rewrite(storage, record, c, lambda m: _moved(m, moves)), touched))
    for cid in touched:
        catalog.evict(cid)
    releases.stamp(storage, record.rel)
    return RepackReport(
        tuple(chosen),
        before,
        writer.bytes,
        tuple(writer.done),
        sum(done),
        pinned_count,
        False,
        time.perf_counter() - t0,
    )
