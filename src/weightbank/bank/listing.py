"""The bank's truth, read the slow way: list ``manifests/`` and read every manifest.

The catalog index (:mod:`.index`) answers every ordinary call; this module is
what it is checked against and rebuilt from (``verify``, ``repair-index``,
``upgrade``), what ``gc`` reads (it must see every live manifest), and the
catalog's fallback while the index cannot be trusted. Every manifest is
checked against its id as it is read, then all of its content; a damaged
one (or one written by a newer weightbank) is reported apart so every other
checkpoint stays usable, and one deleted between the listing and the read
(a concurrent prune) is simply gone.

Example:
    >>> from weightbank.storage import open_storage
    >>> list(scan_manifests(open_storage("memory://")))
    []
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

from ..errors import CorruptObject, MissingObject, UnsupportedFormat
from ..format.hashing import digest
from ..format.manifest import Manifest
from ..format.stored import is_compact, open_object, open_segment
from ..storage.base import Storage
from .index.records import CatalogRecord
from .layout import (
    MANIFESTS,
    is_pack_key,
    is_segment_key,
    manifest_id_from_key,
    manifest_key,
    segment_hash_from_key,
)
from .retention import best_first, metric_value

__all__ = ["ScanView", "listed_ids", "read_compact", "read_manifest", "scan_manifests"]


def read_manifest(storage: Storage, cid: str, data: bytes | None = None) -> Manifest:
    """Read one manifest and check it against its id, then all of its content.

    A format-3 manifest's segments are read too (in parallel), each checked
    against its hash. CorruptObject for damaged bytes or a malformed manifest
    (a segment gone counts: the manifest cannot be read whole), UnsupportedFormat
    for one written by a newer weightbank, MissingObject if the manifest is gone.
    ``data``: the manifest object's bytes, when the caller has just read them.
    """
    key = manifest_key(cid)
    if data is None:
        data = storage.read(key)
    if is_compact(data):
        m = _read_compact(storage, key, cid, data)
    else:
        actual = digest(data)
        if actual != cid:
            raise CorruptObject(
                key, expected=cid, actual=actual, checkpoint=cid, detail="manifest bytes changed"
            )
        m = Manifest.from_bytes(data, key)
    bad = next((p for p in m.packs if not is_pack_key(p)), None)
    if bad is not None:
        raise CorruptObject(
            key, checkpoint=cid, detail=f"manifest names {bad[:80]!r}, which is not a pack key"
        )
    return m


def read_compact(storage: Storage, cid: str) -> tuple[bytes, Manifest]:
    """A format-3 manifest's stored object and the manifest (for a repack, which keeps its content).

    CorruptObject if the manifest is not format 3 (or is damaged).
    """
    key = manifest_key(cid)
    data = storage.read(key)
    if not is_compact(data):
        raise CorruptObject(key, checkpoint=cid, detail="not a format-3 manifest")
    return data, _read_compact(storage, key, cid, data)


class _Moved(Exception):
    """A segment the manifest object named is gone and the object changed: a repack rewrote its head."""

    def __init__(self, data: bytes) -> None:
        self.data = data


def _read_compact(storage: Storage, key: str, cid: str, data: bytes) -> Manifest:
    try:
        return _read_compact_once(storage, key, cid, data)
    except _Moved as moved:
        # Read it again, once: its new head names segments that exist (gc keeps them for a while).
        try:
            return _read_compact_once(storage, key, cid, moved.data, retry=False)
        except _Moved:
            raise CorruptObject(key, checkpoint=cid, detail="a segment of this manifest is gone") from None


def _read_compact_once(storage: Storage, key: str, cid: str, data: bytes, *, retry: bool = True) -> Manifest:
    opened = open_object(data, key, cid)
    bad = next((k for _, k, _ in opened.needed if not is_segment_key(k)), None)
    if bad is not None:
        raise CorruptObject(
            key, checkpoint=cid, detail=f"manifest names {bad[:80]!r}, which is not a segment key"
        )
    wrong = next((k for h, k, _ in opened.needed if segment_hash_from_key(k) != h), None)
    if wrong is not None:
        raise CorruptObject(key, checkpoint=cid, detail=f"segment key {wrong[:80]!r} names another hash")

    def one(need: tuple[str, str, int]) -> tuple[str, bytes]:
        h, k, n = need
        try:
            return h, open_segment(storage.read(k), h, k, n)
        except MissingObject:
            try:
                now = storage.read(key)
            except FileNotFoundError:
                raise MissingObject(key, "deleted while it was read") from None  # gone, and its data freed
            if retry and now != data:
                raise _Moved(now) from None
            raise CorruptObject(
                k, checkpoint=cid, detail=f"segment of checkpoint {cid[:12]} is gone"
            ) from None

    if len(opened.needed) > 2:
        with ThreadPoolExecutor(max_workers=min(8, len(opened.needed)), thread_name_prefix="wb-seg") as pool:
            texts = dict(pool.map(one, opened.needed))
    else:
        texts = dict(map(one, opened.needed))
    return opened.manifest(texts)


def listed_ids(storage: Storage) -> list[str]:
    """Ids of every manifest object under ``manifests/`` (sorted)."""
    out = set()
    for info in storage.list(MANIFESTS):
        cid = manifest_id_from_key(info.key)
        if cid is not None and info.key == manifest_key(cid):
            out.add(cid)
    return sorted(out)


def _try_read(storage: Storage, cid: str) -> Manifest | Exception | None:
    try:
        return read_manifest(storage, cid)
    except MissingObject:
        return None  # deleted (a concurrent prune) between listing and reading: gone, not broken
    except (CorruptObject, UnsupportedFormat) as e:
        return e


def scan_manifests(
    storage: Storage, ids: list[str] | None = None, *, workers: int = 8
) -> Iterator[tuple[str, Manifest | Exception]]:
    """Every listed manifest (or those of ``ids``) as it is read: (id, manifest or the error that makes it unreadable).

    Streams in batches, so memory holds a batch, never the whole bank.
    """
    todo = listed_ids(storage) if ids is None else list(ids)
    batch = 256
    with ThreadPoolExecutor(max_workers=max(1, min(workers, len(todo) or 1))) as pool:
        for i in range(0, len(todo), batch):
            part = todo[i : i + batch]
            for cid, result in zip(part, pool.map(lambda c: _try_read(storage, c), part), strict=True):
                if result is not None:
                    yield cid, result


class ScanView:
    """The catalog's queries answered from records made of every manifest (the fallback, and old banks).

    Same questions as :class:`~.index.view.Snapshot`, same answers.
    """

    def __init__(self, records: dict[str, CatalogRecord]) -> None:
        self.records = records
        self.by_run: dict[str, list[CatalogRecord]] = {}
        for rec in records.values():
            self.by_run.setdefault(rec.run, []).append(rec)
        for rows in self.by_run.values():
            rows.sort(key=lambda r: r.order)

    def record(self, cid: str) -> CatalogRecord | None:
        return self.records.get(cid)

    def count(self) -> int:
        return len(self.records)

    def run_count(self, run: str) -> int:
        return len(self.by_run.get(run, []))

    def run_names(self) -> list[str]:
        return sorted(self.by_run)

    def members(self, run: str) -> list[CatalogRecord]:
        return list(self.by_run.get(run, []))

    def newest(self, run: str) -> Iterator[CatalogRecord]:
        return reversed(self.by_run.get(run, []))

    def latest(self, run: str) -> CatalogRecord | None:
        rows = self.by_run.get(run)
        return rows[-1] if rows else None

    def at_step(self, run: str, step: int) -> list[CatalogRecord]:
        return [r for r in self.by_run.get(run, []) if r.step == step]

    def steps(self, run: str) -> list[int]:
        return sorted({r.step for r in self.by_run.get(run, []) if r.step is not None})

    def best(self, run: str, metric: str, mode: str) -> CatalogRecord | None:
        newest_first = self.by_run.get(run, [])[::-1]
        values = [metric_value(r.decoded_metrics(), metric) for r in newest_first]
        order = best_first(values, "max" if mode == "max" else "min")
        return newest_first[order[0]] if order else None

    def match(self, prefix: str) -> list[str]:
        return sorted(cid for cid in self.records if cid.startswith(prefix))

    def recent(self, n: int) -> list[CatalogRecord]:
        return sorted(self.records.values(), key=lambda r: (r.created, r.id), reverse=True)[:n]

    def everything(self) -> Iterator[CatalogRecord]:
        for run in self.run_names():
            yield from self.by_run[run]
