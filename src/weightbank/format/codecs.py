"""Chunk codecs: how a chunk's raw bytes become the bytes stored in a pack.

Every chunk record in a manifest names its codec, so codecs can be added
without a format break; a reader that meets a codec it does not know refuses
with UnsupportedFormat ("upgrade weightbank"), never misreads. The codecs:

* ``raw`` — bytes as they are; local loads map them straight into tensors.
* ``zstd`` — plain zstd of the chunk (integer/bool data, and older banks).
* ``planes`` / ``sparse`` — byte planes (:mod:`.planes`), the lossless default
  for words of 2+ bytes; ``sparse`` is the same payload with a nonzero-word mask.
* ``delta`` — XOR against a base chunk, then planes (:mod:`.delta`); its args
  name the base, so it decodes only as part of a chain.
* ``int8`` / ``fp8`` — opt-in lossy, per-channel scales (:mod:`.lossy`).

Which codec a chunk gets is decided by :mod:`.planner`; a chunk that would
not shrink by a meaningful margin is stored ``raw`` and costs nothing to decode.

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
from .frames import decompress
from .lossy import LOSSY_CODECS, dequantize
from .planes import decode_planes

__all__ = ["CODECS", "Codec", "RawCodec", "ZstdCodec", "get_codec", "is_lossy"]


class Codec(Protocol):
    """Turns stored bytes back into raw chunk bytes.

    Call order on load: ``decode`` into a buffer of exactly the raw length; the
    caller then verifies the hash. Encoding is the planner's job
    (:mod:`.planner`), since it needs the chunk's dtype and, for deltas, a base.
    A ``delta`` chunk decodes only as part of its chain (:mod:`.delta`).
    """

    name: str

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
        data = decompress(payload, len(out), "<chunk>", "zstd payload")
        if len(data) != len(out):
            raise CorruptObject(
                "<chunk>", detail=f"zstd payload decodes to {len(data)} bytes, expected {len(out)}"
            )
        out[:] = data


class PlanesCodec:
    """Byte planes, each zstd-coded when it pays off (``sparse``: with a nonzero-word mask)."""

    def __init__(self, name: str) -> None:
        self.name = name

    def decode(self, payload: memoryview, out: memoryview) -> None:
        decode_planes(payload, out)


class DeltaCodec:
    """XOR against a base chunk; decoded by :func:`weightbank.format.delta.decode_chain`."""

    name = "delta"

    def decode(self, payload: memoryview, out: memoryview) -> None:
        raise CorruptObject("<chunk>", detail="a delta chunk decodes only together with its base chain")


class LossyCodec:
    """Opt-in int8 / fp8 with per-channel scales; decodes to the dequantized values."""

    def __init__(self, name: str) -> None:
        self.name = name

    def decode(self, payload: memoryview, out: memoryview) -> None:
        dequantize(payload, out)


CODECS: dict[str, Codec] = {
    "raw": RawCodec(),
    "zstd": ZstdCodec(),
    "planes": PlanesCodec("planes"),
    "sparse": PlanesCodec("sparse"),
    "delta": DeltaCodec(),
    **{name: LossyCodec(name) for name in LOSSY_CODECS},
}


def is_lossy(name: str) -> bool:
    """Whether chunks of codec ``name`` decode to approximations of what was saved."""
    return name in LOSSY_CODECS


def get_codec(name: str) -> Codec:
    """The codec registered as ``name``; UnsupportedFormat for a codec this version lacks."""
    codec = CODECS.get(name)
    if codec is None:
        raise UnsupportedFormat(f"codec {name!r}", name, sorted(CODECS))
    return codec
