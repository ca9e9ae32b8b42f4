"""Chunking is exact for any layout; codecs round-trip bit-exact and refuse damaged payloads."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weightbank.errors import CorruptObject, UnsupportedFormat
from weightbank.format.chunking import byte_view, chunk_bytes, chunk_spans
from weightbank.format.codecs import RawCodec, ZstdCodec, get_codec


@given(nbytes=st.integers(0, 10_000), size=st.sampled_from([16, 64, 1000, 4096]))
def test_spans_cover_exactly(nbytes: int, size: int) -> None:
    spans = chunk_spans(nbytes, size)
    assert sum(e - s for s, e in spans) == nbytes
    assert all(e - s <= size for s, e in spans)
    assert all(spans[i][1] == spans[i + 1][0] for i in range(len(spans) - 1))


@given(
    rows=st.integers(1, 9),
    cols=st.integers(1, 9),
    transpose=st.booleans(),
    step=st.integers(1, 3),
    chunk=st.sampled_from([8, 16, 24, 64]),
    dtype=st.sampled_from([torch.float32, torch.int16, torch.float64, torch.uint8]),
)
@settings(max_examples=150, deadline=None)
def test_chunks_of_views_equal_contiguous_bytes(
    rows: int, cols: int, transpose: bool, step: int, chunk: int, dtype: torch.dtype
) -> None:
    base = torch.arange(rows * cols * 3).reshape(rows, cols * 3).to(dtype)
    view = base[:, ::step]
    if transpose:
        view = view.t()
    expect = bytes(byte_view(view.contiguous()).numpy())
    size = max(chunk // view.element_size(), 1) * view.element_size()
    got = b"".join(bytes(chunk_bytes(view, s, e)) for s, e in chunk_spans(len(expect), size))
    assert got == expect


@pytest.mark.parametrize("name", ["raw", "zstd"])
@given(data=st.binary(min_size=0, max_size=5000))
@settings(max_examples=100, deadline=None)
def test_codecs_round_trip(name: str, data: bytes) -> None:
    codec = get_codec(name)
    assert isinstance(codec, (RawCodec, ZstdCodec))  # the codecs that encode a chunk without the planner
    payload = codec.encode(memoryview(data))
    stored = data if payload is None else payload
    out = bytearray(len(data))
    get_codec("raw" if payload is None else name).decode(memoryview(stored), memoryview(out))
    assert bytes(out) == data


def test_zstd_declines_incompressible_and_detects_garbage() -> None:
    z = get_codec("zstd")
    assert isinstance(z, ZstdCodec)
    noise = torch.randint(0, 256, (10_000,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert z.encode(memoryview(noise.numpy().tobytes())) is None
    good = z.encode(memoryview(bytes(10_000)))
    assert good is not None
    with pytest.raises(CorruptObject):
        z.decode(memoryview(b"garbage" + good), memoryview(bytearray(10_000)))
    with pytest.raises(CorruptObject):
        z.decode(memoryview(good), memoryview(bytearray(9_999)))


def test_unknown_codec_is_a_format_error() -> None:
    with pytest.raises(UnsupportedFormat):
        get_codec("bitplanes-v9")
