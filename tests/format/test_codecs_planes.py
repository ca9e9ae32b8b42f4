"""Byte-plane, sparse and delta codecs round-trip bit-exact for every dtype and refuse damaged payloads."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weightbank.errors import CorruptObject
from weightbank.format.codecs import get_codec
from weightbank.format.delta import decode_chain
from weightbank.format.dtypes import SUPPORTED
from weightbank.format.planes import WordLayout, layout_for, merge, split
from weightbank.format.planner import CHAIN_BUDGET, MODES, Base, link_cost, plan_chunk
from weightbank.format.schema import DeltaArgs

DTYPES = sorted(SUPPORTED)

# Bit patterns a codec must carry through untouched: NaNs with payloads, ±inf,
# -0.0, denormals, extremes.
SPECIAL: dict[int, list[int]] = {
    2: [0x7E01, 0xFE55, 0x7C00, 0xFC00, 0x8000, 0x0001, 0x03FF, 0x7F80, 0xFF80, 0x7FC1, 0x0040, 0x7BFF],
    4: [0x7FC00001, 0xFFBADBAD, 0x7F800000, 0xFF800000, 0x80000000, 0x00000001, 0x007FFFFF, 0x7F7FFFFF],
    8: [0x7FF8000000000001, 0xFFF0000000000000, 0x8000000000000000, 0x0000000000000001, 0x000FFFFFFFFFFFFF],
}
_WORDS = {2: np.uint16, 4: np.uint32, 8: np.uint64}


@st.composite
def chunks(draw: st.DrawFn, dtype: str) -> bytes:
    """Raw bytes of a chunk of ``dtype``: odd sizes, mostly-zero or noisy or smooth, with special values."""
    isz = SUPPORTED[dtype].itemsize
    n = draw(st.integers(0, 700))
    kind = draw(st.sampled_from(["noise", "zeros", "smooth", "sparse"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    if kind == "noise":
        data = rng.integers(0, 256, n * isz, dtype=np.uint8)
    elif kind == "zeros":
        data = np.zeros(n * isz, dtype=np.uint8)
    elif kind == "smooth" and isz in _WORDS and layout_for(dtype).rotate:
        floats = {2: np.float16, 4: np.float32, 8: np.float64}[isz]
        data = (rng.standard_normal(n) * 0.02).astype(floats).view(np.uint8)
    else:
        data = np.zeros(n * isz, dtype=np.uint8)
        hit = rng.random(n) < 0.05
        data.reshape(n, isz)[hit] = rng.integers(0, 256, (int(hit.sum()), isz), dtype=np.uint8)
    if isz in SPECIAL and n:
        words = data.view(_WORDS[isz])
        picks = rng.integers(0, n, min(n, 12))
        words[picks] = rng.choice(np.array(SPECIAL[isz], dtype=_WORDS[isz]), picks.size)
    return data.tobytes()


def decode(codec: str, payload: bytes | memoryview, n: int) -> bytes:
    out = bytearray(n)
    get_codec(codec).decode(memoryview(payload), memoryview(out))
    return bytes(out)


@pytest.mark.parametrize("dtype", DTYPES)
@given(data=st.data())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_every_mode_round_trips_every_dtype(dtype: str, data: st.DataObject) -> None:
    raw = data.draw(chunks(dtype))
    for mode in MODES:
        enc = plan_chunk(memoryview(raw), dtype, mode)
        assert decode(enc.codec, enc.payload, len(raw)) == raw, (mode, enc.codec)
        if enc.codec != "raw":
            assert len(enc.payload) < len(raw), "a coded chunk is always smaller than raw"


@pytest.mark.parametrize(
    "dtype", ["float32", "bfloat16", "float16", "float64", "int64", "uint8", "complex64"]
)
@given(data=st.data())
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_delta_chains_round_trip(dtype: str, data: st.DataObject) -> None:
    first = data.draw(chunks(dtype))
    isz = SUPPORTED[dtype].itemsize
    lay = layout_for(dtype)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    versions = [first]
    for _ in range(data.draw(st.integers(1, 4))):
        nxt = np.frombuffer(versions[-1], dtype=np.uint8).copy()
        if nxt.size:
            flips = rng.integers(0, nxt.size, max(1, nxt.size // data.draw(st.sampled_from([3, 50, 1000]))))
            nxt[flips] ^= rng.integers(1, 256, flips.size, dtype=np.uint8)
        versions.append(nxt.tobytes())
    assert all(len(v) % isz == 0 for v in versions)
    links: list[tuple[str, memoryview]] = []
    base: Base | None = None
    for version in versions:
        enc = plan_chunk(memoryview(version), dtype, "auto", base, budget=100.0)
        if enc.codec != "delta":
            links = []
        links.append((enc.codec, memoryview(enc.payload)))
        out = bytearray(len(version))
        decode_chain(links, None, memoryview(out))
        assert bytes(out) == version
        depth = len(links) - 1
        cost = 0.0 if enc.args is None else enc.args.cost
        base = Base("h" * 64, depth, split(memoryview(version), lay), cost)


def test_planes_shrink_float_data_and_keep_noise_raw() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1 << 16, generator=g)
    enc = plan_chunk(memoryview(w.numpy().tobytes()), "float32")
    assert enc.codec == "planes" and len(enc.payload) < 0.87 * w.nbytes
    bf = w.bfloat16().view(torch.int16).numpy().tobytes()
    assert len(plan_chunk(memoryview(bf), "bfloat16").payload) < 0.72 * len(bf)
    noise = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8, generator=g).numpy().tobytes()
    assert plan_chunk(memoryview(noise), "float32").codec == "raw"


def test_mostly_zero_chunks_and_deltas_are_sparse() -> None:
    x = np.zeros(1 << 14, dtype=np.float32)
    x[::97] = 1.5
    enc = plan_chunk(memoryview(x.tobytes()), "float32")
    assert enc.codec == "sparse" and len(enc.payload) < x.nbytes / 20
    y = x.copy()
    y[5] = 2.0
    lay = layout_for("float32")
    base = Base("b" * 64, 0, split(memoryview(x.tobytes()), lay))
    delta = plan_chunk(memoryview(y.tobytes()), "float32", base=base, budget=100.0)
    assert delta.codec == "delta" and len(delta.payload) < 100
    assert type(delta.args) is DeltaArgs  # field by field below: the cost is a float, compared approximately
    assert (delta.args.base, delta.args.depth, delta.args.gen) == ("b" * 64, 1, 1)
    assert delta.args.cost == pytest.approx(link_cost(len(delta.payload), x.nbytes), abs=1e-4)


def test_chain_budget_forces_a_keyframe() -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randn(1 << 14, generator=g)
    b = a + 1e-3 * torch.randn(1 << 14, generator=g)
    lay = layout_for("float32")
    base = Base("a" * 64, 3, split(memoryview(a.numpy().tobytes()), lay), cost=CHAIN_BUDGET - 1e-3)
    enc = plan_chunk(memoryview(b.numpy().tobytes()), "float32", base=base)
    assert enc.codec == "planes", "a delta past the chain budget is not taken"


@pytest.mark.parametrize(
    "lay", [WordLayout(2, True), WordLayout(4, True), WordLayout(8, True), WordLayout(4, False)]
)
def test_split_merge_are_inverse_and_rotate_exponents_into_the_top_plane(lay: WordLayout) -> None:
    rng = np.random.default_rng(3)
    raw = rng.integers(0, 256, 4096 * lay.itemsize, dtype=np.uint8).tobytes()
    planes = split(memoryview(raw), lay)
    out = bytearray(len(raw))
    merge(planes, lay, memoryview(out))
    assert bytes(out) == raw
    if lay == WordLayout(4, True):
        f = np.array([1.0, -2.0, 0.5], dtype=np.float32)
        top = split(memoryview(f.tobytes()), lay)[3]
        assert top.tolist() == [127, 128, 126], "the top plane of an fp32 word is its exponent"


@pytest.mark.parametrize("codec", ["planes", "sparse", "delta-chain"])
@given(seed=st.integers(0, 2**32 - 1), where=st.floats(0, 1), bit=st.integers(0, 7))
@settings(max_examples=60, deadline=None)
def test_damaged_payloads_raise_or_change_the_bytes(codec: str, seed: int, where: float, bit: int) -> None:
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(3000) * 0.05).astype(np.float32)
    if codec == "sparse":
        x[rng.random(3000) < 0.9] = 0
    y = x.copy()
    y[::7] += 1e-4
    lay = layout_for("float32")
    if codec == "delta-chain":
        key = plan_chunk(memoryview(x.tobytes()), "float32")
        enc = plan_chunk(
            memoryview(y.tobytes()), "float32", base=Base("x" * 64, 0, split(memoryview(x.tobytes()), lay))
        )
        links = [(key.codec, bytes(key.payload)), (enc.codec, bytes(enc.payload))]
        expect = y.tobytes()
    else:
        enc = plan_chunk(memoryview(x.tobytes()), "float32")
        links = [(enc.codec, bytes(enc.payload))]
        expect = x.tobytes()
    assert links[-1][0] in ("planes", "sparse", "delta")
    victim = rng.integers(0, len(links))
    damaged = bytearray(links[victim][1])
    damaged[int(where * (len(damaged) - 1))] ^= 1 << bit
    links[victim] = (links[victim][0], bytes(damaged))
    out = bytearray(len(expect))
    # Damage must surface as CorruptObject or as different bytes (which the
    # chunk hash then rejects) — never as another exception or a crash.
    try:
        decode_chain([(c, memoryview(p)) for c, p in links], None, memoryview(out))
    except CorruptObject as e:
        assert "corrupt object" in str(e)
    else:
        assert len(out) == len(expect)
