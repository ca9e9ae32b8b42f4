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
   destination's packs, unless the destination holds that chunk standalone
   already, which is reused (dedup, as a save does);
3. the manifest is committed in the destination the way a save commits one
   (:func:`weightbank.bank.parts.publish`): the catalog entry, then the
   manifest object — the source's content byte for byte with a new location
   head, the commit point — then the lease is dropped.

A crash leaves the destination as a crashed save does: unreferenced packs
its gc frees. Format-1/2 checkpoints (ids over their locations) are refused:
they cannot move without a new id.

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

from ..errors import CorruptObject, InvalidArgument
from ..format.delta import DELTA
from ..format.hashing import digest
from ..format.manifest import ChunkRecord, Manifest
from ..format.stored import is_compact, open_segment, relocate, split_object
from ..storage.base import Storage
from . import leases
from .catalog import Catalog
from .chunks import decode_record, records_by_hash
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
        raise InvalidArgument(
            "ref",
            cid[:12],
            "a format-3 checkpoint (an older checkpoint's id covers where its chunks lie, so it cannot move)",
        )
    return read_compact(storage, cid)


def _checked(storage: Storage, cid: str, m: Manifest, index: dict[str, ChunkRecord]) -> None:
    """Every chunk a tensor is made of decodes from the source to its hash (bases are checked through them)."""
    for i in sorted({c for t in m.tensors for c in t.chunks}):
        rec = m.chunks[i]
        out = bytearray(rec.raw_len)
        decode_record(storage, m.packs, index, rec, memoryview(out))
        actual = digest(out)
        if actual != rec.hash:
            raise CorruptObject(
                m.packs[rec.pack], expected=rec.hash, actual=actual, checkpoint=cid, detail="copy read"
            )


def copy_checkpoint(src: Storage, dst: Storage, catalog: Catalog, cid: str) -> SaveStats | None:
    """Copy checkpoint ``cid`` from ``src`` into the bank ``dst`` (whose catalog is ``catalog``).

    None if ``dst`` has it already; else what the copy wrote and reused.
    """
    t0 = time.perf_counter()
    if catalog.exists(cid):
        return None
    data, m = _source(src, cid)
    content, _ = split_object(data, manifest_key(cid))
    index = records_by_hash(m)
    _checked(src, cid, m, index)
    save_id = leases.new_id()
    leases.acquire(dst, save_id)
    writer = PackWriter(dst, save_id)
    attempted = False  # once a manifest write was attempted, its packs stay (see parts.publish)
    try:
        catalog.refresh()  # after the lease: gc keeps what we find from here on
        known = catalog.chunk_finder()
        coded: dict[str, tuple[str, ChunkRecord]] = {}
        written = reused = new_chunks = reused_chunks = 0
        for rec in m.chunks:
            if rec.hash in coded:
                continue
            loc = known.get(rec.hash)
            if loc is not None and loc[1].codec != DELTA:
                coded[rec.hash] = loc  # a delta's base can be any coding of the same bytes
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
        attempted = True

        def not_committed() -> None:
            nonlocal attempted
            attempted = False

        merged = Merged(cid, new, b"", draft)
        _, _, stats = publish(dst, catalog, [part], merged, lease_held=True, not_committed=not_committed)
        return dataclasses.replace(stats, seconds=time.perf_counter() - t0)
    except BaseException:
        writer.abort()
        if not attempted:
            for key in writer.done:
                with contextlib.suppress(Exception):
                    dst.delete(key)
        raise
    finally:
        with contextlib.suppress(Exception):
            leases.release(dst, save_id)
