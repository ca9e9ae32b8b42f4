"""Chunk codecs: how a chunk's raw bytes become the bytes stored in a pack.

Every chunk record in a manifest names its codec, so codecs can be added
without a format break (the byte-plane, delta, sparse and lossy codecs plug in
here). A codec may decline a chunk (``encode`` returns None) when coding would
not pay off; the chunk is then stored ``raw`` and costs nothing to decode.

Decoding is always followed by a hash check of the raw bytes against the
chunk's content hash, so a codec bug or a damaged payload is never returned.

Example:
    >>> from weightbank.format.codecs import get_codec
    >>> z = get_codec("zstd")
    >>> payload = z.encode(memoryview(bytes(1000)))
    >>> out = bytearray(1000); z.decode(memoryview(payload), memoryview(out)); out == bytes(1000)
    True
"""

from __future__ import annotations

import threading
from typing import Protocol

import zstandard

from ..errors import CorruptObject, UnsupportedFormat

__all__ = ["CODECS", "Codec", "RawCodec", "ZstdCodec", "get_codec"]


class Codec(Protocol):
    """Turns raw chunk bytes into stored bytes and back.

    Call order on save: ``encode`` (None = store raw). On load: ``decode`` into a
    buffer of exactly the raw length; the caller then verifies the hash.
    """

    name: str

    def encode(self, raw: memoryview) -> bytes | None:
        """Stored bytes for ``raw``, or None if this codec would not pay off."""

    def decode(self, payload: memoryview, out: memoryview) -> None:
        """Write the raw bytes of ``payload`` into ``out`` (exactly ``len(out)`` bytes)."""


class RawCodec:
    """Bytes stored as they are; loads read them straight into the destination."""

    name = "raw"

    def encode(self, raw: memoryview) -> bytes | None:
        return None

    def decode(self, payload: memoryview, out: memoryview) -> None:
        if len(payload) != len(out):
            raise CorruptObject(
                "<chunk>", detail=f"raw payload has {len(payload)} bytes, expected {len(out)}"
            )
        out[:] = payload


class ZstdCodec:
    """Plain zstd of the whole chunk, kept only when it saves at least ``min_saving``."""

    name = "zstd"

    def __init__(self, level: int = 3, min_saving: float = 0.05) -> None:
        self.level = level
        self.min_saving = min_saving
        self._local = threading.local()

    def _cctx(self) -> zstandard.ZstdCompressor:
        c: zstandard.ZstdCompressor | None = getattr(self._local, "c", None)
        if c is None:
            c = self._local.c = zstandard.ZstdCompressor(level=self.level)
        return c

    def encode(self, raw: memoryview) -> bytes | None:
        out: bytes = self._cctx().compress(raw)
        if len(out) > len(raw) * (1.0 - self.min_saving):
            return None
        return out

    def decode(self, payload: memoryview, out: memoryview) -> None:
        try:
            data = zstandard.ZstdDecompressor().decompress(payload, max_output_size=len(out))
        except zstandard.ZstdError as e:
            raise CorruptObject("<chunk>", detail=f"zstd payload does not decode: {e}") from e
        if len(data) != len(out):
            raise CorruptObject(
                "<chunk>", detail=f"zstd payload decodes to {len(data)} bytes, expected {len(out)}"
            )
        out[:] = data


CODECS: dict[str, Codec] = {"raw": RawCodec(), "zstd": ZstdCodec()}


def get_codec(name: str) -> Codec:
    """The codec registered as ``name``; UnsupportedFormat for a codec this version lacks."""
    codec = CODECS.get(name)
    if codec is None:
        raise UnsupportedFormat(f"codec {name!r}", name, sorted(CODECS))
    return codec
