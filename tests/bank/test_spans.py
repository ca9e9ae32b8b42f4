"""A load of many small tensors reads each pack in a few spans, and still checks every chunk."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import weightbank as wb
from tests.remote import RemoteLike
from weightbank.bank.spans import SPAN_MAX, SpanReads
from weightbank.storage import MemoryStorage


def small_state(n: int = 200, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {f"layer{i}.bias": torch.randn(64 + i, generator=g) for i in range(n)}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("codec", ["auto", "raw"])
def test_many_small_tensors_load_in_a_few_reads(codec: str) -> None:
    store = RemoteLike()
    bank = wb.Bank(store, cache=False)
    states = [small_state()]
    g = torch.Generator().manual_seed(1)
    for _ in range(3):  # deltas too: each chain's links are read in the same spans
        states.append({k: v + 1e-3 * torch.randn(v.shape, generator=g) for k, v in states[-1].items()})
    ids = [bank.save(s, run="r", step=i, codec=codec).id for i, s in enumerate(states)]
    for cid, s in zip(ids, states, strict=True):
        store.reset()
        assert same(bank.load(cid), s)
        packs = len(bank.checkpoint(cid).manifest.packs)
        assert store.reads <= 2 * packs, (store.reads, packs)  # one span per pack, not 200 reads


def test_a_damaged_chunk_in_a_span_is_still_caught_and_named() -> None:
    store = MemoryStorage()
    bank = wb.Bank(store, cache=False)
    state = small_state()
    cid = bank.save(state, run="r", codec="raw").id
    m = bank.checkpoint(cid).manifest
    t = next(t for t in m.tensors if t.name == "layer7.bias")
    rec = m.chunks[t.chunks[0]]
    key = m.packs[rec.pack]
    data = bytearray(store.read(key))
    data[rec.offset + 3] ^= 0x10
    store.write(key, bytes(data))
    with pytest.raises(wb.CorruptObject, match=r"layer7\.bias"):
        wb.Bank(store, cache=False).load(cid)


def test_a_missing_pack_is_reported_by_the_chunk_read() -> None:
    store = MemoryStorage()
    bank = wb.Bank(store, cache=False)
    cid = bank.save(small_state(), run="r", codec="raw").id
    for key in bank.checkpoint(cid).manifest.packs:
        store.delete(key)
    with pytest.raises(wb.MissingObject, match=r"packs/"):
        wb.Bank(store, cache=False).load(cid)


@given(
    ranges=st.lists(st.tuples(st.integers(0, 5000), st.integers(1, 700)), min_size=1, max_size=40),
    size=st.integers(0, 6000),
)
@settings(max_examples=100, deadline=None)
def test_span_reads_return_what_the_storage_would(ranges: list[tuple[int, int]], size: int) -> None:
    store = MemoryStorage()
    blob = bytes(range(256)) * (size // 256 + 1)
    store.write("packs/p.pack", blob[:size])
    spans = SpanReads(store)
    for off, n in ranges:
        spans.want("packs/p.pack", off, n)
    spans.fetch()
    assert spans.reads <= max(1, len(ranges))
    for off, n in ranges:
        assert spans.read("packs/p.pack", off, n) == store.read("packs/p.pack", off, n)
        buf = bytearray(n)
        got = spans.read_into("packs/p.pack", off, memoryview(buf))
        assert got == store.read_into("packs/p.pack", off, memoryview(bytearray(n)))
        assert bytes(buf[:got]) == store.read("packs/p.pack", off, n)[:got]


def test_spans_are_bounded() -> None:
    store = MemoryStorage()
    store.write("packs/p.pack", bytes(3 * SPAN_MAX))
    spans = SpanReads(store)
    for off in range(0, 3 * SPAN_MAX, 1 << 20):
        spans.want("packs/p.pack", off, 1 << 10)
    spans.fetch()
    assert spans.reads >= 3, "a span never grows past SPAN_MAX"
