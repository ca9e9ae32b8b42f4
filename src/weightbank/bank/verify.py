"""Checking a bank: every manifest against its id, every chunk against its hash, every mutable record.

Tags (their history and undo stack), run event logs, trash entries and
leases are sealed with a digest and parsed whole; a damaged one is reported,
as is a tag pointing at a checkpoint that no longer exists.

Every chunk a manifest lists is checked on its own, delta bases included: a
delta chunk is decoded through its whole chain and its final bytes hashed,
and each base is hashed too, so a damaged link is named, not just noticed.

Example:
    >>> import torch, weightbank as wb
    >>> bank = wb.open("memory://")
    >>> _ = bank.save({"w": torch.ones(3)})
    >>> bank.verify().ok
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from ..errors import CorruptObject, IndexDamaged, MissingObject, UnsupportedFormat, WeightbankError
from ..format.hashing import digest
from ..format.manifest import COMPACT_FORMAT, ChunkRecord, Manifest
from ..storage.base import Storage
from . import leases, maintenance, releases
from .catalog import Catalog
from .chunks import chain_of, decode_record, records_by_hash
from .events import EventLog
from .index.records import CatalogRecord
from .index.view import log_damage
from .layout import MANIFESTS, PACKS, SEGMENTS, manifest_key, tag_key
from .listing import scan_manifests
from .results import DuReport, VerifyProblem, VerifyReport
from .tags import TagStore

__all__ = ["disk_usage", "verify"]


def _check_chunk(
    storage: Storage,
    m: Manifest,
    index: dict[str, ChunkRecord],
    rec: ChunkRecord,
    full: bool,
    sizes: dict[str, int],
) -> str | None:
    pack = m.packs[rec.pack]
    size = sizes.get(pack)
    if size is None:
        return "missing"
    if rec.offset + rec.stored_len > size:
        return f"pack is {size} bytes, chunk needs {rec.offset + rec.stored_len}"
    if not full:
        return None
    out = bytearray(rec.raw_len)
    try:
        decode_record(storage, m.packs, index, rec, memoryview(out))
    except CorruptObject as e:
        return e.detail or str(e)
    actual = digest(out)
    return None if actual == rec.hash else f"hash mismatch: expected {rec.hash[:16]}…, got {actual[:16]}…"


def _read_plan(m: Manifest, rec: ChunkRecord, index: dict[str, ChunkRecord]) -> tuple[object, ...]:
    """What reading ``rec`` through manifest ``m`` does: every link's pack, place and coding.

    Two manifests that read a chunk the same way need it checked once; one that
    records the same hash elsewhere or coded otherwise is checked on its own.
    """
    try:
        chain = chain_of(rec, index)
    except CorruptObject:
        chain = [rec]
    return tuple((m.packs[c.pack], c.hash, c.raw_len, c.codec, c.offset, c.stored_len, c.args) for c in chain)


def _check_manifests(
    storage: Storage,
    targets: list[tuple[str, Manifest]],
    sizes: dict[str, int],
    seen: set[tuple[object, ...]],
    full: bool,
    pool: ThreadPoolExecutor,
) -> tuple[int, int, list[VerifyProblem]]:
    """Check every chunk of ``targets`` not checked already (``seen``); (chunks, bytes checked, problems)."""
    problems: list[VerifyProblem] = []
    work: list[tuple[str, str, ChunkRecord]] = []
    indexes: dict[str, dict[str, ChunkRecord]] = {}
    for cid, m in targets:
        index = indexes[cid] = records_by_hash(m)
        names: dict[str, str] = {}
        for t in m.tensors:
            for c in t.chunks:
                names.setdefault(m.chunks[c].hash, t.name)
        for t in m.tensors:
            for c in t.chunks:
                try:
                    chain = chain_of(m.chunks[c], index)
                except CorruptObject:
                    continue  # reported when the chunk itself is checked
                for link in chain[:-1]:
                    names.setdefault(link.hash, f"{t.name} (delta base)")
        for rec in m.chunks:
            where = _read_plan(m, rec, index)
            if where not in seen:
                seen.add(where)
                work.append((cid, names.get(rec.hash, ""), rec))
    manifests = dict(targets)

    def run(item: tuple[str, str, ChunkRecord]) -> tuple[str, str, ChunkRecord, str, str | None]:
        cid, name, rec = item
        pack = manifests[cid].packs[rec.pack]
        try:
            return cid, name, rec, pack, _check_chunk(storage, manifests[cid], indexes[cid], rec, full, sizes)
        except MissingObject:
            return cid, name, rec, pack, "missing"
        except WeightbankError as e:
            return cid, name, rec, pack, str(e)

    checked_bytes = 0
    for cid, name, rec, pack, problem in pool.map(run, work):
        checked_bytes += rec.raw_len
        if problem is not None and not storage.exists(manifest_key(cid)):
            continue  # deleted (and its data collected) while we looked: gone, not damaged
        if problem == "missing":
            problems.append(VerifyProblem("missing", pack, "pack is missing", checkpoint=cid, tensor=name))
        elif problem is not None:
            problems.append(VerifyProblem("corrupt", pack, problem, checkpoint=cid, tensor=name))
    return len(work), checked_bytes, problems


def verify(
    storage: Storage,
    catalog: Catalog,
    tags: TagStore,
    ids: Iterable[str] | None = None,
    *,
    full: bool = True,
    workers: int = 4,
) -> VerifyReport:
    """Check the named checkpoints (all when ``ids`` is None); ``full`` re-hashes every chunk.

    The whole bank is read from a listing of its manifests, a batch at a time
    (memory holds a batch and the set of chunks already checked), and the
    catalog index is compared with what the listing found.
    """
    problems: list[VerifyProblem] = []
    whole_bank = ids is None
    sizes = {info.key: info.size for info in storage.list(PACKS)}
    seen: set[tuple[object, ...]] = set()
    needed: set[str] = set()
    found: dict[str, CatalogRecord] = {}
    broken: list[str] = []
    n_checkpoints = n_chunks = checked_bytes = 0
    source: Iterable[tuple[str, Manifest | Exception]] = (
        scan_manifests(storage, workers=max(1, workers))
        if whole_bank
        else ((cid, _fresh(catalog, cid)) for cid in ids or [])
    )
    batch: list[tuple[str, Manifest]] = []
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:

        def flush() -> None:
            nonlocal n_chunks, checked_bytes
            c, b, p = _check_manifests(storage, batch, sizes, seen, full, pool)
            n_chunks, checked_bytes = n_chunks + c, checked_bytes + b
            problems.extend(p)
            batch.clear()

        for cid, result in source:
            if isinstance(result, Exception):
                broken.append(cid)
                problems.append(VerifyProblem("manifest", manifest_key(cid), str(result), checkpoint=cid))
                continue
            n_checkpoints += 1
            needed.update(result.packs)
            if whole_bank:
                found[cid] = CatalogRecord.of(cid, result)
            batch.append((cid, result))
            if len(batch) >= 256:
                flush()
        flush()
    if whole_bank:
        problems += _index_problems(storage, catalog, found, set(broken))
        problems += _record_problems(storage, set(found) | set(broken), tags)
    if whole_bank and not broken:  # with unreadable manifests, "unreferenced" cannot be known
        for key, size in sorted(sizes.items()):
            if key.endswith(".pack") and key not in needed:
                problems.append(
                    VerifyProblem("orphan", key, f"{size} bytes referenced by no checkpoint (gc removes it)")
                )
    return VerifyReport(
        checkpoints=n_checkpoints, chunks=n_chunks, bytes_checked=checked_bytes, problems=tuple(problems)
    )


def _index_problems(
    storage: Storage, catalog: Catalog, found: dict[str, CatalogRecord], broken: set[str]
) -> list[VerifyProblem]:
    """Where the catalog index disagrees with the manifests (``weightbank repair-index`` fixes every one)."""
    if not catalog.indexed:
        return []  # a format-1 bank has no index to disagree (`weightbank upgrade` gives it one)
    catalog.refresh()
    if catalog.damage is not None:
        return [
            VerifyProblem(
                "index", catalog.damage.key, f"{catalog.damage.detail} (run `weightbank repair-index`)"
            )
        ]
    view = catalog.view()
    listed = {r.id: r for r in view.everything()}
    if catalog.damage is not None:  # a page turned out damaged while it was read
        return [
            VerifyProblem(
                "index", catalog.damage.key, f"{catalog.damage.detail} (run `weightbank repair-index`)"
            )
        ]

    def problem(cid: str, detail: str) -> VerifyProblem:
        return VerifyProblem("index", manifest_key(cid), detail, checkpoint=cid)

    try:
        damaged = log_damage(storage)
    except IndexDamaged as e:
        damaged = [e]
    # Answers were right (the head's copies stood in for damaged entries), but a repair is due.
    out = [VerifyProblem("index", e.key, f"{e.detail} (run `weightbank repair-index`)") for e in damaged]
    # Each difference is checked against the manifest once more: a save or delete may have landed meanwhile.
    out += [
        problem(cid, "checkpoint missing from the catalog index")
        for cid in sorted(set(found) - set(listed))
        if catalog.exists(cid)
    ]
    out += [
        problem(cid, "the catalog index lists a deleted checkpoint")
        for cid in sorted(set(listed) - set(found) - broken)
        if not catalog.exists(cid)
    ]
    out += [
        problem(cid, "the catalog record differs from the manifest")
        for cid in sorted(set(listed) & set(found))
        if _differs(listed[cid], found[cid])
    ]
    return out


def _fresh(catalog: Catalog, cid: str) -> Manifest | Exception:
    """The manifest as stored now (a repack may have moved it since it was cached), or why not."""
    try:
        m = catalog.fresh(cid)
    except (CorruptObject, UnsupportedFormat) as e:
        return e
    return m if m is not None else MissingObject(manifest_key(cid), "the checkpoint was deleted")


def _differs(indexed: CatalogRecord, actual: CatalogRecord) -> bool:
    """Whether a record disagrees with its manifest. A format-3 record's packs and stored bytes are
    those at commit: a repack moves and re-codes chunks (the id stays) without rewriting the index,
    so they are not compared."""
    if actual.format >= COMPACT_FORMAT:

        def content(r: CatalogRecord) -> CatalogRecord:
            return dataclasses.replace(r, packs=(), stored_bytes=0)

        return content(indexed) != content(actual)
    return indexed != actual


def _record_problems(storage: Storage, ids: set[str], tags: TagStore) -> list[VerifyProblem]:
    """What is wrong with the bank's mutable records: tags (history, undo stack), event logs, trash, leases.

    Each record carries its own digest and is parsed whole, so a flipped byte
    anywhere in a tag's history or a run's events is found here, not later.
    """
    problems: list[VerifyProblem] = []
    for name in tags.names():
        try:
            rec, _ = tags.read(name)
        except CorruptObject as e:
            problems.append(VerifyProblem("tag", e.key, e.detail or str(e)))
            continue
        if rec is not None and rec.target is not None and rec.target not in ids:
            problems.append(
                VerifyProblem("tag", tag_key(name), f"points to missing checkpoint {rec.target[:12]}")
            )
    events = EventLog(storage)
    for run in events.runs():
        try:
            events.read(run)
        except CorruptObject as e:
            problems.append(VerifyProblem("events", e.key, e.detail or str(e)))
    problems += [
        VerifyProblem("trash", e.key, e.problem) for e in maintenance.read_trash(storage) if e.problem
    ]
    problems += [VerifyProblem("lease", x.key, x.problem) for x in leases.all_leases(storage) if x.problem]
    problems += [VerifyProblem("release", r.key, r.problem) for r in releases.read_all(storage) if r.problem]
    return problems


def disk_usage(storage: Storage, catalog: Catalog) -> DuReport:
    """Logical vs unique vs stored bytes of the whole bank (reads every manifest, a batch at a time)."""
    logical = n = 0
    unique: dict[str, tuple[int, int, str]] = {}
    needed: set[str] = set()
    for _, m in scan_manifests(storage):
        if not isinstance(m, Manifest):
            continue
        n += 1
        logical += m.nbytes
        needed.update(m.packs)
        for rec in m.chunks:
            unique.setdefault(rec.hash, (rec.raw_len, rec.stored_len, rec.codec))
    per_codec: dict[str, int] = {}
    per_codec_raw: dict[str, int] = {}
    for raw, stored, codec in unique.values():
        per_codec[codec] = per_codec.get(codec, 0) + stored
        per_codec_raw[codec] = per_codec_raw.get(codec, 0) + raw
    pack_bytes = orphan = 0
    for info in storage.list(PACKS):
        pack_bytes += info.size
        if info.key not in needed:
            orphan += info.size
    # A format-3 manifest is its object and its segments (shared between checkpoints: counted once).
    manifest_bytes = sum(info.size for prefix in (MANIFESTS, SEGMENTS) for info in storage.list(prefix))
    return DuReport(
        checkpoints=n,
        logical_bytes=logical,
        unique_bytes=sum(u[0] for u in unique.values()),
        stored_bytes=sum(u[1] for u in unique.values()),
        pack_bytes=pack_bytes,
        manifest_bytes=manifest_bytes,
        orphan_bytes=orphan,
        per_codec=per_codec,
        per_codec_raw=per_codec_raw,
    )
