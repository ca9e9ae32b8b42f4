"""Copying checkpoints into another bank (another directory, another store) with their ids.

A format-3 id covers what a checkpoint *is* — its tree, tensors, chunk
hashes, metadata and parent — never where its bytes lie
(:mod:`weightbank.format.stored`). So a checkpoint copied into another bank
keeps its id, and with it its lineage link (the parent is content) and any
tag moved onto it there: moving a bank from a local disk to S3, or promoting
one checkpoint from a training bank to a serving bank, changes no name.

Per checkpoint (ancestors first when several are copied):

1. skipped when the destination has it already (a copy can be rerun);
2. under a lease in the destination (its gc keeps what the copy writes),
   every chunk the manifest lists is decoded from the source and its hash
   checked — a damaged source stops the copy before anything is committed —
   and its stored bytes (same codec, same delta chain) are appended to the
   destination's packs, unless the destination holds that chunk already,
   coded no deeper in a delta chain than the source codes it: then the
   destination's coding is reused with its whole chain (dedup, as a save
   does), so copying a lineage link by link writes each link once;
3. the manifest is committed in the destination the way a save commits one
   (:func:`weightbank.bank.parts.publish`): the catalog entry, then the
   manifest object — the source's content byte for byte with a new location
   head, the commit point — then the lease is dropped. Just before, the
   destination is asked again whether the checkpoint arrived meanwhile (a
   concurrent copy): then this copy drops its packs and reports it skipped,
   rather than replace a location head another writer's save may be using.

Reusing a destination chain never makes a cycle: a chain walked in the
destination is given up as soon as it would pass through a delta this copy
took from the source, so every link from the destination leads only to
destination links or standalone chunks, and the source's own links are
acyclic (checked as they are decoded).

A crash leaves the destination as a crashed save does: unreferenced packs
its gc frees. Format-1/2 checkpoints (ids over their locations) are refused
with :class:`NotMovable`: they cannot move without a new id.

Example:
    >>> import torch, weightbank as wb
    >>> src, dst = wb.open("memory://"), wb.open("memory://")
    >>> cid = src.save({"w": torch.arange(4.0)}, run="r", step=1, tags=["prod"]).id
    >>> report = src.copy_to(dst, "prod")
    >>> report.copied == (cid,), dst.resolve("prod") == cid, dst.load(cid)["w"].tolist()
    (True, True, [0.0, 1.0, 2.0, 3.0])
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from concurrent.futures import Executor

from ..errors import CorruptObject, NotMovable
from ..format.delta import DELTA
from ..format.hashing import digest
from ..format.manifest import ChunkRecord, Manifest
from ..format.stored import is_compact, open_segment, relocate, split_object
from ..storage.base import Storage
from . import leases, maintenance
from .catalog import Catalog, ChunkFinder, ChunkLocation
from .chunks import MAX_CHAIN, decode_record, records_by_hash
from .layout import manifest_key, segment_hash_from_key
from .listing import read_compact
from .parts import Merged, SavePart, publish
from .recode import recoded_manifest
from .repack import PackWriter
from .results import SaveStats

__all__ = ["copy_checkpoint"]


def _source(storage: Storage, cid: str) -> tuple[bytes, Manifest]:
    key = manifest_key(cid)
    data = storage.read(key)
    if not is_compact(data):
        raise NotMovable(cid)
    return read_compact(storage, cid)


def _depth(rec: ChunkRecord) -> int:
    return rec.args.depth if rec.codec == DELTA and rec.args is not None else 0


def _destination_chain(
    loc: ChunkLocation, known: ChunkFinder, coded: dict[str, ChunkLocation], from_source: set[str]
) -> list[tuple[str, ChunkLocation]] | None:
    """``loc`` and the links below it in the destination, to reuse; None when a link is missing or unsafe.

    The walk stops at a standalone chunk or at a link this copy placed already;
    it gives up at a delta this copy took from the source (reusing around it
    could close a cycle) and at anything longer than a chain may be.
    """
    out = [(loc[1].hash, loc)]
    seen = {loc[1].hash}
    cur = loc[1]
    while cur.codec == DELTA:
        base = cur.args.base if cur.args is not None else None
        if base is None or base in seen or len(out) > MAX_CHAIN:
            return None  # a revisit: the destination's answers changed under us (a repack there)
        seen.add(base)
        if base in coded:
            return None if base in from_source else out
        nxt = known.get(base)
        if nxt is None or nxt[1].raw_len != cur.raw_len:
            return None
        out.append((base, nxt))
        cur = nxt[1]
    return out


def _checked(
    storage: Storage, cid: str, m: Manifest, index: dict[str, ChunkRecord], pool: Executor | None
) -> None:
    """Every chunk a tensor is made of decodes from the source to its hash (bases are checked through them)."""

    def one(i: int) -> None:
        rec = m.chunks[i]
        out = bytearray(rec.raw_len)
        decode_record(storage, m.packs, index, rec, memoryview(out))
        actual = digest(out)
        if actual != rec.hash:
            raise CorruptObject(
                m.packs[rec.pack], expected=rec.hash, actual=actual, checkpoint=cid, detail="copy read"
            )

    todo = sorted({c for t in m.tensors for c in t.chunks})
    for _ in map(one, todo) if pool is None else pool.map(one, todo):
        pass


def copy_checkpoint(
    src: Storage, dst: Storage, catalog: Catalog, cid: str, pool: Executor | None = None
) -> SaveStats | None:
    """Copy checkpoint ``cid`` from ``src`` into the bank ``dst`` (whose catalog is ``catalog``).

    None if ``dst`` has it already; else what the copy wrote and reused.
    ``pool`` checks the source's chunks in parallel.
    """
    t0 = time.perf_counter()
    if catalog.exists(cid):
        return None
    data, m = _source(src, cid)
    content, _ = split_object(data, manifest_key(cid))
    index = records_by_hash(m)
    _checked(src, cid, m, index, pool)
    save_id = leases.new_id()
    leases.acquire(dst, save_id)
    writer = PackWriter(dst, save_id)
    attempted = False  # once a manifest write was attempted, its packs stay (see parts.publish)

    def drop_packs() -> None:
        for key in writer.done:
            with contextlib.suppress(Exception):
                dst.delete(key)

    try:
        catalog.refresh()  # after the lease: gc keeps what we find from here on
        known = catalog.chunk_finder()
        coded: dict[str, ChunkLocation] = {}
        from_source: set[str] = set()  # the deltas this copy takes from the source
        written = reused = new_chunks = reused_chunks = 0
        for rec in m.chunks:
            if rec.hash in coded:
                continue
            loc = known.get(rec.hash)
            # A delta's base can be any coding of the same bytes; a reused chain is no deeper than
            # ours, as it says and as walked (its links may come from several manifests).
            chain = None if loc is None else _destination_chain(loc, known, coded, from_source)
            if chain is not None and max(_depth(chain[0][1][1]), len(chain) - 1) <= _depth(rec):
                for h, link in chain:
                    coded.setdefault(h, link)
                reused += rec.raw_len
                reused_chunks += 1
                continue
            payload = src.read(m.packs[rec.pack], rec.offset, rec.stored_len)
            if len(payload) != rec.stored_len:
                raise CorruptObject(
                    m.packs[rec.pack], checkpoint=cid, detail=f"pack ends before offset {rec.offset}"
                )
            pkey, offset = writer.append(payload)
            coded[rec.hash] = (pkey, dataclasses.replace(rec, offset=offset))
            if rec.codec == DELTA:
                from_source.add(rec.hash)
            written += len(payload)
            new_chunks += 1
        writer.close()
        new = recoded_manifest(m, coded) or m
        draft = relocate(content, cid, new)
        if draft.cid != cid:
            raise CorruptObject(manifest_key(cid), checkpoint=cid, detail="content does not hash to its id")
        # The body segments (the content names them) come from the source, checked against their hashes.
        source_keys = {segment_hash_from_key(k): k for k in m.segments}
        segments = dict(draft.segments)
        for h, text in draft.segments.items():
            if not text:
                key = source_keys.get(h)
                if key is None:
                    raise CorruptObject(
                        manifest_key(cid), checkpoint=cid, detail=f"segment {h[:12]} unlisted"
                    )
                segments[h] = open_segment(src.read(key), h, key)
        draft = dataclasses.replace(draft, segments=segments)
        stats = SaveStats(
            written, reused, new_chunks, reused_chunks, len(writer.done), time.perf_counter() - t0
        )
        part = SavePart(save_id, m.chunk_size, tuple(writer.done), (), (), stats=stats)

        def not_committed() -> None:
            nonlocal attempted
            attempted = False

        maintenance.mark_readded(dst, cid)  # deleted there before: the entry must not undo this copy
        if dst.exists(manifest_key(cid)):  # a concurrent copy committed it: leave its head alone
            drop_packs()
            return None
        merged = Merged(cid, new, b"", draft)
        attempted = True
        _, _, stats = publish(dst, catalog, [part], merged, lease_held=True, not_committed=not_committed)
        return dataclasses.replace(stats, seconds=time.perf_counter() - t0)
    except BaseException:
        writer.abort()
        if not attempted:
            drop_packs()
        raise
    finally:
        with contextlib.suppress(Exception):
            leases.release(dst, save_id)
