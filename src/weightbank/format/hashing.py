"""Content hashes: BLAKE3-256, hex-encoded, over raw bytes.

BLAKE3 releases the GIL and uses SIMD, so hashing runs at memory speed on
every worker thread; large buffers are split across threads too.

Example:
    >>> from weightbank.format.hashing import digest
    >>> digest(b"abc")[:16]
    '6437b3ac38465133'
"""

from __future__ import annotations

import blake3

__all__ = ["HEX_LEN", "MIN_PREFIX", "digest", "is_digest"]

#: Length of a full hex digest.
HEX_LEN = 64
#: Shortest id prefix a ref may use.
MIN_PREFIX = 6
_THREADED_ABOVE = 8 << 20
_HEX = frozenset("0123456789abcdef")


def digest(data: bytes | bytearray | memoryview) -> str:
    """BLAKE3-256 hex digest of ``data`` (multi-threaded above 8 MiB)."""
    if len(data) >= _THREADED_ABOVE:
        return blake3.blake3(data, max_threads=blake3.blake3.AUTO).hexdigest()
    return blake3.blake3(data).hexdigest()


def is_digest(text: str) -> bool:
    """Whether ``text`` is a full lowercase hex digest."""
    return len(text) == HEX_LEN and set(text) <= _HEX
