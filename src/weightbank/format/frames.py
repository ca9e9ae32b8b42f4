"""zstd frames read back from storage, decompressed within a bound.

A frame's header may declare its decompressed size, and python-zstandard
allocates what it declares before ``max_output_size`` is looked at: a
sixteen-byte frame declaring 2**45 bytes is a MemoryError, a small one
declaring a few GiB takes them. Everything weightbank decompresses (chunk
payloads, manifest objects and segments, catalog pages) comes through here:
a declared size above the bound is refused before any allocation, and a
frame without one is streamed and cut off at the bound.

Example:
    >>> import zstandard
    >>> decompress(zstandard.ZstdCompressor().compress(b"abc"), 3, "k")
    b'abc'
    >>> from weightbank.errors import CorruptObject
    >>> try: decompress(zstandard.ZstdCompressor().compress(b"abcd"), 3, "k")
    ... except CorruptObject as e: print(e.detail)
    zstd frame declares 4 bytes, more than the 3 expected
"""

from __future__ import annotations

import zstandard

from ..errors import CorruptObject

__all__ = ["decompress"]

_STEP = 1 << 20


def decompress(
    data: bytes | memoryview,
    limit: int,
    key: str,
    what: str = "zstd frame",
    dctx: zstandard.ZstdDecompressor | None = None,
) -> bytes:
    """The bytes of the zstd frame ``data``, at most ``limit`` of them; CorruptObject (naming ``key``) otherwise.

    ``dctx``: a decompressor to reuse (a hot path keeps one per thread).
    """
    try:
        declared = zstandard.frame_content_size(data)
    except zstandard.ZstdError as e:
        raise CorruptObject(key, detail=f"{what} is not a zstd frame ({e})") from None
    if declared > limit:
        raise CorruptObject(key, detail=f"{what} declares {declared} bytes, more than the {limit} expected")
    dctx = dctx or zstandard.ZstdDecompressor()
    try:
        if declared >= 0:
            return dctx.decompress(data)  # exactly the declared size, or a ZstdError
        parts: list[bytes] = []
        total = 0
        with dctx.stream_reader(data) as reader:
            while chunk := reader.read(_STEP):
                total += len(chunk)
                if total > limit:
                    raise CorruptObject(key, detail=f"{what} holds more than the {limit} bytes expected")
                parts.append(chunk)
        return b"".join(parts)
    except zstandard.ZstdError as e:
        raise CorruptObject(key, detail=f"{what} does not decode ({e})") from None
    except MemoryError:
        raise CorruptObject(key, detail=f"{what} is too large to decode") from None
