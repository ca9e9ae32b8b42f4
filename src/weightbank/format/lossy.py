"""Opt-in lossy chunk codecs: int8 and fp8 (e4m3) with one scale per channel.

Only ever used when a caller asks (``bank.save(..., lossy="int8")``). A
channel is a row of the tensor's first dimension; a chunk may start or end
mid-row, so each (row ∩ chunk) segment gets its own float32 scale
(``absmax / 127`` for int8, ``absmax / 448`` for fp8 e4m3). The chunk's content
hash is the hash of the *dequantized* bytes — what a load returns — so loads and
``verify`` check lossy chunks exactly like lossless ones. Chunks holding NaN
or inf are not quantized (the caller stores them losslessly).

Payload layout (little-endian)::

    u8 version=1, u8 method (1 int8, 2 fp8), u8 dtype code, u8 codes mode (0 raw, 1 zstd),
    u32 row length, u32 phase (first element's position in its row), u32 segments,
    u64 elements, float32 scales[segments], codes

Example:
    >>> import numpy as np
    >>> from weightbank.format.lossy import quantize, dequantize
    >>> x = np.linspace(-1, 1, 64, dtype=np.float32)
    >>> q = quantize(memoryview(x.tobytes()), "float32", "int8", row=16, phase=0)
    >>> out = bytearray(256); dequantize(memoryview(q.payload), memoryview(out)); bytes(out) == q.raw
    True
    >>> q.stats.max_abs < 1 / 127
    True
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import zstandard

from ..errors import CorruptObject
from .frames import decompress

__all__ = [
    "LOSSY_CODECS",
    "LOSSY_DTYPES",
    "LossyStats",
    "Quantized",
    "dequantize",
    "quantizable",
    "quantize",
    "quantize_tensor",
]

#: Lossy codec names a caller may ask for.
LOSSY_CODECS = ("int8", "fp8")
#: Float dtypes the lossy codecs take (by manifest name), with their payload codes.
LOSSY_DTYPES = {"float32": 0, "bfloat16": 1, "float16": 2, "float64": 3}
_TORCH = {0: torch.float32, 1: torch.bfloat16, 2: torch.float16, 3: torch.float64}
_METHOD = {"int8": 1, "fp8": 2}
_QMAX = {1: 127.0, 2: 448.0}
_HEAD = struct.Struct("<BBBBIIIQ")
_VERSION = 1


@dataclass(frozen=True)
class LossyStats:
    """Error of one quantized chunk: max |x - x'|, Σ(x - x')², Σx² and element count."""

    max_abs: float
    sq_err: float
    sq_ref: float
    n: int


@dataclass(frozen=True)
class Quantized:
    """A quantized chunk: its payload, the dequantized raw bytes (hashed as its identity), its error."""

    payload: bytes
    raw: bytes
    stats: LossyStats


def _segments(n: int, row: int, phase: int) -> np.ndarray:
    """Start offsets of the (row ∩ chunk) segments of an ``n``-element chunk."""
    first = row - phase if phase else row
    return np.concatenate([[0], np.arange(first, n, row, dtype=np.int64)]).astype(np.int64)


def _scale_per_element(scales: np.ndarray, starts: np.ndarray, n: int) -> np.ndarray:
    lengths = np.diff(np.append(starts, n))
    return np.repeat(scales, lengths)


def _codes_to_float(method: int, codes: np.ndarray) -> np.ndarray:
    if method == 1:
        return codes.view(np.int8).astype(np.float32)
    return torch.from_numpy(codes.copy()).view(torch.float8_e4m3fn).float().numpy()


def _to_dtype(x: np.ndarray, code: int) -> bytes:
    t = torch.from_numpy(x).to(_TORCH[code])
    return t.view(torch.uint8).numpy().tobytes() if t.element_size() > 1 else t.numpy().tobytes()


def quantize(raw: memoryview, dtype: str, method: str, *, row: int, phase: int) -> Quantized | None:
    """Quantize a float chunk with per-(row ∩ chunk) scales; None if it holds NaN/inf or is empty."""
    code = LOSSY_DTYPES[dtype]
    m = _METHOD[method]
    x = torch.frombuffer(bytearray(raw), dtype=_TORCH[code]).float().numpy()
    n = x.size
    if n == 0 or not np.isfinite(x).all():
        return None
    row = max(1, row)
    phase %= row
    starts = _segments(n, row, phase)
    absmax = np.maximum.reduceat(np.abs(x), starts)
    scales = (absmax / np.float32(_QMAX[m])).astype(np.float32)
    scales[scales == 0] = 1.0
    s = _scale_per_element(scales, starts, n)
    if m == 1:
        codes = np.clip(np.rint(x / s), -127, 127).astype(np.int8).view(np.uint8)
    else:
        # e4m3fn has no inf: out-of-range casts give NaN, so clip rounding overshoot first.
        codes = (
            torch.from_numpy(np.clip(x / s, -448.0, 448.0)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
        )
    z: bytes = zstandard.ZstdCompressor(level=3).compress(codes)
    mode, body = (1, z) if len(z) < codes.size * 0.95 else (0, codes.tobytes())
    payload = b"".join(
        [_HEAD.pack(_VERSION, m, code, mode, row, phase, scales.size, n), scales.tobytes(), body]
    )
    deq = _codes_to_float(m, codes) * s
    out = _to_dtype(deq, code)
    # The error is measured against the dequantized values as stored (after the cast back).
    back = torch.frombuffer(bytearray(out), dtype=_TORCH[code]).float().numpy().astype(np.float64)
    err = back - x.astype(np.float64)
    stats = LossyStats(
        max_abs=float(np.abs(err).max()),
        sq_err=float(np.dot(err, err)),
        sq_ref=float(np.dot(x.astype(np.float64), x.astype(np.float64))),
        n=n,
    )
    return Quantized(payload, out, stats)


def dequantize(payload: memoryview, out: memoryview) -> None:
    """Decode a lossy payload into ``out`` (the dequantized chunk bytes)."""
    if len(payload) < _HEAD.size:
        raise CorruptObject("<chunk>", detail="lossy payload is shorter than its header")
    version, m, code, mode, row, phase, nseg, n = _HEAD.unpack_from(payload)
    if version != _VERSION or m not in _QMAX or code not in _TORCH or mode not in (0, 1) or row < 1:
        raise CorruptObject("<chunk>", detail="lossy payload header is invalid")
    isz = _TORCH[code].itemsize
    if n * isz != len(out) or phase >= row:
        raise CorruptObject("<chunk>", detail=f"lossy payload holds {n * isz} bytes, expected {len(out)}")
    starts = _segments(n, row, phase)
    pos = _HEAD.size + 4 * nseg
    if starts.size != nseg or len(payload) < pos:
        raise CorruptObject("<chunk>", detail="lossy payload scale table is damaged")
    scales = np.frombuffer(payload[_HEAD.size : pos], dtype=np.float32)
    body = payload[pos:]
    if mode == 1:
        body = memoryview(decompress(body, n, "<chunk>", "lossy codes"))
    if len(body) != n:
        raise CorruptObject("<chunk>", detail=f"lossy payload has {len(body)} codes, expected {n}")
    codes = np.frombuffer(body, dtype=np.uint8)
    # A damaged scale may be huge or not finite: the values are then garbage (the chunk hash, checked
    # on every read, says so), never a floating-point warning raised as an error.
    with np.errstate(over="ignore", invalid="ignore"):
        deq = _codes_to_float(m, codes) * _scale_per_element(scales, starts, n)
        out[:] = _to_dtype(deq, code)


def quantizable(t: torch.Tensor) -> bool:
    """Whether lossy codecs apply to ``t``: a float tensor of 2+ dims (1-D ones stay exact)."""
    return t.dim() >= 2 and t.numel() > 0 and t.dtype in _TORCH.values()


def quantize_tensor(t: torch.Tensor, method: str) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Per-output-channel quantization of a whole tensor, for export.

    Returns ``(codes, scale, error)``: int8 or float8_e4m3fn codes of ``t``'s
    shape, float32 scales of shape ``(rows, 1, ...)`` so ``codes.float() * scale``
    dequantizes, and ``{"codec", "max_abs", "rel_err"}`` measured against ``t``.

    Example:
        >>> import torch
        >>> codes, scale, err = quantize_tensor(torch.ones(2, 3), "int8")
        >>> codes.dtype, tuple(scale.shape), err["max_abs"] == 0.0
        (torch.int8, (2, 1), True)
    """
    if method not in _METHOD:
        raise ValueError(f"lossy method must be one of {LOSSY_CODECS}, not {method!r}")
    x = t.detach().to("cpu", torch.float32)
    absmax = x.abs().reshape(x.shape[0], -1).amax(dim=1)
    scale = (absmax / _QMAX[_METHOD[method]]).to(torch.float32)
    scale[scale == 0] = 1.0
    scale = scale.reshape(-1, *([1] * (x.dim() - 1)))
    if method == "int8":
        codes = torch.clamp(torch.round(x / scale), -127, 127).to(torch.int8)
    else:
        codes = torch.clamp(x / scale, -448.0, 448.0).to(torch.float8_e4m3fn)
    # Measured on what a user computes to dequantize: float32 codes × scale.
    err = (codes.float() * scale).double() - t.detach().cpu().double()
    ref = float(t.detach().cpu().double().norm())
    stats = {
        "codec": method,
        "max_abs": float(err.abs().max()),
        "rel_err": float(err.norm()) / ref if ref > 0 else 0.0,
    }
    return codes, scale, stats
