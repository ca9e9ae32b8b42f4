"""The bank's view of its committed checkpoints: the catalog index, or a listing when the index can't be trusted.

A bank of format 2 keeps a catalog index (:mod:`.index`): a log entry per
added or deleted checkpoint and compacted snapshots of them, so opening a
bank, resolving a ref, ``log``, ``tags`` and prune read a few small objects,
never every manifest. The manifest is still the commit point and the truth:

* a save writes its *add* entry (:meth:`Catalog.intend`) just before its
  manifest, so no committed checkpoint lacks an entry; readers count an entry
  only once its manifest exists;
* a delete writes its *delete* entry (:meth:`Catalog.tombstone`) before the
  manifest goes; readers hide the checkpoint once the manifest is gone;
* anything damaged, torn or missing in the index (a root, a page, an entry,
  a gap in the sequence) makes the catalog list and read every manifest
  instead, with an :class:`IndexFallbackWarning`; ``verify`` reports it and
  :meth:`Catalog.rebuild` (``weightbank repair-index``) repairs it.

A format-1 bank (written before the index) is read by listing, exactly as
before, and upgraded by :meth:`Catalog.upgrade` — explicitly
(``weightbank upgrade``) or on its first write.

Manifests are immutable, so a cached one never goes stale; the cache is bounded.

Example:
    >>> from weightbank.storage import open_storage
    >>> Catalog(open_storage("memory://"), indexed=True).run_names()
    []
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, Protocol, cast

from ..errors import CorruptObject, IndexDamaged, MissingObject, StorageError, UnsupportedFormat
from ..format.hashing import digest
from ..format.manifest import COMPACT_FORMAT, ChunkRecord, Manifest
from ..storage.base import Storage
from . import marker
from .index import bloom
from .index.compact import COMPACT_EVERY, CompactResult, compact, rebuild
from .index.records import CatalogRecord
from .index.store import (
    ADD,
    DEL,
    EMPTY_ROOT,
    LogEntry,
    mark_done,
    put_entry,
    raise_head,
    read_head,
    read_root,
)
from .index.view import Memo, PageCache, Snapshot, list_gens, list_seqs, load_snapshot, pending_count
from .layout import log_key, manifest_key
from .listing import ScanView, listed_ids, read_manifest, scan_manifests

__all__ = [
    "COMPACT_EVERY",
    "Catalog",
    "ChunkFinder",
    "ChunkLocation",
    "IndexFallbackWarning",
    "read_manifest",
]

ChunkLocation = tuple[str, ChunkRecord]
"""A chunk's pack key and record, as found in some committed manifest."""

#: Manifests kept parsed in memory (each can be MBs for a big model).
MANIFEST_CACHE = 64


class IndexFallbackWarning(UserWarning):
    """The catalog index could not be trusted, so this call listed every manifest (exact, but slow).

    ``weightbank verify`` says what is damaged; ``weightbank repair-index`` rebuilds the index.
    """


class View(Protocol):
    """What both the index snapshot and a listing answer."""

    def record(self, cid: str) -> CatalogRecord | None: ...
    def count(self) -> int: ...
    def run_count(self, run: str) -> int: ...
    def run_names(self) -> list[str]: ...
    def members(self, run: str) -> list[CatalogRecord]: ...
    def newest(self, run: str) -> Iterator[CatalogRecord]: ...
    def latest(self, run: str) -> CatalogRecord | None: ...
    def at_step(self, run: str, step: int) -> list[CatalogRecord]: ...
    def steps(self, run: str) -> list[int]: ...
    def best(self, run: str, metric: str, mode: str) -> CatalogRecord | None: ...
    def match(self, prefix: str) -> list[str]: ...
    def recent(self, n: int) -> list[CatalogRecord]: ...
    def everything(self) -> Iterator[CatalogRecord]: ...


class Catalog:
    """Committed checkpoints of one bank: queries, cached manifests, and the index's write protocol."""

    def __init__(self, storage: Storage, *, indexed: bool, compact: bool = False) -> None:
        self._storage = storage
        self.indexed = indexed
        #: Whether saves write format-3 manifests (layout 3: ids over content, locations apart).
        self.compact_manifests = compact
        self._lock = threading.RLock()
        self._manifests: OrderedDict[str, Manifest] = OrderedDict()
        self._stored: dict[str, str] = {}  # digest of the stored object a cached format-3 manifest came from
        self._pages = PageCache(storage)
        self._memo = Memo()
        self._refresh_lock = threading.Lock()
        self._view: Snapshot | ScanView | None = None
        self._listed: dict[str, Manifest] = {}  # the listing's manifests (scan mode only)
        self.broken: dict[str, Exception] = {}
        self.damage: IndexDamaged | None = None
        self._warned = False
        self._upto = 0  # the highest root ``upto`` this process saw while claiming entries

    # -- reading -------------------------------------------------------------
    def refresh(self) -> None:
        """Take a fresh picture of the bank (the index's newest state, or a new listing)."""
        if self.indexed:
            try:
                with self._refresh_lock:  # the memo is one process's: one refresh at a time uses it
                    snap = load_snapshot(self._storage, self._pages, self._memo)
            except IndexDamaged as e:
                self.damage = e
                self._warn(e)
            else:
                self.damage = None
                with self._lock:
                    self._view = snap
                    self.broken = {}
                    self._listed = {}  # a listing's manifests prove nothing once the index answers again
                return
        self._scan()

    def _scan(self) -> None:
        listed = set(listed_ids(self._storage))
        with self._lock:
            for cid in set(self._listed) - listed:
                del self._listed[cid]
            for cid in set(self.broken) - listed:
                del self.broken[cid]
            new = sorted(listed - set(self._listed) - set(self.broken))
        found = dict(scan_manifests(self._storage, new))
        with self._lock:
            for cid, result in found.items():
                if isinstance(result, Manifest):
                    self._listed[cid] = result
                else:
                    self.broken[cid] = result
            self._view = ScanView({cid: CatalogRecord.of(cid, m) for cid, m in self._listed.items()})

    def invalidate(self) -> None:
        """Forget the current picture: the next query takes a fresh one (cheap when nothing needs it)."""
        with self._lock:
            self._view = None

    def _current(self) -> Snapshot | ScanView:
        view = self._view
        if view is None:
            self.refresh()
            view = self._view
        assert view is not None  # refresh always sets one
        return view

    def view(self) -> View:
        """The current picture (taken on first use; :meth:`refresh` takes a new one).

        An index snapshot answers through a guard: a page found damaged while
        answering makes the catalog list the manifests and answer from that.
        """
        view = self._current()
        return _Guarded(self, view) if isinstance(view, Snapshot) else view

    def _fall_back(self, damage: IndexDamaged) -> ScanView:
        """A page turned out damaged mid-query: warn once, list every manifest, answer from that."""
        self.damage = damage
        self._warn(damage)
        self._scan()
        view = self._view
        assert isinstance(view, ScanView)  # _scan sets one
        return view

    def _warn(self, e: IndexDamaged) -> None:
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"the catalog index cannot be trusted ({e.key}: {e.detail}); listing every"
                " manifest instead (`weightbank verify` says what is damaged,"
                " `weightbank repair-index` rebuilds it)",
                IndexFallbackWarning,
                stacklevel=4,
            )

    @property
    def scanning(self) -> bool:
        """Whether answers come from a listing of every manifest (an old bank, or a damaged index)."""
        return isinstance(self._current(), ScanView)

    def record(self, cid: str) -> CatalogRecord | None:
        return self.view().record(cid)

    def run_names(self) -> list[str]:
        return self.view().run_names()

    def get(self, cid: str) -> Manifest:
        """The manifest of ``cid`` (read on a cache miss). Raises CorruptObject/MissingObject."""
        with self._lock:
            m = self._manifests.get(cid) or self._listed.get(cid)
            err = self.broken.get(cid)
            if m is not None:
                self._manifests[cid] = m
                self._manifests.move_to_end(cid)
        if m is not None:
            return m
        if err is not None:
            raise err
        data = self._storage.read(manifest_key(cid))
        m = read_manifest(self._storage, cid, data)
        self._remember(cid, m, data)
        return m

    def fresh(self, cid: str) -> Manifest | None:
        """The manifest of ``cid`` as storage holds it now; None if the checkpoint is gone.

        A format-3 manifest's locations change when a repack moves its chunks
        (its id does not), so a save reuses chunks only at locations read this
        way, after its lease began: the manifest object is read again (a few
        KiB) and parsed again only if it changed. A format-1/2 manifest never
        changes: its existence is all that is asked. CorruptObject /
        UnsupportedFormat as :meth:`get`.
        """
        with self._lock:
            cached = self._manifests.get(cid)
            tag = self._stored.get(cid)
        if cached is not None and cached.format < COMPACT_FORMAT:
            if self.exists(cid):
                return cached
            self.evict(cid)
            return None
        try:
            data = self._storage.read(manifest_key(cid))
        except FileNotFoundError:
            self.evict(cid)
            return None
        now = digest(data)
        if cached is not None and tag == now:
            return cached
        try:
            m = read_manifest(self._storage, cid, data)
        except MissingObject:
            self.evict(cid)
            return None
        self._remember(cid, m, data)
        return m

    def _remember(self, cid: str, m: Manifest, stored: bytes | None = None) -> None:
        """Cache ``m``; ``stored``: the object it was read from (what :meth:`fresh` compares with)."""
        with self._lock:
            self._manifests[cid] = m
            if stored is not None and m.format >= COMPACT_FORMAT:
                self._stored[cid] = digest(stored)
            else:
                self._stored.pop(cid, None)
            while len(self._manifests) > MANIFEST_CACHE:
                gone, _ = self._manifests.popitem(last=False)
                self._stored.pop(gone, None)

    def evict(self, cid: str) -> None:
        """Drop a cached manifest (its checkpoint is gone, or its chunks moved)."""
        with self._lock:
            self._manifests.pop(cid, None)
            self._stored.pop(cid, None)
            self._listed.pop(cid, None)

    def exists(self, cid: str) -> bool:
        """Whether checkpoint ``cid`` is committed and not deleted (its manifest decides)."""
        return self._storage.exists(manifest_key(cid))

    # -- writing -------------------------------------------------------------
    def writable(self) -> None:
        """Make sure writes keep the index: a format-1 bank is upgraded first (see :meth:`upgrade`).

        The index's log is made of refs (put-if-absent), so it needs a store
        that can hold refs. A format-1 bank on one that cannot (an fsspec
        store opened without ``conditional_writes=False``) stays format 1 and
        is written as before, by listing; a format-2 bank there raises the
        store's StorageError saying how to open it.
        """
        if self.indexed:
            try:
                self._storage.check_refs()
            except StorageError as e:
                raise StorageError(
                    f"{e} (a save writes the catalog index's log, which is made of refs)"
                ) from e
            if not self.compact_manifests:
                self.upgrade()  # layout 2 → 3: the index is there; the marker says format-3 manifests follow
            return
        try:
            self._storage.check_refs()
        except StorageError:
            return  # no refs here: no index either; the bank goes on as format 1
        self.upgrade()

    def _claim(self, make: Callable[[int], LogEntry]) -> LogEntry:
        """Write the next log entry (put-if-absent); the entry written."""
        for _ in range(256):
            gens = list_gens(self._storage)
            try:
                root = read_root(self._storage, gens[-1]) if gens else EMPTY_ROOT
            except IndexDamaged:
                root = None  # a damaged root: the sequence goes on after the log; a rebuild repairs the rest
            upto = root.upto if root is not None else 0
            try:
                head, _ = read_head(self._storage)
            except IndexDamaged:
                head = 0
            seq = max(max(list_seqs(self._storage), default=0), upto, head) + 1
            entry = make(seq)
            if not put_entry(self._storage, entry):
                continue  # taken: look again
            # A compaction that published after our look may already cover this number: then the
            # entry would never be read, so it is withdrawn and written again further on.
            now = list_gens(self._storage)
            if now[-1:] != gens[-1:]:
                try:
                    newest = read_root(self._storage, now[-1])
                except IndexDamaged:
                    newest = None
                if newest is not None and newest.upto >= seq and seq not in newest.held:
                    self._storage.delete(log_key(seq))
                    continue
            # If this fails the entry is there and its manifest is not (the caller stops): harmless.
            raise_head(self._storage, seq)
            self._upto = max(self._upto, upto)
            return entry
        raise CorruptObject(log_key(0), detail="could not claim a catalog log entry after 256 tries")

    def intend(self, cid: str, manifest: Manifest, save_ids: list[str], wrote: list[str]) -> LogEntry | None:
        """Record that ``cid`` is about to be committed (call just before its manifest is written).

        The entry written (None in a bank without an index): pass it to :meth:`add`.
        """
        if not self.indexed:
            return None
        record = CatalogRecord.of(cid, manifest)
        own = set(wrote)
        chunks = bloom.build(c.hash for c in manifest.chunks if manifest.packs[c.pack] in own)
        return self._claim(lambda seq: LogEntry(seq, ADD, cid, record, tuple(save_ids), tuple(wrote), chunks))

    def tombstone(self, cid: str) -> LogEntry | None:
        """Record that ``cid`` is being deleted (call before its manifest is removed); pass the entry to :meth:`forget`."""
        if not self.indexed:
            return None
        return self._claim(lambda seq: LogEntry(seq, DEL, cid))

    def _done(self, entry: LogEntry | None) -> None:
        """Tell readers ``entry``'s work is done (best effort: without it they look at the manifest)."""
        if entry is None:
            return
        with contextlib.suppress(Exception):
            mark_done(self._storage, entry, self._upto)

    def add(
        self, cid: str, manifest: Manifest, stored: bytes | None = None, entry: LogEntry | None = None
    ) -> None:
        """This process just committed ``cid`` (``stored``: its manifest object): see it without a refresh.

        ``entry``: the log entry :meth:`intend` wrote for it, now done.
        """
        self._done(entry)
        self._remember(cid, manifest, stored)
        with self._lock:
            view = self._view
            if isinstance(view, Snapshot):
                # A new picture, never the one other threads may be reading.
                self._view = dataclasses.replace(
                    view,
                    added={**view.added, cid: CatalogRecord.of(cid, manifest)},
                    hidden=view.hidden - {cid},
                )
            elif view is not None:
                self._listed[cid] = manifest
                self._view = ScanView({c: CatalogRecord.of(c, m) for c, m in self._listed.items()})

    def forget(self, cid: str, entry: LogEntry | None = None) -> None:
        """This process just deleted ``cid`` (``entry``: the one :meth:`tombstone` wrote, now done)."""
        self._done(entry)
        with self._lock:
            self._manifests.pop(cid, None)
            view = self._view
            if isinstance(view, Snapshot):
                added = dict(view.added)
                added.pop(cid, None)
                self._view = dataclasses.replace(view, added=added, hidden=view.hidden | {cid})
            elif view is not None and cid in self._listed:
                del self._listed[cid]
                self._view = ScanView({c: CatalogRecord.of(c, m) for c, m in self._listed.items()})

    def pending(self) -> int:
        """Log entries waiting to be compacted, as of the last picture."""
        view = self._view
        return len(view.entries) if isinstance(view, Snapshot) else 0

    def maybe_compact(self) -> CompactResult | None:
        """Compact when enough entries wait (a save calls this after its commit); never raises for the index."""
        if not self.indexed:
            return None
        try:
            if pending_count(self._storage, self._memo) < COMPACT_EVERY:
                return None
            return self.compact()
        except Exception:
            return None  # the next compaction folds the entries; a damaged index: `verify` says why

    def compact(self) -> CompactResult:
        """Fold the pending log entries into a new snapshot now."""
        self.writable()
        return compact(self._storage, self.get, self._pages)

    def rebuild(self) -> CompactResult:
        """Rebuild the index from a listing of every manifest (repair-index); unreadable manifests are left out."""
        scanned = (
            (cid, result) for cid, result in scan_manifests(self._storage) if isinstance(result, Manifest)
        )
        # An unreadable manifest can be neither loaded nor listed: the rebuilt index leaves it out
        # (``verify`` keeps naming it, and ``gc`` keeps refusing while it is there).
        done = rebuild(self._storage, scanned, self.get, self._pages)  # streams: the manifests are not kept
        self.refresh()
        return done

    def upgrade(self) -> bool:
        """Bring the bank to the newest layout (3); False if it was there already.

        Layout 1 gets its catalog index first; layout 2 has one, and only the
        marker changes (saves from then on write format-3 manifests; the
        older ones stay as they are, readable, their ids unchanged).
        Idempotent and crash-safe: the index is complete before the marker
        says so, and a crash before that leaves a layout-1 bank that upgrades
        again. Old weightbank releases refuse to open a newer layout; one that
        had it open already goes on writing checkpoints the index misses
        (``verify`` names them, ``repair_index`` adds them), so stop old
        writers before the upgrade — the automatic one on a first save too.
        """
        with self._lock:
            version = marker.bank_version(self._storage)
            if version >= marker.BANK_VERSION:
                self.indexed = True
                self.compact_manifests = version >= marker.COMPACT_VERSION
                return False
            if version >= marker.INDEXED_VERSION:
                marker.mark_indexed(self._storage)  # the index is complete already
                self.indexed = self.compact_manifests = True
                return True
            self.indexed = True
            try:
                self.rebuild()
            except BaseException:
                self.indexed = False
                raise
            marker.mark_indexed(self._storage)
            self.compact_manifests = True
            return True

    # -- dedup ---------------------------------------------------------------
    def chunk_finder(self) -> ChunkFinder:
        """Where the bank already holds a chunk, for a save's dedup (take it after the save's lease)."""
        return ChunkFinder(self, self._current())


class ChunkFinder:
    """Chunk hash → a location in a committed manifest, without reading every manifest.

    Looks in the manifests of the checkpoints committed since the last
    compaction, then in the chunk index's bucket for the hash. A bucket names
    the checkpoint that wrote each chunk; that checkpoint must still exist,
    and the location used is the one its manifest gives (its whole delta
    chain is listed there too). Every manifest it answers from is read after
    the save's lease began, which is what gc's safety argument needs.
    """

    def __init__(self, catalog: Catalog, view: View) -> None:
        self._catalog = catalog
        self._view = view
        self._lock = threading.Lock()
        self._known: dict[str, ChunkLocation] = {}
        self._buckets: dict[str, dict[str, str]] = {}
        # Each bucket's filter: a chunk it rules out is not in the bucket, which is then not read.
        self._filters: dict[str, bytes | None] = {}
        self._owners: dict[str, bool] = {}
        # Checkpoints committed since the last compaction, each with the filter of the chunks it wrote
        # (None: unknown), read only when a bucket misses a chunk their filter may hold.
        self._pending: dict[str, bytes | None] = {}
        if isinstance(view, Snapshot):
            filters = {e.id: e.chunks for e in view.entries.values() if e.op == ADD}
            self._pending = {cid: filters.get(cid) for cid in sorted(view.added)}
        # Format-3 manifests indexed from the listing's cache, whose locations must be read again
        # before one is used (a repack may have moved them): by hash, the checkpoint to ask.
        self._unchecked: dict[str, str] = {}
        if isinstance(view, ScanView):
            # The listing was taken after the lease began: each of these existed then.
            for cid in sorted(view.records):
                self._index(cid, listed=True)

    def _index(self, cid: str, *, listed: bool = False) -> bool:
        try:
            # Read now, after the lease began: it exists, and its locations are today's.
            m = self._catalog.get(cid) if listed else self._catalog.fresh(cid)
        except (MissingObject, CorruptObject, UnsupportedFormat, FileNotFoundError):
            return False
        if m is None:
            return False
        for c in m.chunks:
            if c.hash not in self._known:
                self._known[c.hash] = (m.packs[c.pack], c)
                if listed and m.format >= COMPACT_FORMAT:
                    self._unchecked[c.hash] = cid
        return True

    def _checked(self, h: str, loc: ChunkLocation | None) -> ChunkLocation | None:
        owner = self._unchecked.pop(h, None)
        if loc is None or owner is None:
            return loc
        try:
            m = self._catalog.fresh(owner)
        except (MissingObject, CorruptObject, UnsupportedFormat, FileNotFoundError):
            m = None
        rec = None if m is None else next((c for c in m.chunks if c.hash == h), None)
        self._known.pop(h, None)
        for k in [k for k, v in self._unchecked.items() if v == owner]:
            del self._unchecked[k]
            self._known.pop(k, None)  # gone, or to be taken from its fresh manifest below
        if m is not None:
            for c in m.chunks:
                self._known[c.hash] = (m.packs[c.pack], c)
        return None if m is None or rec is None else (m.packs[rec.pack], rec)

    def get(self, h: str) -> ChunkLocation | None:
        with self._lock:
            loc = self._known.get(h)
            if not isinstance(self._view, Snapshot):
                return self._checked(h, loc)
            if loc is not None:
                return loc
            b = h[:2]
            if b not in self._filters:
                self._filters[b] = self._view.bucket_filter(b)
            f = self._filters[b]
            if b not in self._buckets and (f is None or bloom.may_contain(f, h)):
                try:
                    self._buckets[b] = dict(self._view.bucket(b))
                except IndexDamaged:
                    self._buckets[b] = {}
            owner = self._buckets.get(b, {}).get(h)
            if owner is not None and owner not in self._owners:
                # Its manifest must exist now, after the lease began (a cached copy proves nothing).
                self._owners[owner] = self._index(owner)
            loc = self._known.get(h)
            if loc is None and self._pending:
                maybe = [c for c, f in self._pending.items() if f is None or bloom.may_contain(f, h)]
                for cid in maybe:
                    del self._pending[cid]
                    self._index(cid)
                loc = self._known.get(h)
            return loc


class _Guarded:
    """A snapshot's answers; a page found damaged while answering hands the question to a listing."""

    def __init__(self, catalog: Catalog, snap: Snapshot) -> None:
        self._catalog = catalog
        self._snap = snap

    def _ask(self, name: str, *args: object) -> Any:
        try:
            return getattr(self._snap, name)(*args)
        except IndexDamaged as e:
            return getattr(self._catalog._fall_back(e), name)(*args)

    def record(self, cid: str) -> CatalogRecord | None:
        return cast("CatalogRecord | None", self._ask("record", cid))

    def count(self) -> int:
        return cast(int, self._ask("count"))

    def run_count(self, run: str) -> int:
        return cast(int, self._ask("run_count", run))

    def run_names(self) -> list[str]:
        return cast("list[str]", self._ask("run_names"))

    def members(self, run: str) -> list[CatalogRecord]:
        return cast("list[CatalogRecord]", self._ask("members", run))

    def latest(self, run: str) -> CatalogRecord | None:
        return cast("CatalogRecord | None", self._ask("latest", run))

    def at_step(self, run: str, step: int) -> list[CatalogRecord]:
        return cast("list[CatalogRecord]", self._ask("at_step", run, step))

    def steps(self, run: str) -> list[int]:
        return cast("list[int]", self._ask("steps", run))

    def best(self, run: str, metric: str, mode: str) -> CatalogRecord | None:
        return cast("CatalogRecord | None", self._ask("best", run, metric, mode))

    def match(self, prefix: str) -> list[str]:
        return cast("list[str]", self._ask("match", prefix))

    def recent(self, n: int) -> list[CatalogRecord]:
        return cast("list[CatalogRecord]", self._ask("recent", n))

    def _stream(self, name: str, *args: str) -> Iterator[CatalogRecord]:
        seen: set[str] = set()
        try:
            for rec in getattr(self._snap, name)(*args):
                seen.add(rec.id)
                yield rec
        except IndexDamaged as e:
            for rec in getattr(self._catalog._fall_back(e), name)(*args):
                if rec.id not in seen:
                    yield rec

    def newest(self, run: str) -> Iterator[CatalogRecord]:
        return self._stream("newest", run)

    def everything(self) -> Iterator[CatalogRecord]:
        return self._stream("everything")
