"""The two-phase save: parts written by several "processes", one commit; sharded tensors in the manifest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import weightbank as wb
from weightbank.bank import leases
from weightbank.format.manifest import COMPACT_FORMAT


def _rows(t: torch.Tensor, n: int) -> list[wb.TensorShard]:
    out, start = [], 0
    for piece in torch.tensor_split(t, n, dim=0):
        out.append(wb.TensorShard(piece, offsets=(start, *([0] * (t.dim() - 1))), shape=tuple(t.shape)))
        start += piece.shape[0]
    return out


def test_parts_commit_one_checkpoint_and_release_their_leases() -> None:
    bank = wb.open("memory://")
    w = torch.randn(7, 5)
    parts = [bank.save_part({"w": s, "b": torch.ones(3)}) for s in _rows(w, 3)]
    assert len(leases.live(bank.storage)) == 3 and bank.log() == []  # nothing visible before the commit
    info = bank.commit([p.to_json() for p in parts], run="r", step=4, metrics={"loss": 1.0}, tags=["t"])
    assert leases.live(bank.storage) == []
    out = bank.load("t")
    assert torch.equal(out["w"], w) and torch.equal(out["b"], torch.ones(3))
    assert info.step == 4 and info.n_tensors == 2 and info.save_stats is not None
    # "b" was written by all three parts (nobody deduplicated it for them): listed once
    assert info.save_stats.written_bytes == w.numel() * 4 + 3 * 12
    m = bank._manifest(info.id)[1]
    assert m.format == COMPACT_FORMAT and [len(t.shards) for t in m.tensors] == [3, 0]


def test_a_whole_piece_is_an_ordinary_tensor() -> None:
    bank = wb.open("memory://")
    w = torch.randn(4, 4)
    part = bank.save_part({"w": wb.TensorShard(w, offsets=(0, 0), shape=(4, 4))})
    info = bank.commit([part])
    m = bank._manifest(info.id)[1]
    assert m.format == COMPACT_FORMAT and not m.tensors[0].shards
    # identical to what bank.save makes of the same tensor: same chunks, same content key
    plain = bank.save({"w": w}, run="other")
    assert bank.show(info.id).tensors[0].content_key == bank.show(plain.id).tensors[0].content_key
    assert plain.save_stats is not None and plain.save_stats.written_bytes == 0


def test_commit_places_tensors_in_a_nested_state_with_values() -> None:
    bank = wb.open("memory://")
    a = bank.save_part({"model.w": torch.arange(4.0), "ids": np.arange(3)})
    state = {"model": {"w": wb.TensorRef("model.w")}, "data": {"epoch": 2, "ids": wb.TensorRef("ids")}}
    out = bank.load(bank.commit([a], state=state).id)
    assert out["data"]["epoch"] == 2 and isinstance(out["data"]["ids"], np.ndarray)
    assert out["model"]["w"].tolist() == [0.0, 1.0, 2.0, 3.0]


@pytest.mark.parametrize(
    ("pieces", "why"),
    [
        ([((0, 0), (2, 4)), ((1, 0), (2, 4))], "overlap"),
        ([((0, 0), (2, 4))], "add up"),
        ([((0, 0), (2, 4)), ((2, 0), (1, 4))], "add up"),
    ],
)
def test_pieces_that_do_not_tile_are_refused(
    pieces: list[tuple[tuple[int, int], tuple[int, int]]], why: str
) -> None:
    bank = wb.open("memory://")
    parts = [
        bank.save_part({"w": wb.TensorShard(torch.ones(*shape), offsets=off, shape=(4, 4))})
        for off, shape in pieces
    ]
    with pytest.raises(wb.InvalidState, match=why):
        bank.commit(parts)
    assert bank.log() == []


def test_bad_parts_and_states_are_refused_before_anything_is_visible() -> None:
    bank = wb.open("memory://")
    p1 = bank.save_part({"x": torch.ones(2)})
    p2 = bank.save_part({"x": torch.zeros(2)})
    with pytest.raises(wb.InvalidState, match="different contents"):
        bank.commit([p1, p2])
    with pytest.raises(wb.InvalidState, match="not placed"):
        bank.commit([p1], state={"y": 1})
    with pytest.raises(wb.InvalidState, match="no part holds"):
        bank.commit([p1], state={"x": wb.TensorRef("x"), "z": wb.TensorRef("z")})
    with pytest.raises(wb.InvalidState, match="outside"):
        bank.save_part({"w": wb.TensorShard(torch.ones(3, 4), offsets=(2, 0), shape=(4, 4))})
    with pytest.raises(wb.CorruptObject):
        wb.SavePart.from_json({**p1.to_json(), "chunks": [["x", 1]]})
    assert bank.log() == []


def test_commit_refuses_a_part_whose_packs_are_gone(tmp_path: Path) -> None:
    bank = wb.open(tmp_path / "bank")
    part = bank.save_part({"x": torch.ones(1000)})
    for key in part.own_packs():
        bank.storage.delete(key)
    with pytest.raises(wb.MissingObject):
        bank.commit([part])


def test_parts_dedup_against_the_bank_and_delta_code_against_the_parent() -> None:
    bank = wb.open("memory://")
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1024, 1024, generator=g) * 0.05  # 2 MiB shards: a delta link pays its overhead
    first = bank.commit([bank.save_part({"w": s}) for s in _rows(w, 2)], run="r", step=1)
    again = bank.commit([bank.save_part({"w": s}, parent=first.id) for s in _rows(w, 2)], run="r", step=2)
    assert again.save_stats is not None and again.save_stats.written_bytes == 0
    w2 = w - 1e-5 * torch.randn(w.shape, generator=g)  # a small update: deltas against the same shard
    third = bank.commit([bank.save_part({"w": s}, parent=again.id) for s in _rows(w2, 2)], run="r", step=3)
    assert third.save_stats is not None and "delta" in third.save_stats.per_codec
    assert torch.equal(bank.load(third.id)["w"], w2)
    assert third.parent == again.id  # AUTO: the run's newest
    assert bank.verify().ok


def test_diff_of_the_same_values_in_other_boxes_is_same() -> None:
    bank = wb.open("memory://")
    w = torch.randn(6, 4)
    rows = bank.commit([bank.save_part({"w": s}) for s in _rows(w, 3)]).id
    cols = bank.commit(
        [bank.save_part({"w": wb.TensorShard(w[:, i : i + 2], offsets=(0, i), shape=(6, 4))}) for i in (0, 2)]
    ).id
    changed = bank.commit([bank.save_part({"w": s}) for s in _rows(w + 1, 2)]).id
    assert [t.status for t in bank.diff(rows, cols).tensors] == ["same"]
    d = bank.diff(rows, changed)
    assert [t.status for t in d.tensors] == ["changed"] and d.differing_bytes == 96
    assert bank.show(rows).tensors[0].content_key != bank.show(cols).tensors[0].content_key


def test_load_into_a_module_from_a_sharded_checkpoint() -> None:
    bank = wb.open("memory://")
    lin = torch.nn.Linear(6, 8)
    parts = [bank.save_part({"weight": s, "bias": lin.bias.detach()}) for s in _rows(lin.weight.detach(), 4)]
    cid = bank.commit(parts).id
    target = torch.nn.Linear(6, 8)
    bank.load(cid, into=target)
    assert torch.equal(target.weight, lin.weight) and torch.equal(target.bias, lin.bias)


@settings(max_examples=40, deadline=None)
@given(
    shape=st.lists(st.integers(1, 12), min_size=1, max_size=3),
    cuts=st.lists(st.integers(1, 4), min_size=3, max_size=3),
    chunk=st.sampled_from([64, 128, 4096]),
    data=st.data(),
)
def test_any_grid_of_shards_round_trips_and_regions_read_exactly(
    shape: list[int], cuts: list[int], chunk: int, data: st.DataObject
) -> None:
    bank = wb.open("memory://")
    full = torch.arange(int(np.prod(shape)), dtype=torch.float32).reshape(shape)
    # a grid: dimension d cut into cuts[d] blocks (some may be empty)
    bounds: list[list[tuple[int, int]]] = []
    for d, n in enumerate(shape):
        edges = sorted(data.draw(st.lists(st.integers(0, n), min_size=cuts[d] - 1, max_size=cuts[d] - 1)))
        bounds.append(list(zip([0, *edges], [*edges, n], strict=True)))
    boxes: list[tuple[tuple[int, int], ...]] = [()]
    for b in bounds:
        boxes = [(*x, y) for x in boxes for y in b]
    shards = [
        wb.TensorShard(
            full[tuple(slice(lo, hi) for lo, hi in box)],
            offsets=tuple(lo for lo, _ in box),
            shape=tuple(shape),
        )
        for box in boxes
    ]
    info = bank.commit([bank.save_part({"t": s}, chunk_size=chunk) for s in shards])
    assert torch.equal(bank.load(info.id)["t"], full)
    # a region of one stored box reads back exactly
    from weightbank.bank.shards import read_regions, region_of

    cid, m = bank._manifest(info.id)
    rec = m.tensors[0]
    box = rec.shards[data.draw(st.integers(0, len(rec.shards) - 1))] if rec.shards else None
    bshape = box.shape if box is not None else rec.shape
    offs = [data.draw(st.integers(0, n)) for n in bshape]
    lens = [data.draw(st.integers(0, n - o)) for n, o in zip(bshape, offs, strict=True)]
    region = region_of(m, 0, box.offsets if box is not None else None, offs, lens)
    (got,) = read_regions(bank.storage, cid, m, [region])
    base = box.offsets if box is not None else (0,) * len(shape)
    want = full[tuple(slice(b + o, b + o + n) for b, o, n in zip(base, offs, lens, strict=True))]
    assert torch.equal(got, want)


CHILD = """
import sys, torch, weightbank as wb
bank = wb.open(sys.argv[1])
part = bank.save_part({"w": wb.TensorShard(torch.ones(4, 4), offsets=(0, 0), shape=(8, 4))})
print(part.save_id, flush=True)
import os, signal; os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_part_of_a_dead_process_is_freed_by_gc_and_cannot_be_committed(tmp_path: Path) -> None:
    bank_dir = tmp_path / "bank"
    wb.open(bank_dir)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(bank_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(Path(wb.__file__).parents[1])},
    )
    assert proc.returncode == -9, proc.stderr
    save_id = proc.stdout.split()[0]
    bank = wb.open(bank_dir, create=False)
    lease = json.loads((bank_dir / "leases" / f"{save_id}.json").read_text())
    assert lease["pid"] != os.getpid()
    report = bank.gc(grace=0)
    assert report.leases_dropped == 1 and len(report.packs_deleted) == 1
