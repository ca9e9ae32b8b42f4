"""The bank's view of its committed checkpoints: every manifest, cached and hash-checked.

A manifest is committed once its object exists; the catalog lists
``manifests/`` and reads only the ones it has not seen (manifests are
immutable, so a cached copy never goes stale — it can only disappear, when
pruned). Every manifest is checked against its id (the hash of its bytes) as
it is read, then all of its content; damaged ones (and ones written by a
newer weightbank) are kept aside in :attr:`Catalog.broken` for ``verify`` and
never used, so one bad manifest leaves every other checkpoint usable. A
manifest deleted between the listing and the read (a concurrent prune) is
simply gone, not broken.

Example:
    >>> from weightbank.storage import open_storage
    >>> from weightbank.bank.catalog import Catalog
    >>> Catalog(open_storage("memory://")).ids()
    []
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from ..errors import CorruptObject, MissingObject, UnsupportedFormat
from ..format.hashing import digest
from ..format.manifest import ChunkRecord, Manifest
from ..storage.base import Storage
from .layout import MANIFESTS, is_pack_key, manifest_id_from_key, manifest_key

__all__ = ["Catalog", "ChunkLocation"]

ChunkLocation = tuple[str, ChunkRecord]
"""A chunk's pack key and record, as found in some committed manifest."""


def read_manifest(storage: Storage, cid: str) -> Manifest:
    """Read one manifest and check it against its id, then all of its content.

    CorruptObject for damaged bytes or a malformed manifest, UnsupportedFormat
    for one written by a newer weightbank, MissingObject if it is gone.
    """
    key = manifest_key(cid)
    data = storage.read(key)
    actual = digest(data)
    if actual != cid:
        raise CorruptObject(key, expected=cid, actual=actual, checkpoint=cid, detail="manifest bytes changed")
    m = Manifest.from_bytes(data, key)
    bad = next((p for p in m.packs if not is_pack_key(p)), None)
    if bad is not None:
        raise CorruptObject(
            key, checkpoint=cid, detail=f"manifest names {bad[:80]!r}, which is not a pack key"
        )
    return m


class Catalog:
    """Cached, verified manifests of one bank, refreshed by listing."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._lock = threading.RLock()
        self._manifests: dict[str, Manifest] = {}
        self._chunks: dict[str, ChunkLocation] = {}
        self._chunks_of: set[str] = set()
        self.broken: dict[str, Exception] = {}

    def refresh(self) -> None:
        """Pick up manifests committed (or removed) since the last refresh."""
        listed = set()
        for info in self._storage.list(MANIFESTS):
            cid = manifest_id_from_key(info.key)
            if cid is not None and info.key == manifest_key(cid):
                listed.add(cid)
        with self._lock:
            gone = set(self._manifests) - listed
            for cid in gone:
                del self._manifests[cid]
            if gone & self._chunks_of:
                self._chunks.clear()
                self._chunks_of.clear()
            for cid in set(self.broken) - listed:
                del self.broken[cid]
            new = sorted(listed - set(self._manifests) - set(self.broken))
        if not new:
            return
        with ThreadPoolExecutor(max_workers=min(8, len(new))) as pool:
            results = list(pool.map(self._try_read, new))
        with self._lock:
            for cid, result in zip(new, results, strict=True):
                if isinstance(result, Manifest):
                    self._manifests[cid] = result
                elif result is not None:
                    self.broken[cid] = result

    def _try_read(self, cid: str) -> Manifest | Exception | None:
        try:
            return read_manifest(self._storage, cid)
        except MissingObject:
            return None  # deleted (a concurrent prune) between listing and reading: gone, not broken
        except (CorruptObject, UnsupportedFormat) as e:
            return e

    def get(self, cid: str) -> Manifest:
        """The manifest of ``cid`` (read on a cache miss). Raises CorruptObject/MissingObject."""
        with self._lock:
            m = self._manifests.get(cid)
            err = self.broken.get(cid)
        if m is not None:
            return m
        if err is not None:
            raise err
        m = read_manifest(self._storage, cid)
        with self._lock:
            self._manifests[cid] = m
        return m

    def add(self, cid: str, manifest: Manifest) -> None:
        """Record a manifest this process just committed."""
        with self._lock:
            self._manifests[cid] = manifest
            if self._chunks_of:
                self._index([cid])

    def forget(self, cid: str) -> None:
        with self._lock:
            self._manifests.pop(cid, None)
            if cid in self._chunks_of:
                self._chunks.clear()
                self._chunks_of.clear()

    def ids(self) -> list[str]:
        with self._lock:
            return sorted(self._manifests)

    def items(self) -> list[tuple[str, Manifest]]:
        with self._lock:
            return sorted(self._manifests.items())

    def runs(self) -> dict[str, list[tuple[str, Manifest]]]:
        """Checkpoints grouped by run, each list oldest first."""
        out: dict[str, list[tuple[str, Manifest]]] = {}
        for cid, m in self.items():
            out.setdefault(m.run, []).append((cid, m))
        for lst in out.values():
            lst.sort(key=lambda x: (x[1].created, x[1].step if x[1].step is not None else -1, x[0]))
        return out

    def chunk_index(self) -> dict[str, ChunkLocation]:
        """chunk hash → where a committed manifest says it lives (for dedup on save).

        A snapshot: another thread's ``refresh``/``forget`` clears the live index,
        and a save must keep seeing every chunk it saw when it began.
        """
        with self._lock:
            missing = [cid for cid in self._manifests if cid not in self._chunks_of]
            if missing:
                self._index(missing)
            return dict(self._chunks)

    def _index(self, cids: Iterable[str]) -> None:
        for cid in cids:
            m = self._manifests[cid]
            for c in m.chunks:
                if c.hash not in self._chunks:
                    self._chunks[c.hash] = (m.packs[c.pack], c)
            self._chunks_of.add(cid)
