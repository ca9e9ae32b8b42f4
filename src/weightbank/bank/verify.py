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

from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor

from ..errors import CorruptObject, MissingObject, WeightbankError
from ..format.hashing import digest
from ..format.manifest import ChunkRecord, Manifest
from ..storage.base import Storage
from . import leases, maintenance
from .catalog import Catalog
from .chunks import chain_of, decode_record, records_by_hash
from .events import EventLog
from .layout import MANIFESTS, PACKS, manifest_key, tag_key
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
        return str(e.args[0])
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


def verify(
    storage: Storage,
    catalog: Catalog,
    tags: TagStore,
    ids: Iterable[str] | None = None,
    *,
    full: bool = True,
    workers: int = 4,
) -> VerifyReport:
    """Check the named checkpoints (all when ``ids`` is None); ``full`` re-hashes every chunk."""
    catalog.refresh()
    problems: list[VerifyProblem] = []
    whole_bank = ids is None
    if whole_bank:
        for cid, err in sorted(catalog.broken.items()):
            problems.append(VerifyProblem("manifest", manifest_key(cid), str(err), checkpoint=cid))
        targets: list[tuple[str, Manifest]] = catalog.items()
    else:
        targets = [(cid, catalog.get(cid)) for cid in ids or []]
    sizes = {info.key: info.size for info in storage.list(PACKS)}
    seen: set[tuple[object, ...]] = set()
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
    checked_bytes = 0
    manifests = dict(targets)

    def run(item: tuple[str, str, ChunkRecord, str]) -> tuple[str, str, ChunkRecord, str, str | None]:
        cid, name, rec, pack = item
        try:
            return (
                cid,
                name,
                rec,
                pack,
                _check_chunk(storage, manifests[cid], indexes[cid], rec, full, sizes),
            )
        except MissingObject:
            return cid, name, rec, pack, "missing"
        except WeightbankError as e:
            return cid, name, rec, pack, str(e)

    items = [(cid, name, rec, manifests[cid].packs[rec.pack]) for cid, name, rec in work]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for cid, name, rec, pack, problem in pool.map(run, items):
            checked_bytes += rec.raw_len
            if problem is not None and not storage.exists(manifest_key(cid)):
                continue  # deleted (and its data collected) while we looked: gone, not damaged
            if problem is not None:
                if problem == "missing":
                    problems.append(
                        VerifyProblem("missing", pack, "pack is missing", checkpoint=cid, tensor=name)
                    )
                else:
                    problems.append(VerifyProblem("corrupt", pack, problem, checkpoint=cid, tensor=name))
    if whole_bank:
        problems += _record_problems(storage, catalog, tags)
    if whole_bank and not catalog.broken:  # with unreadable manifests, "unreferenced" cannot be known
        needed = {p for _, m in catalog.items() for p in m.packs}
        for key, size in sorted(sizes.items()):
            if key.endswith(".pack") and key not in needed:
                problems.append(
                    VerifyProblem("orphan", key, f"{size} bytes referenced by no checkpoint (gc removes it)")
                )
    return VerifyReport(
        checkpoints=len(targets), chunks=len(work), bytes_checked=checked_bytes, problems=tuple(problems)
    )


def _record_problems(storage: Storage, catalog: Catalog, tags: TagStore) -> list[VerifyProblem]:
    """What is wrong with the bank's mutable records: tags (history, undo stack), event logs, trash, leases.

    Each record carries its own digest and is parsed whole, so a flipped byte
    anywhere in a tag's history or a run's events is found here, not later.
    """
    problems: list[VerifyProblem] = []
    ids = set(catalog.ids()) | set(catalog.broken)
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
    return problems


def disk_usage(storage: Storage, catalog: Catalog) -> DuReport:
    """Logical vs unique vs stored bytes of the whole bank."""
    catalog.refresh()
    logical = 0
    unique: dict[str, tuple[int, int, str]] = {}
    needed: set[str] = set()
    for m in dict(catalog.items()).values():
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
    manifest_bytes = sum(info.size for info in storage.list(MANIFESTS))
    return DuReport(
        checkpoints=len(catalog.ids()),
        logical_bytes=logical,
        unique_bytes=sum(u[0] for u in unique.values()),
        stored_bytes=sum(u[1] for u in unique.values()),
        pack_bytes=pack_bytes,
        manifest_bytes=manifest_bytes,
        orphan_bytes=orphan,
        per_codec=per_codec,
        per_codec_raw=per_codec_raw,
    )
