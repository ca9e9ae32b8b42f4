"""Deleting checkpoints and garbage collection, safe against saves in flight.

Which checkpoints a prune deletes is decided by the retention engine
(:mod:`weightbank.bank.retention`); this module deletes them.

Deleting a checkpoint moves its manifest to ``trash/`` (written first, then
the manifest is removed), so a concurrent save that already chose to reuse its
chunks is still covered. The entry is written again with its deletion time
only *after* the manifest is gone: a save may list the manifest up to the
instant it disappears, so only a time taken after that bounds which leases
could have seen it. An entry without a time protects its data (a delete in
progress: its manifest may still be listed); if its manifest is already gone
when gc begins (a delete that crashed before stamping), gc stamps it with that
instant.

``gc`` removes packs no committed checkpoint needs. It never deletes:

* a pack holding any chunk of a live manifest, or of a trashed manifest
  deleted after the oldest live lease began or after gc itself began;
* a pack written by a save that still holds a live lease;
* a pack a repack released (:mod:`.releases`) while its record has no time,
  or was stamped after the oldest live lease began or within ``grace``: a
  reader or a save may still hold the old locations;
* anything younger than ``grace`` seconds (covers clock skew and saves whose
  lease this gc could not see yet).

Manifest segments (``segments/``, the shared tables of format-3 manifests)
follow the packs' rules: they are named by the save that wrote them, kept
while a live or protected trashed manifest names them, while that save's
lease lives, and while younger than ``grace``. A save names a segment it did
not write only if its parent's manifest, read after the lease began, names
it — the same argument as for the chunks it reuses.

Leases are listed *before* manifests are read, so a save that starts after
that listing only reuses chunks of manifests this gc sees as live (or trashed
after gc began). Stale leases (dead process, or older than the lease TTL) are
removed, and trash entries no lease can still need are dropped.

With the catalog index the argument is unchanged, because neither side
trusts the index for it:

* gc reads every manifest (a listing, streamed), never the index, to know
  which packs are needed;
* a save reuses a chunk only from a manifest it *read after its lease
  began*: the parent's, one committed since the last compaction, or — found
  through the index's chunk buckets, which name the checkpoint that wrote
  each chunk — that checkpoint's own manifest, whose existence it checks and
  whose location it uses (a bucket never supplies a location). If that
  checkpoint is deleted later, its trash entry is stamped after the save's
  lease began, so its packs are kept; if it was deleted before, the save
  does not find it and writes the chunk again.

Index pages no kept snapshot names are removed once older than the grace
period (:mod:`.index.gc`).

Example:
    >>> import torch, weightbank as wb
    >>> bank = wb.open("memory://")
    >>> for s in range(3): _ = bank.save({"w": torch.full((4,), float(s))}, run="r", step=s)
    >>> len(bank.prune(keep_last=1).deleted), bank.gc(grace=0).bytes_freed
    (2, 32)
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import CorruptObject, MissingObject, UnsupportedFormat
from ..format.manifest import COMPACT_FORMAT, Manifest
from ..format.schema import finite, hex_digest, typed
from ..format.sealed import seal, unseal
from ..format.stored import is_compact
from ..storage.base import Storage
from . import leases, releases
from .catalog import Catalog, View
from .index import gc as index_gc
from .layout import (
    PACKS,
    SEGMENTS,
    TRASH,
    is_pack_key,
    is_segment_key,
    manifest_key,
    save_id_from_pack,
    save_id_from_segment,
    trash_key,
)
from .listing import read_compact, scan_manifests
from .results import GcReport

__all__ = ["TrashEntry", "finish_undone_deletes", "gc", "mark_readded", "packs_freed", "read_trash", "trash"]


@dataclass(frozen=True)
class TrashEntry:
    cid: str
    deleted_at: float | None  # None: the manifest may still be visible (delete in progress)
    manifest: Manifest | None
    key: str
    problem: str = ""  # why the stored entry could not be read (then ``manifest`` is None)
    also: tuple[str, ...] = ()  # packs and segments a repack's new head named while it was deleted


_TRASH_LEGACY_KEYS = ("id", "deleted_at", "by", "why", "manifest")


def trash(storage: Storage, catalog: Catalog, cid: str, manifest: Manifest, *, by: str, why: str) -> None:
    """Delete a checkpoint: record it in trash (durably), then in the catalog log, remove its manifest,
    then stamp the entry.

    The catalog's delete entry is written before the manifest goes, so no
    reader of the index can miss the delete; until the manifest is gone the
    entry hides nothing (the checkpoint still exists).
    """
    body: dict[str, Any] = {
        "id": cid,
        "deleted_at": None,
        "by": by,
        "why": why,
        "manifest": manifest.to_json(),
    }
    storage.write(trash_key(cid), seal(body))
    if manifest.format >= COMPACT_FORMAT:
        # A repack may have moved its chunks since ``manifest`` was read, and a save may have read
        # the new locations: the entry names those too (see :mod:`.releases` for the crossing).
        now = catalog.fresh(cid)
        if now is not None:
            extra = (set(now.packs) | set(now.segments)) - set(manifest.packs) - set(manifest.segments)
            if extra:
                body["also"] = sorted(extra)
                storage.write(trash_key(cid), seal(body))
    entry = catalog.tombstone(cid)
    storage.delete(manifest_key(cid))
    catalog.forget(cid, entry)
    # Only now is the manifest certainly invisible to a save that lists manifests.
    body["deleted_at"] = time.time()
    storage.write(trash_key(cid), seal(body))


def _read_entry(storage: Storage, key: str, mtime: float) -> tuple[TrashEntry, dict[str, Any] | None]:
    """One trash entry and its stored body (None when it is damaged: the entry then says why).

    MissingObject if it was dropped since it was listed.
    """
    data = storage.read(key)
    try:
        body = unseal(data, key, _TRASH_LEGACY_KEYS, "trash entry").body
        cid = hex_digest(body.get("id"), "id")
        if key != trash_key(cid):
            raise ValueError(f"the entry names checkpoint {cid[:12]}")
        when = body.get("deleted_at")
        m = Manifest.from_json(body.get("manifest"), key)
        also = tuple(typed(k, str, "also") for k in typed(body.get("also", []), list, "also"))
        if not all(is_pack_key(k) or is_segment_key(k) for k in also):
            raise ValueError("the entry names something that is neither a pack nor a segment")
        return TrashEntry(cid, None if when is None else finite(when, "deleted_at"), m, key, also=also), body
    except (
        CorruptObject,
        UnsupportedFormat,
        ValueError,
        KeyError,
        TypeError,
        IndexError,
        OverflowError,
    ) as e:
        # Its packs cannot be known: gc refuses while it may still protect data, then it ages out by mtime.
        return TrashEntry("?", mtime, None, key, problem=f"trash entry is unreadable ({e})"), None


def _crashed_deletes(storage: Storage) -> set[str]:
    """Keys of trash entries without a deletion time whose manifest is already gone (a delete that crashed)."""
    out = set()
    for info in storage.list(TRASH):
        try:
            entry, _ = _read_entry(storage, info.key, info.mtime)
        except MissingObject:
            continue
        if (
            entry.manifest is not None
            and entry.deleted_at is None
            and not storage.exists(manifest_key(entry.cid))
        ):
            out.add(info.key)
    return out


def mark_readded(storage: Storage, cid: str) -> None:
    """Note in ``cid``'s trash entry, if it has one, that the checkpoint is being added again (a copy
    back into this bank keeps its id): :func:`finish_undone_deletes` then leaves its manifest alone.

    Written before the manifest; a copy that dies between leaves a mark with no manifest, harmless.
    """
    key = trash_key(cid)
    try:
        _, body = _read_entry(storage, key, time.time())
    except MissingObject:
        return
    if body is not None and not body.get("readded"):
        body["readded"] = True
        storage.write(key, seal(body))


def finish_undone_deletes(storage: Storage) -> list[str]:
    """Delete again the checkpoints whose delete finished but whose manifest is back; their ids.

    Only a repack killed between rewriting a manifest's head and its look at
    the trash (:func:`weightbank.bank.repack._rewrite`) leaves that: a delete
    finished meanwhile (its entry stamped) and the rewrite put the manifest
    back. The index says deleted, a listing of manifests would say alive, and
    a ``repair-index`` would make it so. A copy back into the bank marks the
    entry ``readded`` first (:func:`mark_readded`), and such entries are left
    alone. The packs and segments the returned head names are added to the
    entry's ``also`` before the manifest goes, so gc keeps them as long as the
    entry protects the checkpoint (a save may have read that head).

    Example:
        >>> import torch, weightbank as wb
        >>> bank = wb.open("memory://"); cid = bank.save({"w": torch.ones(2)}).id
        >>> finish_undone_deletes(bank.storage)
        []
    """

    def undone(entry: TrashEntry, body: dict[str, Any] | None) -> bool:
        return (
            body is not None
            and entry.manifest is not None
            and entry.deleted_at is not None
            and not body.get("readded")
        )

    candidates: list[tuple[str, float, str]] = []  # (entry key, mtime, checkpoint id)
    for info in storage.list(TRASH):
        try:
            entry, body = _read_entry(storage, info.key, info.mtime)
        except MissingObject:
            continue
        if undone(entry, body) and storage.exists(manifest_key(entry.cid)):
            candidates.append((info.key, info.mtime, entry.cid))
    # A copy back in flight holds a lease: with any writer at work, wait for a quiet moment.
    now_t = time.time()
    if not candidates or any(
        not lease.stale(now_t, leases.DEFAULT_TTL) for lease in leases.all_leases(storage)
    ):
        return []
    out: list[str] = []
    for key, mtime, cid in candidates:
        try:
            if not is_compact(storage.read(manifest_key(cid))):
                continue  # a repack rewrites format-3 heads only: this one was written again on purpose
            _, now = read_compact(storage, cid)
            entry, body = _read_entry(storage, key, mtime)  # again: a copy may have marked it meanwhile
        except (MissingObject, CorruptObject, UnsupportedFormat):
            continue  # gone meanwhile, or damaged (verify names it)
        if body is None or not undone(entry, body):
            continue
        body["also"] = sorted(set(entry.also) | set(now.packs) | set(now.segments))
        storage.write(key, seal(body))  # its head's data stays protected, before the manifest goes
        storage.delete(manifest_key(cid))
        # Visible until now: a save may have found chunks through it, so the entry protects from now on.
        body["deleted_at"] = time.time()
        storage.write(key, seal(body))
        out.append(cid)
    return out
    for info in candidates:
        try:
            entry, _ = _read_entry(storage, info.key, info.mtime)
            if not is_compact(storage.read(manifest_key(entry.cid))):
                continue  # a repack rewrites format-3 heads only: this one was written again on purpose
            _, now = read_compact(storage, entry.cid)
            entry, body = _read_entry(storage, info.key, info.mtime)  # again: a copy may have marked it
        except (MissingObject, CorruptObject, UnsupportedFormat):
            continue  # gone meanwhile, or damaged (verify names it)
        if body is None or entry.manifest is None or entry.deleted_at is None or body.get("readded"):
            continue
        extra = set(now.packs) | set(now.segments)
        body["also"] = sorted(set(entry.also) | extra)
        storage.write(info.key, seal(body))  # its head's data stays protected, before the manifest goes
        storage.delete(manifest_key(entry.cid))
        # Visible until now: a save may have found chunks through it, so the entry protects from now on.
        body["deleted_at"] = time.time()
        storage.write(info.key, seal(body))
        out.append(entry.cid)
    return out


def _stamp(storage: Storage, key: str, when: float) -> None:
    """Give a trash entry left without a deletion time (a delete that crashed) the time ``when``."""
    try:
        _, body = _read_entry(storage, key, when)
    except MissingObject:
        return  # dropped meanwhile: nothing left to stamp
    if body is not None and body.get("deleted_at") is None:
        body["deleted_at"] = when
        storage.write(key, seal(body))


def read_trash(storage: Storage) -> list[TrashEntry]:
    """Every trash entry; a damaged one is listed with its ``problem`` and no manifest."""
    out = []
    for info in storage.list(TRASH):
        try:
            out.append(_read_entry(storage, info.key, info.mtime)[0])
        except MissingObject:
            continue
    return out


def gc(
    storage: Storage,
    *,
    grace: float = 3600.0,
    lease_ttl: float = leases.DEFAULT_TTL,
    dry_run: bool = False,
    workers: int = 8,
) -> GcReport:
    """Remove unreferenced packs and manifest segments (see module docstring for what is never removed)."""
    # Entries of deletes that crashed before stamping: their manifests were gone by `gone_by`,
    # strictly before this gc begins (time.time() can repeat a value: order them explicitly).
    crashed = _crashed_deletes(storage)
    gone_by = time.time()
    started = max(time.time(), math.nextafter(gone_by, math.inf))
    # Order matters: leases first, then manifests and trash.
    all_leases = leases.all_leases(storage)
    live_leases = [lease for lease in all_leases if not lease.stale(started, lease_ttl)]
    stale_leases = [lease for lease in all_leases if lease.stale(started, lease_ttl)]
    oldest_lease = min((lease.started for lease in live_leases), default=started)
    protect_after = min(oldest_lease, started) - grace
    # Every live manifest is read (streamed: memory holds the set of needed pack keys, not the
    # manifests): the index is never trusted to say what data is needed.
    needed: set[str] = set()
    broken: list[str] = []
    for cid, result in scan_manifests(storage, workers=workers):
        if isinstance(result, Manifest):
            needed.update(result.packs)
            needed.update(result.segments)
        else:
            broken.append(cid)
    if broken:
        # A manifest we cannot read may reference any pack: refuse to guess.
        bad = ", ".join(cid[:12] for cid in broken[:8])
        raise CorruptObject(
            manifest_key(broken[0]),
            detail=f"gc refuses to run while manifests are unreadable ({bad}); run `weightbank verify`",
        )
    drop_trash = []
    stamp = []
    trashed: set[str] = set()
    for entry in read_trash(storage):
        when = gone_by if entry.deleted_at is None and entry.key in crashed else entry.deleted_at
        if when is not None and when < protect_after:
            drop_trash.append(entry.key)
            continue
        if entry.problem:
            # A damaged entry that may still protect data a save in flight reuses: refuse to guess.
            raise CorruptObject(
                entry.key, detail=f"gc refuses to run: {entry.problem}; run `weightbank verify`"
            )
        # No time yet (a delete in progress: its manifest may still be listed) protects too.
        if entry.manifest is not None:
            needed.update(entry.manifest.packs)
            needed.update(entry.manifest.segments)
            needed.update(entry.also)
            trashed.add(entry.cid)
        if entry.deleted_at is None and entry.key in crashed:
            stamp.append(entry.key)
    inflight = {lease.save_id for lease in live_leases}
    drop_released, stamp_released, repacks = _released(storage, protect_after, inflight, needed, trashed)
    keep_writers = inflight | repacks
    deleted: list[str] = []
    freed = 0
    kept_inflight = 0
    for info in storage.list(PACKS):
        if not info.key.endswith(".pack") or info.key in needed:
            continue
        if save_id_from_pack(info.key) in keep_writers:
            kept_inflight += 1
            continue
        if info.mtime >= started - grace:
            continue
        deleted.append(info.key)
        freed += info.size
    # Manifest segments follow the packs' rules: named by the save that wrote them.
    segments: list[str] = []
    for info in storage.list(SEGMENTS):
        if (
            info.key in needed
            or not is_segment_key(info.key)
            or save_id_from_segment(info.key) in keep_writers
        ):
            continue
        if info.mtime < started - grace:
            segments.append(info.key)
            freed += info.size
    swept = pages_deleted = 0
    if not dry_run:
        for key in [*deleted, *segments]:
            storage.delete(key)
        for key in drop_trash:
            storage.delete(key)
        for rel in stamp_released:
            releases.stamp(storage, rel, gone_by)
        for key in drop_released:
            storage.delete(key)
        for key in stamp:
            _stamp(storage, key, gone_by)
        for lease in stale_leases:
            storage.delete(lease.key)
        swept = storage.sweep_incomplete(grace)
        pages_deleted = index_gc.sweep_pages(storage, started - grace)
    return GcReport(
        packs_deleted=tuple(sorted(deleted)),
        bytes_freed=freed,
        trash_dropped=len(drop_trash),
        leases_dropped=len(stale_leases),
        packs_kept_for_inflight=kept_inflight,
        dry_run=dry_run,
        incomplete_bytes_freed=swept,
        index_pages_deleted=pages_deleted,
        segments_deleted=len(segments),
    )


def _released(
    storage: Storage, protect_after: float, inflight: set[str], needed: set[str], trashed: set[str]
) -> tuple[list[str], list[releases.Release], set[str]]:
    """Protect what release records may still have readers for (see :mod:`.releases`).

    ``trashed``: checkpoints whose trash entry still protects their data.
    Returns (records to drop, records of dead repacks to stamp, the repacks
    whose own packs and segments stay protected).
    """
    drop: list[str] = []
    stamp: list[releases.Release] = []
    writers: set[str] = set()
    for rel in releases.read_all(storage):
        if rel.problem:
            raise CorruptObject(rel.key, detail=f"gc refuses to run: {rel.problem}; run `weightbank verify`")
        guarded = [keys for cid, keys in rel.held.items() if cid in trashed]
        for keys in guarded:
            needed.update(keys)
        if rel.released_at is None or rel.released_at >= protect_after:
            # Unstamped: the repack may still be rewriting manifests (or died doing it).
            needed.update(rel.packs)
            needed.update(rel.segments)
            writers.add(rel.repack)
            if rel.released_at is None and rel.repack not in inflight:
                stamp.append(rel)  # its lease is gone: its manifests are as they will stay
        elif not guarded:
            drop.append(rel.key)
    return drop, stamp, writers


def packs_freed(
    storage: Storage,
    view: View,
    doomed: Sequence[str],
    current: Callable[[str], Manifest | None] | None = None,
) -> int:
    """Bytes ``gc`` would free once ``doomed`` are deleted, at most: packs no surviving checkpoint uses.

    gc frees whole packs (it does not rewrite partly-live ones), so this
    counts packs, not chunks. The packs of the surviving checkpoints come from
    the catalog's records (each lists the packs its checkpoint used when it was
    saved), never from a manifest. Those of the doomed ones come from
    ``current`` (their manifests as stored now: a repack may have moved their
    chunks) when it is given, else from their records too. A repack's new
    packs are in no record, so one a survivor shares with a doomed checkpoint
    is counted as freed: an estimate from above.
    """
    gone = set(doomed)
    candidates: set[str] = set()
    for cid in gone:
        r = view.record(cid)
        # Only a format-3 checkpoint's chunks can have moved: the others' records are exact.
        m = current(cid) if current is not None and (r is None or r.format >= COMPACT_FORMAT) else None
        if m is not None:
            candidates.update(m.packs)
        elif r is not None:
            candidates.update(r.packs)
    if not candidates:
        return 0
    live = {p for r in view.everything() if r.id not in gone for p in r.packs if p in candidates}
    total = 0
    for key in sorted(candidates - live):
        with contextlib.suppress(MissingObject):
            total += storage.size(key)
    return total
