"""Byte planes: a chunk's words regrouped by byte position, each plane coded on its own.

Float words are first rotated left by one bit (ZipNN's trick), so the top byte
of a bf16/fp32 word is exactly its exponent and the sign lands in bit 0. Then
byte ``p`` of every word goes to plane ``p``. The exponent plane has a few bits
of entropy and compresses well with zstd; low mantissa planes are noise and are
stored raw (zstd's incompressible-block detection makes trying cheap).

Both steps are bit permutations, so XOR commutes with them: a delta chain is
decoded entirely in plane space (XOR each link's planes in, then merge once).

A *sparse* payload (mostly-zero chunks and deltas) holds only the nonzero
words, plus their positions as gaps (uint32, themselves split into 4 planes:
gaps are small, so their upper planes vanish). Applying it costs time in
proportion to the words that changed, not to the chunk.

Payload layout (little-endian)::

    u8 version=1, u8 itemsize, u8 flags (1 rotated, 2 sparse), u8 0, u64 words
    [sparse: u64 nonzero words, 4 × (u8 mode, 3×u8 0, u32 bytes)]   # gap planes
    itemsize × (u8 mode, 3×u8 0, u32 bytes)                        # mode 0 raw, 1 zstd
    [gap planes' bytes], then each value plane's bytes in order

Split and merge run compiled, in one pass per chunk (``_cplanes.c``; numpy where it
is not built); they, zstd and numpy release the GIL, so a worker pool codes
chunks in parallel on every core.

Example:
    >>> import numpy as np
    >>> from weightbank.format.planes import WordLayout, encode_planes, decode_planes
    >>> raw = np.arange(1000, dtype=np.float32).tobytes()
    >>> lay = WordLayout(4, True)
    >>> out = bytearray(len(raw)); decode_planes(memoryview(encode_planes(memoryview(raw), lay)), memoryview(out))
    >>> bytes(out) == raw
    True
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zstandard

from ..errors import CorruptObject
from .frames import decompress

__all__ = [
    "COMPILED",
    "MIN_SAVING",
    "SPARSE_DENSITY",
    "WordLayout",
    "decode_planes",
    "decode_planes_into",
    "decode_scratch",
    "encode_planes",
    "encode_xor",
    "layout_for",
    "merge",
    "split",
]

_VERSION = 1
_ROTATED, _MASKED = 1, 2
_RAW, _ZSTD = 0, 1
_HEAD = struct.Struct("<BBBBQ")
_NNZ = struct.Struct("<Q")
_PLANE = struct.Struct("<B3xI")
_WORD: dict[int, Any] = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}

#: A plane (and a whole chunk) is kept compressed only if it shrinks by this much:
#: below it the decode time buys too little.
MIN_SAVING = 0.05
#: A chunk or delta whose share of nonzero words is at most this is coded sparse
#: (positions + the nonzero words only): applying it then costs time in
#: proportion to the changed words, and it is no larger than the dense form.
SPARSE_DENSITY = 0.25

# zstd tuned for byte planes (measured on MiniLM and randn planes): the FAST
# strategy with the smallest hash table and the longest minimum match finds
# almost no matches, leaving the plane to the literal Huffman coder, which is
# what planes need. On fp32 exponent planes: 2.60 bits/byte at ~770 MB/s,
# vs level 1: 2.88 bits at ~160 MB/s, level 3: 3.23 bits at ~110 MB/s
# (entropy 2.55; ZipNN's own Huffman 2.60). Frames are self-describing, so
# these parameters can change without a format change.
_PARAMS = zstandard.ZstdCompressionParameters(
    strategy=zstandard.STRATEGY_FAST,
    window_log=17,
    hash_log=6,
    search_log=1,
    min_match=7,
    write_content_size=True,
)
_local = threading.local()
# Measured on MiniLM: its position/word embeddings' low mantissa planes code to
# 40-75% with the fast parameters and 2-7% smaller at level 3 (~300 MB/s).
_STRUCTURED = 0.8


def _cctx() -> zstandard.ZstdCompressor:
    c: zstandard.ZstdCompressor | None = getattr(_local, "c", None)
    if c is None:
        c = _local.c = zstandard.ZstdCompressor(compression_params=_PARAMS)
    return c


def _l3ctx() -> zstandard.ZstdCompressor:
    c: zstandard.ZstdCompressor | None = getattr(_local, "c3", None)
    if c is None:
        c = _local.c3 = zstandard.ZstdCompressor(level=3)
    return c


def _dctx() -> zstandard.ZstdDecompressor:
    d: zstandard.ZstdDecompressor | None = getattr(_local, "d", None)
    if d is None:
        d = _local.d = zstandard.ZstdDecompressor()
    return d


@dataclass(frozen=True)
class WordLayout:
    """How a chunk's bytes form words: ``itemsize`` bytes each, float words rotated."""

    itemsize: int
    rotate: bool

    def words(self, nbytes: int) -> int:
        return nbytes // self.itemsize


_FLOAT_WORDS = {
    "float16": 2, "bfloat16": 2, "float32": 4, "float64": 8,
    "complex32": 2, "complex64": 4, "complex128": 8,
}  # fmt: skip
_INT_WORDS = {"int16": 2, "int32": 4, "int64": 8, "uint16": 2, "uint32": 4, "uint64": 8, "bits16": 2}


def layout_for(dtype: str) -> WordLayout:
    """The word layout for a dtype name (complex numbers are pairs of float words).

    Example:
        >>> layout_for("bfloat16"), layout_for("int8")
        (WordLayout(itemsize=2, rotate=True), WordLayout(itemsize=1, rotate=False))
    """
    if dtype in _FLOAT_WORDS:
        return WordLayout(_FLOAT_WORDS[dtype], True)
    return WordLayout(_INT_WORDS.get(dtype, 1), False)


def _fit(lay: WordLayout, nbytes: int) -> WordLayout:
    # Chunks are whole elements, so this only triggers for foreign callers.
    return lay if nbytes % lay.itemsize == 0 else WordLayout(1, False)


# The compiled coder (``_cplanes.c``) does split and merge in one pass per chunk outside the
# GIL; the numpy versions below write the same bytes and stand in where it is not built, or
# when WEIGHTBANK_PURE_PLANES=1 asks for them. The numpy ones use whole-word shifts and casts
# rather than strided byte copies: measured 2-4× faster in numpy than those.
try:
    from . import _cplanes
except ImportError:  # no C compiler at install time
    _cplanes = None  # type: ignore[assignment]

#: Whether byte planes are split and merged by the compiled coder (else numpy: same bytes, slower).
COMPILED = _cplanes is not None and os.environ.get("WEIGHTBANK_PURE_PLANES", "") in ("", "0")


def split(raw: memoryview | np.ndarray, lay: WordLayout, out: np.ndarray | None = None) -> np.ndarray:
    """The ``(itemsize, words)`` planes of ``raw``: a fresh, writable array, or ``out`` filled.

    ``out`` (a C-contiguous uint8 array of that shape) saves allocating and
    first-touching fresh pages, which costs more than the split itself.
    """
    a = np.frombuffer(raw, dtype=np.uint8) if not isinstance(raw, np.ndarray) else raw.view(np.uint8)
    isz = lay.itemsize
    n = a.size // isz
    if out is None:
        out = np.empty((isz, n), dtype=np.uint8)
    elif out.shape != (isz, n) or out.dtype != np.uint8 or not out.flags.c_contiguous:
        raise ValueError(f"split: out must be a contiguous uint8 array of shape {(isz, n)}")
    if isz == 1:
        out[0] = a
        return out
    if COMPILED and a.flags.c_contiguous:
        _cplanes.split(a, out, isz, lay.rotate)
        return out
    _split_numpy(a.view(_WORD[isz]), lay, out)
    return out


def _split_numpy(w: np.ndarray, lay: WordLayout, out: np.ndarray) -> None:
    tmp = np.empty(w.size, dtype=w.dtype)
    isz = lay.itemsize
    top = 8 * isz - 1
    for p in range(isz):
        if not lay.rotate:
            np.right_shift(w, 8 * p, out=tmp)
        elif p:
            # byte p of rotl(w, 1) is bits [8p-1, 8p+7) of w
            np.right_shift(w, 8 * p - 1, out=tmp)
        else:
            np.left_shift(w, 1, out=tmp)
            tmp |= np.right_shift(w, top)
        np.copyto(out[p], tmp, casting="unsafe")  # keeps the low byte


def merge(planes: np.ndarray | Sequence[np.ndarray], lay: WordLayout, out: memoryview | np.ndarray) -> None:
    """Write the words whose planes are ``planes`` into ``out`` (inverse of :func:`split`)."""
    o = np.frombuffer(out, dtype=np.uint8) if not isinstance(out, np.ndarray) else out.view(np.uint8)
    isz = lay.itemsize
    if isz == 1:
        o[:] = planes[0]
        return
    if COMPILED and o.flags.c_contiguous and o.flags.writeable:
        rows = [np.ascontiguousarray(planes[p], dtype=np.uint8) for p in range(isz)]
        _cplanes.merge(rows, o, lay.rotate)
        return
    w = o.view(_WORD[isz])
    np.copyto(w, planes[isz - 1])
    for p in range(isz - 2, -1, -1):
        w <<= 8
        w |= planes[p]
    if lay.rotate:
        low = np.left_shift(w, 8 * isz - 1)
        w >>= 1
        w |= low


def _pack_section(data: np.ndarray, *, retry: bool = False) -> tuple[int, bytes | memoryview]:
    """(mode, bytes) for one plane: zstd when it pays off, else the bytes as they are.

    ``retry``: a plane that turns out structured (fast coding < :data:`_STRUCTURED`
    of its size — e.g. low mantissa bytes of weights once stored at lower
    precision) is also tried at zstd level 3, whose match finder pays off there.
    """
    view = np.ascontiguousarray(data).data
    if data.size < 64:
        return _RAW, view
    z: bytes = _cctx().compress(view)
    if retry and len(z) < data.size * _STRUCTURED:
        z3: bytes = _l3ctx().compress(view)
        z = z3 if len(z3) < len(z) else z
    if len(z) <= data.size * (1.0 - MIN_SAVING):
        return _ZSTD, z
    return _RAW, view


_GAP_LAYOUT = WordLayout(4, False)


def _encode(
    planes: np.ndarray, lay: WordLayout, words: int, positions: np.ndarray | None, retry: bool
) -> bytes:
    parts: list[bytes | memoryview] = []
    flags = _ROTATED if lay.rotate else 0
    head = []
    if positions is not None:
        flags |= _MASKED
        head.append(_NNZ.pack(positions.size))
        gaps = np.diff(positions, prepend=-1).astype(np.uint32)
        for plane in split(gaps, _GAP_LAYOUT):
            mode, data = _pack_section(plane)
            head.append(_PLANE.pack(mode, len(data)))
            parts.append(data)
    for p in range(lay.itemsize):
        # The exponent plane is never "structured" in this sense: level 3 only loses there.
        mode, data = _pack_section(planes[p], retry=retry and not (lay.rotate and p == lay.itemsize - 1))
        head.append(_PLANE.pack(mode, len(data)))
        parts.append(data)
    return b"".join([_HEAD.pack(_VERSION, lay.itemsize, flags, 0, words), *head, *parts])


def _nonzero_words(planes: np.ndarray) -> np.ndarray:
    acc: np.ndarray = planes[0] != 0
    for p in range(1, planes.shape[0]):
        acc |= planes[p] != 0
    return acc


def _encode_maybe_sparse(planes: np.ndarray, lay: WordLayout, *, retry: bool) -> bytes:
    words = planes.shape[1]
    nz = _nonzero_words(planes)
    nnz = int(np.count_nonzero(nz))
    if nnz <= words * SPARSE_DENSITY and words < 1 << 32:
        positions = np.flatnonzero(nz)
        return _encode(planes[:, positions], lay, words, positions, retry)
    return _encode(planes, lay, words, None, retry)


#: The largest plane buffer a thread keeps for reuse: a bigger chunk gets a buffer of its own, so a
#: pool thread that once coded a 1 GiB chunk does not hold a 1 GiB buffer from then on.
SCRATCH_MAX = 64 << 20


def _reused(name: str, lay: WordLayout, nbytes: int) -> np.ndarray:
    if nbytes > SCRATCH_MAX:
        return np.empty((lay.itemsize, nbytes // lay.itemsize), dtype=np.uint8)
    buf: np.ndarray | None = getattr(_local, name, None)
    if buf is None or buf.size < nbytes:
        buf = np.empty(nbytes, dtype=np.uint8)
        setattr(_local, name, buf)
    return buf[:nbytes].reshape(lay.itemsize, nbytes // lay.itemsize)


def _scratch(lay: WordLayout, nbytes: int) -> np.ndarray:
    """This thread's reusable plane buffer for coding a chunk (the coded payload is a copy)."""
    return _reused("scratch", lay, nbytes)


def decode_scratch(lay: WordLayout, nbytes: int) -> np.ndarray:
    """This thread's reusable plane buffer for decoding a chunk; valid until its next call here.

    Fresh pages cost more to fault in than splitting or merging them, so a
    decode that merges its planes into the caller's buffer right away builds
    them here.
    """
    return _reused("dscratch", lay, nbytes)


def encode_planes(raw: memoryview, lay: WordLayout) -> bytes:
    """The plane payload of ``raw`` (sparse when mostly zero words). Always returns bytes.

    Whether it pays off against storing ``raw`` is the caller's call (see
    :data:`MIN_SAVING`).
    """
    lay = _fit(lay, len(raw))
    return _encode_maybe_sparse(split(raw, lay, _scratch(lay, len(raw))), lay, retry=True)


def encode_xor(raw: memoryview, base: np.ndarray, lay: WordLayout) -> bytes:
    """The plane payload of ``raw`` XOR the chunk whose planes are ``base`` (same layout and size)."""
    if base.shape != (lay.itemsize, len(raw) // lay.itemsize):
        raise ValueError(f"delta base has planes {base.shape}, chunk has {len(raw)} bytes of {lay}")
    planes = split(raw, lay, _scratch(lay, len(raw)))
    np.bitwise_xor(planes, base, out=planes)
    # Delta planes code best with the fast parameters (measured); no retry.
    return _encode_maybe_sparse(planes, lay, retry=False)


def is_sparse(payload: memoryview | bytes) -> bool:
    """Whether a plane payload is sparse (nonzero words and their positions only)."""
    return len(payload) >= _HEAD.size and bool(payload[2] & _MASKED)


def _section(payload: memoryview, pos: int, length: int, what: str) -> tuple[memoryview, int]:
    end = pos + length
    if end > len(payload):
        raise CorruptObject("<chunk>", detail=f"plane payload is truncated in its {what}")
    return payload[pos:end], end


def _unpack(mode: int, data: memoryview, size: int, what: str) -> np.ndarray:
    if mode == _RAW:
        if len(data) != size:
            raise CorruptObject("<chunk>", detail=f"{what} has {len(data)} bytes, expected {size}")
        return np.frombuffer(data, dtype=np.uint8)
    if mode != _ZSTD:
        raise CorruptObject("<chunk>", detail=f"{what} has unknown mode {mode}")
    out = decompress(data, size, "<chunk>", what, _dctx())
    if len(out) != size:
        raise CorruptObject("<chunk>", detail=f"{what} decodes to {len(out)} bytes, expected {size}")
    return np.frombuffer(out, dtype=np.uint8)


def read_layout(payload: memoryview) -> tuple[WordLayout, int]:
    """The word layout and word count a plane payload declares."""
    if len(payload) < _HEAD.size:
        raise CorruptObject("<chunk>", detail="plane payload is shorter than its header")
    version, isz, flags, _, words = _HEAD.unpack_from(payload)
    if version != _VERSION or isz not in _WORD or flags & ~(_ROTATED | _MASKED):
        raise CorruptObject("<chunk>", detail=f"plane payload header is invalid ({version}, {isz}, {flags})")
    return WordLayout(isz, bool(flags & _ROTATED)), words


def _parse(payload: memoryview) -> tuple[WordLayout, int, np.ndarray | None, list[np.ndarray]]:
    """(layout, words, sparse positions or None, the planes as arrays) of a plane payload.

    Raw planes are views into ``payload``; coded ones are decompressed. Every
    length and position is checked: CorruptObject for anything inconsistent.
    """
    lay, words = read_layout(payload)
    pos = _HEAD.size
    masked = bool(payload[2] & _MASKED)
    positions: np.ndarray | None = None
    count = words
    if masked:
        if len(payload) < pos + _NNZ.size:
            raise CorruptObject("<chunk>", detail="plane payload is truncated in its sparse header")
        (count,) = _NNZ.unpack_from(payload, pos)
        pos += _NNZ.size
        if count > words:
            raise CorruptObject("<chunk>", detail="sparse payload has more nonzero words than words")
    n_heads = lay.itemsize + (_GAP_LAYOUT.itemsize if masked else 0)
    heads = []
    for _ in range(n_heads):
        if len(payload) < pos + _PLANE.size:
            raise CorruptObject("<chunk>", detail="plane payload is truncated in its plane table")
        heads.append(_PLANE.unpack_from(payload, pos))
        pos += _PLANE.size
    if masked:
        gap_planes = []
        for p, (mode, length) in enumerate(heads[: _GAP_LAYOUT.itemsize]):
            data, pos = _section(payload, pos, length, f"gap plane {p}")
            gap_planes.append(_unpack(mode, data, count, f"gap plane {p}"))
        heads = heads[_GAP_LAYOUT.itemsize :]
        gaps = np.empty(count, dtype=np.uint32)
        merge(gap_planes, _GAP_LAYOUT, gaps)
        positions = np.cumsum(gaps, dtype=np.int64) - 1
        if count and (int(gaps.min()) < 1 or int(positions[-1]) >= words):
            raise CorruptObject("<chunk>", detail="sparse payload positions are out of order or range")
    planes = []
    for p, (mode, length) in enumerate(heads):
        data, pos = _section(payload, pos, length, f"plane {p}")
        planes.append(_unpack(mode, data, count, f"plane {p}"))
    if pos != len(payload):
        raise CorruptObject("<chunk>", detail=f"plane payload has {len(payload) - pos} trailing bytes")
    return lay, words, positions, planes


def decode_planes_into(payload: memoryview, acc: np.ndarray, lay: WordLayout, *, xor: bool) -> None:
    """Write (or with ``xor`` XOR) the planes of ``payload`` into ``acc`` (shape ``(itemsize, words)``).

    CorruptObject if the payload is damaged or does not match ``lay`` and ``acc``.
    """
    got, words, positions, planes = _parse(payload)
    if got != lay or acc.shape != (lay.itemsize, words):
        raise CorruptObject(
            "<chunk>", detail=f"plane payload is {got} × {words}, expected {lay} × {acc.shape[1]}"
        )
    for row, plane in zip(acc, planes, strict=True):
        if positions is None:
            if xor:
                np.bitwise_xor(row, plane, out=row)
            else:
                row[:] = plane
        elif xor:
            row[positions] ^= plane
        else:
            row.fill(0)
            row[positions] = plane


def decode_planes(payload: memoryview, out: memoryview) -> None:
    """Decode a standalone plane payload into ``out`` (exactly the chunk's raw length)."""
    lay, words, positions, planes = _parse(payload)
    if words * lay.itemsize != len(out):
        raise CorruptObject(
            "<chunk>", detail=f"plane payload holds {words * lay.itemsize} bytes, expected {len(out)}"
        )
    if positions is None:
        # Dense: merge straight from the payload's planes, no intermediate copy.
        merge(planes, lay, out)
        return
    acc = decode_scratch(lay, len(out))
    acc.fill(0)
    for row, plane in zip(acc, planes, strict=True):
        row[positions] = plane
    merge(acc, lay, out)
