"""A Bloom filter of the chunks one save wrote, carried in its catalog log entry.

A save that misses a chunk in its parent and in the compacted chunk index
must still find it among the checkpoints committed since the last
compaction. Reading all of their manifests (up to
:data:`~weightbank.bank.index.compact.COMPACT_EVERY`) made such a save cost
a few dozen reads more than one right after a compaction; the log entries
are read anyway, so each add entry carries this filter and a save reads only
the pending manifests whose filter may hold the chunk (about 1% false
positives; never a false negative).

The chunk hashes are BLAKE3 digests, uniform already: the filter's
``HASHES`` bit positions are slices of the hash itself. Stored as base64 of
the bit array; ``m`` (its length in bits) follows from the byte length.
The filter is a hint, read from an untrusted entry: a wrong one can only make
a save store a chunk again, never reuse one (what it reuses comes from a
manifest it read).

Example:
    >>> f = build(["ab" * 32, "cd" * 32])
    >>> may_contain(f, "ab" * 32), may_contain(f, "ef" * 32)
    (True, False)
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable

__all__ = ["BITS_PER_CHUNK", "BUCKET_BITS", "MAX_FILTER_BYTES", "build", "check", "encode", "may_contain"]

#: Bits per chunk (with HASHES positions: ~1% false positives).
BITS_PER_CHUNK = 10
HASHES = 7
#: A stored filter longer than this is refused as malformed (~6.7 million chunks).
MAX_FILTER_BYTES = 8 << 20
#: Bits per chunk of a chunk-index bucket's filter: ~0.07% false positives, so a save of all-new
#: chunks reads almost no bucket at all.
BUCKET_BITS = 16


def _positions(h: str, m: int) -> list[int]:
    # 7 slices of 8 hex digits (32 bits each) of a 64-digit hash.
    return [int(h[8 * i : 8 * i + 8], 16) % m for i in range(HASHES)]


def build(hashes: Iterable[str], bits_per_chunk: int = BITS_PER_CHUNK) -> bytes:
    """The filter of ``hashes`` (full hex digests): its bit array (stored as base64 by :func:`encode`)."""
    unique = sorted(set(hashes))
    nbytes = max(1, (len(unique) * bits_per_chunk + 7) // 8)
    bits = bytearray(nbytes)
    m = nbytes * 8
    for h in unique:
        for p in _positions(h, m):
            bits[p >> 3] |= 1 << (p & 7)
    return bytes(bits)


def encode(bits: bytes) -> str:
    """A filter as a log entry stores it."""
    return base64.b64encode(bits).decode()


def check(stored: object) -> bytes:
    """The bit array of a stored filter; ValueError/TypeError if it is not one."""
    if not isinstance(stored, str):
        raise TypeError("chunk filter is not a string")
    if len(stored) > (MAX_FILTER_BYTES * 4) // 3 + 4:
        raise ValueError("chunk filter is too long")
    try:
        bits = base64.b64decode(stored, validate=True)
    except binascii.Error as e:
        raise ValueError(f"chunk filter is not base64 ({e})") from None
    if not bits:
        raise ValueError("chunk filter is empty")
    return bits


def may_contain(bits: bytes, h: str) -> bool:
    """Whether the save whose filter this is may have written chunk ``h`` (False: it certainly did not)."""
    m = len(bits) * 8
    return all(bits[p >> 3] & (1 << (p & 7)) for p in _positions(h, m))
