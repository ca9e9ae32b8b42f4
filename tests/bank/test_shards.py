"""Region reads (what a resharding load asks for) return exactly the region, whatever the chunk layout.

Saves now cut chunks at multiples of 64 bytes, so a chunk boundary never
splits an element; a manifest written before that rule may hold any chunk
size. Such legacy layouts are made here by handing the writer options that
skip today's check.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import weightbank as wb
from weightbank.bank.pieces import pieces_of
from weightbank.bank.shards import region_of
from weightbank.bank.writer import SaveOptions, write_part


def legacy_part(
    bank: wb.Bank, tensors: dict[str, object], chunk_size: int, codec: str = "raw"
) -> wb.SavePart:
    """A part cut into ``chunk_size`` chunks, as a weightbank without the alignment rule wrote them."""
    options = SaveOptions(codec=codec)
    object.__setattr__(options, "chunk_size", chunk_size)
    return write_part(bank.storage, bank._catalog, pieces_of(tensors), options)


@pytest.mark.parametrize("where", ["memory", "local"])
@pytest.mark.parametrize("chunk_size", [4098, 4099, 1001, 4096])
def test_regions_of_a_legacy_layout_whose_chunks_split_elements(
    tmp_path: Path, where: str, chunk_size: int
) -> None:
    bank = wb.open("memory://" if where == "memory" else tmp_path / "bank")
    w = torch.arange(40000, dtype=torch.float32)  # big enough to be memory-mapped from a local pack
    info = bank.commit([legacy_part(bank, {"w": w}, chunk_size)], run="r", step=1)
    ck = bank.checkpoint(info.id)
    m = ck.manifest
    assert m.chunk_size == chunk_size and torch.equal(bank.load(info.id)["w"], w)
    spans = [(2040, 2060), (2000, 2010), (0, 40000), (39999, 40000), (1, 3), (1024, 1025), (7, 7)]
    regions = [region_of(m, 0, None, [a], [b - a]) for a, b in spans]
    got = ck.read_regions(regions)
    for (a, b), t in zip(spans, got, strict=True):
        assert torch.equal(t, w[a:b]), (a, b)


def test_the_new_chunk_size_rule_keeps_every_boundary_on_an_element() -> None:
    bank = wb.open("memory://")
    with pytest.raises(wb.InvalidState, match="multiple of 64"):
        bank.save_part({"w": torch.ones(4)}, chunk_size=4098)
    part = bank.save_part({"w": torch.ones(1000, dtype=torch.complex128)}, chunk_size=192)
    assert all(c.raw_len % 16 == 0 for c in part.chunks)


DTYPES = [torch.float32, torch.float64, torch.int16, torch.bfloat16, torch.complex64, torch.uint8, torch.bool]


@settings(max_examples=120, deadline=None)
@given(
    shape=st.lists(st.integers(1, 9), min_size=1, max_size=3),
    dtype=st.sampled_from(DTYPES),
    chunk=st.sampled_from([1, 3, 5, 7, 13, 64, 98, 192, 4096]),
    codec=st.sampled_from(["raw", "auto"]),
    sharded=st.booleans(),
    data=st.data(),
)
def test_any_region_of_any_box_reads_exactly(
    shape: list[int], dtype: torch.dtype, chunk: int, codec: str, sharded: bool, data: st.DataObject
) -> None:
    bank = wb.open("memory://")
    n = int(np.prod(shape))
    full = (torch.arange(n, dtype=torch.float64) * 1.37 - 5).reshape(shape).to(dtype)
    if sharded and shape[0] > 1:
        cut = data.draw(st.integers(1, shape[0] - 1))
        boxes = [(0, full[:cut]), (cut, full[cut:])]
        tail = (0,) * (len(shape) - 1)
        ps = [
            legacy_part(bank, {"t": wb.TensorShard(t, offsets=(o, *tail), shape=tuple(shape))}, chunk, codec)
            for o, t in boxes
        ]
    else:
        ps = [legacy_part(bank, {"t": full}, chunk, codec)]
    info = bank.commit(ps)
    ck = bank.checkpoint(info.id)
    m = ck.manifest
    rec = m.tensors[0]
    wanted = []
    regions = []
    for _ in range(data.draw(st.integers(1, 4))):
        box = rec.shards[data.draw(st.integers(0, len(rec.shards) - 1))] if rec.shards else None
        bshape = box.shape if box is not None else rec.shape
        offs = [data.draw(st.integers(0, d)) for d in bshape]
        lens = [data.draw(st.integers(0, d - o)) for d, o in zip(bshape, offs, strict=True)]
        regions.append(region_of(m, 0, box.offsets if box is not None else None, offs, lens))
        base = box.offsets if box is not None else (0,) * len(shape)
        wanted.append(full[tuple(slice(b + o, b + o + k) for b, o, k in zip(base, offs, lens, strict=True))])
    got = ck.read_regions(regions)
    for g, want in zip(got, wanted, strict=True):
        assert g.dtype == want.dtype and g.shape == want.shape
        assert torch.equal(
            g.view(torch.uint8) if dtype == torch.bool else g,
            want.view(torch.uint8) if dtype == torch.bool else want,
        )
