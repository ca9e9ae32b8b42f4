"""Reading stored chunks back: one payload, or a delta chunk's whole chain, decoded.

Shared by loads, ``verify`` and the save pipeline (which needs the parent's
chunk to code a delta against). A delta chunk's base is found by hash in the
*same* manifest's chunk table — the writer lists every base there, so ``gc``
keeps the base's pack alive as long as any manifest needs it.

Example:
    >>> from weightbank.bank.chunks import chain_of
    >>> from weightbank.format.manifest import ChunkRecord
    >>> key = ChunkRecord("k" * 64, 8, "planes", 0, 0, 8)
    >>> from weightbank.format.schema import DeltaArgs
    >>> link = ChunkRecord("d" * 64, 8, "delta", 0, 64, 4, DeltaArgs("k" * 64, 1))
    >>> [r.codec for r in chain_of(link, {key.hash: key, link.hash: link})]
    ['planes', 'delta']
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..errors import CorruptObject, MissingObject
from ..format.delta import DELTA, Link, chain_planes, decode_chain
from ..format.hashing import digest
from ..format.manifest import ChunkRecord, Manifest
from ..format.planes import WordLayout, merge
from ..storage.base import Storage

__all__ = ["MAX_CHAIN", "base_planes", "chain_of", "decode_record", "read_chain", "records_by_hash"]

#: No chain is followed further than this, whatever a manifest claims (guards against cycles).
MAX_CHAIN = 1024


def records_by_hash(manifest: Manifest) -> dict[str, ChunkRecord]:
    """hash → record of every chunk the manifest lists (delta bases included)."""
    out: dict[str, ChunkRecord] = {}
    for rec in manifest.chunks:
        out.setdefault(rec.hash, rec)
    return out


def chain_of(
    rec: ChunkRecord, index: Mapping[str, ChunkRecord], where: str = "<manifest>"
) -> list[ChunkRecord]:
    """``rec``'s chain, keyframe first (just ``[rec]`` for a standalone chunk)."""
    chain = [rec]
    while chain[-1].codec == DELTA:
        args = chain[-1].args
        base = args.base if args is not None else None
        if base is None or base not in index:
            raise CorruptObject(
                where,
                detail=f"delta chunk {chain[-1].hash[:12]} names base {str(base)[:12]!r}, "
                "which its manifest does not list",
            )
        if len(chain) >= MAX_CHAIN:
            raise CorruptObject(
                where, detail=f"delta chain of chunk {rec.hash[:12]} is longer than {MAX_CHAIN}"
            )
        chain.append(index[base])
    chain.reverse()
    return chain


def _read_payload(storage: Storage, key: str, rec: ChunkRecord) -> memoryview:
    payload = storage.read(key, rec.offset, rec.stored_len)
    if len(payload) != rec.stored_len:
        raise CorruptObject(key, detail=f"pack is truncated at offset {rec.offset}")
    return memoryview(payload)


def read_chain(storage: Storage, packs: Sequence[str], chain: Sequence[ChunkRecord]) -> list[Link]:
    """The stored payloads of a chain's links (MissingObject / CorruptObject name the pack)."""
    links: list[Link] = []
    for rec in chain:
        key = packs[rec.pack]
        try:
            links.append((rec.codec, _read_payload(storage, key, rec)))
        except MissingObject as e:
            raise MissingObject(key, f"holds chunk {rec.hash[:12]}") from e
    return links


def decode_record(
    storage: Storage,
    packs: Sequence[str],
    index: Mapping[str, ChunkRecord],
    rec: ChunkRecord,
    out: memoryview,
) -> None:
    """Decode chunk ``rec`` (following its delta chain) into ``out``; the caller verifies the hash.

    CorruptObject's key names the pack of the chunk itself.
    """
    key = packs[rec.pack]
    chain = chain_of(rec, index, key)
    links = read_chain(storage, packs, chain)
    try:
        decode_chain(links, None, out)
    except CorruptObject as e:
        where = "" if len(chain) == 1 else f" (delta chain of {len(chain)} links)"
        raise CorruptObject(key, detail=f"{e.detail or e}{where}") from None


def base_planes(
    storage: Storage,
    packs: Sequence[str],
    index: Mapping[str, ChunkRecord],
    rec: ChunkRecord,
    lay: WordLayout,
) -> np.ndarray:
    """The planes (in layout ``lay``) of chunk ``rec``, verified, for coding a delta against it.

    The merged bytes are hashed: a delta coded against a damaged base would
    only decode while the damage stays exactly as it is, so a damaged base
    raises CorruptObject and the caller codes the chunk standalone instead.
    """
    key = packs[rec.pack]
    links = read_chain(storage, packs, chain_of(rec, index, key))
    planes = chain_planes(links, lay, rec.raw_len)
    scratch = bytearray(rec.raw_len)
    merge(planes, lay, memoryview(scratch))
    actual = digest(scratch)
    if actual != rec.hash:
        raise CorruptObject(key, expected=rec.hash, actual=actual, detail="delta base is damaged")
    return planes
