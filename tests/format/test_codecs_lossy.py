"""Lossy int8/fp8 codecs: deterministic, within their recorded error, damaged payloads refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weightbank.errors import CorruptObject
from weightbank.format.codecs import get_codec, is_lossy
from weightbank.format.lossy import LOSSY_DTYPES, quantize

_TORCH = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}


@pytest.mark.parametrize("method", ["int8", "fp8"])
@pytest.mark.parametrize("dtype", sorted(LOSSY_DTYPES))
@given(n=st.integers(1, 3000), row=st.integers(1, 700), phase=st.integers(0, 699), seed=st.integers(0, 99))
@settings(max_examples=20, deadline=None)
def test_quantize_round_trips_its_own_bytes_within_the_recorded_error(
    method: str, dtype: str, n: int, row: int, phase: int, seed: int
) -> None:
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g) * torch.rand(1, generator=g) * 3).to(_TORCH[dtype])
    raw = x.view(torch.uint8).numpy().tobytes()
    q = quantize(memoryview(raw), dtype, method, row=row, phase=phase)
    assert q is not None and is_lossy(method)
    out = bytearray(len(raw))
    get_codec(method).decode(memoryview(q.payload), memoryview(out))
    assert bytes(out) == q.raw, "decoding reproduces the hashed bytes exactly"
    back = torch.frombuffer(bytearray(q.raw), dtype=_TORCH[dtype]).double()
    err = (back - x.double()).abs()
    assert float(err.max()) == pytest.approx(q.stats.max_abs, rel=1e-12, abs=1e-300)
    # Per-element bound: half a quantization step of int8 (absmax/254) or fp8 e4m3's 2^-4 relative
    # step, plus the rounding of the cast back to the tensor's dtype, and of the scales, which are
    # float32 (so float64 values cannot do better than float32's rounding).
    absmax = float(x.double().abs().max())
    cast = {"float32": 2**-23, "float64": 2**-23, "bfloat16": 2**-8, "float16": 2**-11}[dtype] * absmax
    step = absmax / 254 if method == "int8" else absmax * 2**-4
    assert q.stats.max_abs <= step + cast + 1e-12
    assert q.stats.n == n and q.stats.sq_err <= q.stats.sq_ref * 0.01 + 1e-12


def test_non_finite_chunks_are_not_quantized() -> None:
    x = np.array([1.0, np.nan, 2.0], dtype=np.float32)
    assert quantize(memoryview(x.tobytes()), "float32", "int8", row=3, phase=0) is None
    x = np.array([1.0, np.inf], dtype=np.float32)
    assert quantize(memoryview(x.tobytes()), "float32", "fp8", row=2, phase=0) is None


def test_per_channel_scales_follow_rows() -> None:
    # Row 0 is tiny, row 1 huge: with per-row scales row 0 keeps its precision.
    x = np.concatenate([np.linspace(-1e-3, 1e-3, 100), np.linspace(-1e3, 1e3, 100)]).astype(np.float32)
    q = quantize(memoryview(x.tobytes()), "float32", "int8", row=100, phase=0)
    assert q is not None
    back = np.frombuffer(q.raw, dtype=np.float32)
    assert np.abs(back[:100] - x[:100]).max() <= 1e-3 / 127
    assert len(q.payload) < x.nbytes / 3


@given(seed=st.integers(0, 2**32 - 1), where=st.floats(0, 1), bit=st.integers(0, 7))
@settings(max_examples=50, deadline=None)
def test_damaged_lossy_payloads_raise_only_corrupt_object(seed: int, where: float, bit: int) -> None:
    x = np.random.default_rng(seed).standard_normal(500).astype(np.float32)
    q = quantize(memoryview(x.tobytes()), "float32", "int8", row=64, phase=5)
    assert q is not None
    damaged = bytearray(q.payload)
    damaged[int(where * (len(damaged) - 1))] ^= 1 << bit
    out = bytearray(x.nbytes)
    try:
        get_codec("int8").decode(memoryview(bytes(damaged)), memoryview(out))
    except CorruptObject as e:
        assert "lossy" in str(e)
    else:
        assert len(out) == x.nbytes


@pytest.mark.parametrize("scale", [np.finfo(np.float32).max, np.inf, np.nan])
def test_a_damaged_scale_gives_garbage_values_never_a_floating_point_error(scale: float) -> None:
    """Found by the property above: a bit flip that makes a scale huge overflowed in the multiply."""
    from weightbank.format.lossy import _HEAD

    x = np.random.default_rng(0).standard_normal(500).astype(np.float32)
    q = quantize(memoryview(x.tobytes()), "float32", "int8", row=64, phase=5)
    assert q is not None
    damaged = bytearray(q.payload)
    damaged[_HEAD.size : _HEAD.size + 4] = np.float32(scale).tobytes()
    out = bytearray(x.nbytes)
    get_codec("int8").decode(memoryview(bytes(damaged)), memoryview(out))  # warnings are errors here
    assert not np.isfinite(np.frombuffer(out, dtype=np.float32)[:5]).all()
