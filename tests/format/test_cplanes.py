"""The compiled plane coder writes exactly the numpy path's bytes, for every word size and buffer."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weightbank.format import planes
from weightbank.format.planes import WordLayout, encode_planes, encode_xor, merge, split

cplanes = pytest.importorskip("weightbank.format._cplanes", reason="the compiled plane coder is not built")

LAYOUTS = [WordLayout(k, rot) for k in (2, 4, 8) for rot in (False, True)]
_WORDS = {2: np.uint16, 4: np.uint32, 8: np.uint64}


def _numpy_split(raw: np.ndarray, lay: WordLayout) -> np.ndarray:
    out = np.empty((lay.itemsize, raw.size // lay.itemsize), dtype=np.uint8)
    planes._split_numpy(raw.view(_WORDS[lay.itemsize]), lay, out)
    return out


@given(
    lay=st.sampled_from(LAYOUTS),
    words=st.integers(0, 3000),
    offset=st.integers(0, 7),
    seed=st.integers(0, 2**32 - 1),
    special=st.booleans(),
)
@settings(max_examples=150, deadline=None)
def test_compiled_split_and_merge_match_numpy(
    lay: WordLayout, words: int, offset: int, seed: int, special: bool
) -> None:
    assert planes.COMPILED, "the compiled coder is built but switched off (WEIGHTBANK_PURE_PLANES)"
    rng = np.random.default_rng(seed)
    k = lay.itemsize
    buf = rng.integers(0, 256, words * k + offset, dtype=np.uint8)
    raw = buf[offset:]  # unaligned words: the C side reads them with memcpy
    if special and words:
        # all-ones, sign-only and lowest-bit words: the bits the rotation moves
        picks = rng.integers(0, words, min(words, 16))
        vals = [2 ** (8 * k) - 1, 1 << (8 * k - 1), 1, 0]
        raw.view(np.uint8).reshape(words, k)[picks] = np.frombuffer(
            np.array([vals[i % 4] for i in range(picks.size)], dtype=_WORDS[k]).tobytes(), np.uint8
        ).reshape(-1, k)
    expect = _numpy_split(raw.copy(), lay)
    got = split(raw, lay)
    assert np.array_equal(got, expect)
    out = bytearray(raw.size + offset)
    merge(got, lay, memoryview(out)[offset:])
    assert bytes(out[offset:]) == raw.tobytes()


def test_payloads_are_the_same_bytes_on_both_paths(monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(7)
    w = (rng.standard_normal(50_000) * 0.02).astype(np.float32)
    base = split(memoryview((w + 1e-4).tobytes()), WordLayout(4, True))
    for lay, raw in [(WordLayout(4, True), w.tobytes()), (WordLayout(2, False), w.tobytes()[:40_000])]:
        compiled = encode_planes(memoryview(raw), lay)
        monkeypatch.setattr(planes, "COMPILED", False)
        pure = encode_planes(memoryview(raw), lay)
        monkeypatch.setattr(planes, "COMPILED", True)
        assert compiled == pure
    with monkeypatch.context() as m:
        m.setattr(planes, "COMPILED", False)
        pure_xor = encode_xor(memoryview(w.tobytes()), base, WordLayout(4, True))
    assert encode_xor(memoryview(w.tobytes()), base, WordLayout(4, True)) == pure_xor


def test_merge_takes_strided_and_read_only_planes() -> None:
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, 4096, dtype=np.uint8)
    lay = WordLayout(4, True)
    p = split(raw, lay)
    wide = np.zeros((4, p.shape[1] * 2), dtype=np.uint8)
    wide[:, ::2] = p
    out = np.empty(4096, dtype=np.uint8)
    merge(wide[:, ::2], lay, out)  # strided rows are made contiguous first
    assert np.array_equal(out, raw)
    merge([np.frombuffer(bytes(r), np.uint8) for r in p], lay, out)  # read-only rows
    assert np.array_equal(out, raw)


def _overlapping_split() -> None:
    buf = bytearray(16)
    cplanes.split(memoryview(buf)[:8], memoryview(buf)[4:12], 4, False)


def _overlapping_merge() -> None:
    buf = bytearray(16)
    view = memoryview(buf)
    cplanes.merge([view[0:2], view[2:4]], view[2:6], False)


@pytest.mark.parametrize(
    "call",
    [
        lambda: cplanes.split(b"\0" * 6, bytearray(6), 4, True),  # not whole words
        lambda: cplanes.split(b"\0" * 8, bytearray(4), 4, True),  # wrong output size
        lambda: cplanes.split(b"\0" * 6, bytearray(6), 3, False),  # no such word size
        lambda: cplanes.merge([b"\0\0", b"\0"], bytearray(4), True),  # planes of unequal size
        lambda: cplanes.merge([b"\0"] * 3, bytearray(3), True),  # three planes
        lambda: cplanes.merge([b"\0\0"] * 2, bytearray(5), True),  # output not whole words
        lambda: cplanes.merge([b"\0"] * 9, bytearray(9), True),  # more planes than a word has bytes
        lambda: _overlapping_split(),  # the loops take their buffers as restrict
        lambda: _overlapping_merge(),
    ],
)
def test_bad_arguments_raise_value_error(call: object) -> None:
    with pytest.raises(ValueError):
        call()  # type: ignore[operator]
    with pytest.raises(TypeError):
        cplanes.split(b"\0" * 4, b"\0" * 4, 2, True)  # read-only output
    with pytest.raises(TypeError):
        cplanes.merge(5, bytearray(4), True)


def test_pure_numpy_can_be_asked_for() -> None:
    code = "from weightbank.format import planes; print(planes.COMPILED)"
    env = {**os.environ, "WEIGHTBANK_PURE_PLANES": "1"}
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert got.stdout.strip() == "False"
    env["WEIGHTBANK_PURE_PLANES"] = "0"
    got = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert got.stdout.strip() == "True"


def test_a_chunk_above_the_cap_gets_a_buffer_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """A thread keeps no plane buffer bigger than SCRATCH_MAX (a 1 GiB chunk must not pin 1 GiB per thread)."""
    lay = WordLayout(4, True)
    monkeypatch.setattr(planes, "SCRATCH_MAX", 1024)
    small = planes._scratch(lay, 1024)
    assert planes._scratch(lay, 512).base is small.base  # reused
    big = planes._scratch(lay, 4096)
    assert big.shape == (4, 1024) and not np.shares_memory(big, small)
    assert planes._scratch(lay, 1024).base is small.base  # the kept one is still the small one
    raw = np.zeros(2048, np.float32)
    raw[::97] = np.random.default_rng(0).standard_normal(22)  # sparse: decoded through the scratch
    out = bytearray(raw.nbytes)
    payload = encode_planes(memoryview(raw.view(np.uint8).tobytes()), lay)
    planes.decode_planes(memoryview(payload), memoryview(out))
    assert bytes(out) == raw.tobytes()
