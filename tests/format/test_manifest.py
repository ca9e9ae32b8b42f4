"""Manifests parse back exactly; malformed ones are CorruptObject, newer ones UnsupportedFormat."""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from weightbank.errors import CorruptObject, UnsupportedFormat
from weightbank.format import manifest as manifest_mod
from weightbank.format.manifest import (
    FORMAT_VERSION,
    NEWEST_FORMAT,
    SHARDED_FORMAT,
    ChunkRecord,
    Manifest,
    ShardRecord,
    TensorRecord,
    check_tiling,
)
from weightbank.format.schema import DeltaArgs


def sample() -> Manifest:
    return Manifest(
        run="r",
        step=3,
        parent=None,
        created=1.5,
        metrics={"loss": {"$f": "nan"}},
        tree={"d": [["w", {"T": 0}], ["v", {"T": 1}]]},
        tensors=(
            TensorRecord("w", "float32", (2, 2), (1,)),
            TensorRecord("v", "float32", (2, 2), alias_of=0),
        ),
        packs=("packs/ab/x-0.pack",),
        chunks=(
            ChunkRecord("b" * 64, 16, "raw", 0, 0, 16),
            ChunkRecord("a" * 64, 16, "delta", 0, 16, 12, DeltaArgs("b" * 64, 1, 0.25, 1)),
        ),
    )


def test_round_trip() -> None:
    m = sample()
    assert Manifest.from_bytes(m.to_bytes(), "k") == m
    assert m.nbytes == 16 and m.stored_bytes == 28
    assert m.decoded_metrics()["loss"] != m.decoded_metrics()["loss"]  # nan


@pytest.mark.parametrize(
    "mutate",
    [
        lambda o: o.pop("chunks"),
        lambda o: o.__setitem__("chunks", [["a" * 64, 16, "raw", 5, 0, 16]]),
        lambda o: o.__setitem__("tensors", [{"name": "w", "dtype": "float32", "shape": [3], "chunks": [0]}]),
        lambda o: o.__setitem__("tensors", [{"name": "w", "dtype": "float32", "shape": [-1], "chunks": []}]),
        lambda o: o.__setitem__("step", "three"),
        lambda o: o["tensors"][1].__setitem__("alias_of", 7),
        lambda o: o.__setitem__("run", None),
    ],
)
def test_malformed_is_corrupt(mutate: object) -> None:
    obj = json.loads(sample().to_bytes())
    mutate(obj)  # type: ignore[operator]
    with pytest.raises(CorruptObject):
        Manifest.from_bytes(json.dumps(obj).encode(), "manifests/x.json")


def test_truncated_and_non_json() -> None:
    data = sample().to_bytes()
    for bad in (data[: len(data) // 2], b"", b"\xff\xfe", b"[1,2]"):
        with pytest.raises(CorruptObject):
            Manifest.from_bytes(bad, "k")


def test_newer_format_refused_not_misread() -> None:
    obj = json.loads(sample().to_bytes())
    obj["format"] = NEWEST_FORMAT + 1
    with pytest.raises(UnsupportedFormat, match="upgrade"):
        Manifest.from_bytes(json.dumps(obj).encode(), "k")


def sharded() -> Manifest:
    chunks = tuple(ChunkRecord(c * 64, 16, "raw", 0, 64 * i, 16) for i, c in enumerate("abcd"))
    return Manifest(
        run="r",
        step=1,
        parent=None,
        created=0.0,
        tree={"d": [["w", {"T": 0}]]},
        tensors=(
            TensorRecord.sharded(
                "w",
                "float32",
                (4, 4),
                (
                    ShardRecord((0, 0), (2, 2), (0,)),
                    ShardRecord((0, 2), (2, 2), (1,)),
                    ShardRecord((2, 0), (2, 2), (2,)),
                    ShardRecord((2, 2), (2, 2), (3,)),
                ),
            ),
        ),
        packs=("packs/ab/x-0.pack",),
        chunks=chunks,
        format=SHARDED_FORMAT,
    )


def test_sharded_round_trip() -> None:
    m = sharded()
    back = Manifest.from_bytes(m.to_bytes(), "k")
    assert back == m and back.sharded and back.tensors[0].chunks == (0, 1, 2, 3)
    assert m.nbytes == 64 and FORMAT_VERSION < SHARDED_FORMAT <= NEWEST_FORMAT


@pytest.mark.parametrize(
    "mutate",
    [
        lambda o: o.__setitem__("format", FORMAT_VERSION),  # shards in an old-format manifest
        lambda o: o["tensors"][0]["shards"][1].__setitem__("offsets", [0, 1]),  # overlap
        lambda o: o["tensors"][0]["shards"].pop(),  # a gap
        lambda o: o["tensors"][0]["shards"][3].__setitem__("offsets", [2, 3]),  # outside
        lambda o: o["tensors"][0]["shards"][0].__setitem__("chunks", []),  # bytes missing
        lambda o: o["tensors"][0]["shards"][0].__setitem__("shape", [2]),  # rank mismatch
        lambda o: o["tensors"][0].__setitem__("chunks", [0]),  # both chunks and shards
    ],
)
def test_malformed_shards_are_corrupt(mutate: object) -> None:
    obj = json.loads(sharded().to_bytes())
    mutate(obj)  # type: ignore[operator]
    with pytest.raises(CorruptObject):
        Manifest.from_bytes(json.dumps(obj).encode(), "manifests/x.json")


def test_a_format_1_reader_refuses_a_sharded_manifest(monkeypatch: pytest.MonkeyPatch) -> None:
    from weightbank.format import manifest as mod

    monkeypatch.setattr(mod, "NEWEST_FORMAT", FORMAT_VERSION)  # what a release before shards reads
    with pytest.raises(UnsupportedFormat, match="upgrade"):
        Manifest.from_bytes(sharded().to_bytes(), "k")
    Manifest.from_bytes(sample().to_bytes(), "k")  # an unsharded manifest still reads


# -- the tiling check ------------------------------------------------------------------------------

Box = tuple[tuple[int, ...], tuple[int, ...]]


def tiles_by_brute_force(shape: tuple[int, ...], boxes: list[Box]) -> bool:
    """The reference: every box inside the tensor and every element covered exactly once."""
    if any(
        o < 0 or n < 0 or o + n > w for off, ext in boxes for o, n, w in zip(off, ext, shape, strict=True)
    ):
        return False
    cover = dict.fromkeys(itertools.product(*(range(w) for w in shape)), 0)
    for off, ext in boxes:
        for point in itertools.product(*(range(o, o + n) for o, n in zip(off, ext, strict=True))):
            cover[point] += 1
    return all(c == 1 for c in cover.values())


def tiles(shape: tuple[int, ...], boxes: list[Box]) -> bool:
    try:
        check_tiling("w", shape, tuple(ShardRecord(off, ext) for off, ext in boxes))
    except ValueError:
        return False
    return True


@st.composite
def guillotine(draw: st.DrawFn, shape: tuple[int, ...], depth: int = 3) -> list[Box]:
    """An exact tiling: the tensor cut in two along some dimension, recursively."""
    boxes: list[Box] = [((0,) * len(shape), shape)]
    for _ in range(draw(st.integers(0, depth * 2))):
        i = draw(st.integers(0, len(boxes) - 1))
        off, ext = boxes[i]
        dims = [d for d in range(len(shape)) if ext[d] > 1]
        if not dims:
            continue
        d = draw(st.sampled_from(dims))
        cut = draw(st.integers(1, ext[d] - 1))
        lo = (off, (*ext[:d], cut, *ext[d + 1 :]))
        hi = ((*off[:d], off[d] + cut, *off[d + 1 :]), (*ext[:d], ext[d] - cut, *ext[d + 1 :]))
        boxes[i : i + 1] = [lo, hi]
    return boxes


@st.composite
def layouts(draw: st.DrawFn) -> tuple[tuple[int, ...], list[Box]]:
    """Small layouts: exact tilings, tilings with one box moved, resized, dropped or doubled, and random boxes."""
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    rank = len(shape)
    box = st.tuples(
        st.tuples(*[st.integers(0, w) for w in shape]), st.tuples(*[st.integers(0, w) for w in shape])
    )
    kind = draw(st.sampled_from(["exact", "moved", "resized", "dropped", "doubled", "random"]))
    if kind == "random":
        return shape, draw(st.lists(box, max_size=6))
    boxes = draw(guillotine(shape))
    boxes.append(((0,) * rank, (0,) * rank))  # an empty box anywhere in bounds holds nothing
    i = draw(st.integers(0, len(boxes) - 1))
    if kind in ("moved", "resized"):
        off, ext = draw(box)
        boxes[i] = (off, boxes[i][1]) if kind == "moved" else (boxes[i][0], ext)
    elif kind == "dropped":
        del boxes[i]
    elif kind == "doubled":
        boxes.append(boxes[i])
    return shape, boxes


@settings(max_examples=600, deadline=None)
@given(layouts())
def test_tiling_check_agrees_with_brute_force(layout: tuple[tuple[int, ...], list[Box]]) -> None:
    shape, boxes = layout
    assert tiles(shape, boxes) == tiles_by_brute_force(shape, boxes)


@pytest.mark.parametrize(
    ("boxes", "why"),
    [
        ([((0, 0), (2, 4)), ((1, 0), (2, 4))], "overlap"),  # the volumes add up: overlap and gap
        ([((0, 0), (2, 2)), ((0, 1), (2, 2)), ((2, 0), (2, 4))], "overlap"),
        ([((0, 0), (2, 4))], "add up"),
        ([((0, 0), (2, 4)), ((3, 0), (2, 4))], "outside"),
        ([((0, 0), (2, 4)), ((2,), (2,))], "dimensions"),
    ],
)
def test_tiling_check_says_what_is_wrong(boxes: list[Box], why: str) -> None:
    with pytest.raises(ValueError, match=why):
        check_tiling("w", (4, 4), tuple(ShardRecord(off, ext) for off, ext in boxes))


def test_layouts_with_too_many_corners_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    shape = (2, 2, 2)
    cubes = tuple(ShardRecord(off, (1, 1, 1)) for off in itertools.product(range(2), repeat=3))
    check_tiling("w", shape, cubes)  # 8 boxes x 8 corners
    monkeypatch.setattr(manifest_mod, "MAX_CORNERS", 63)
    with pytest.raises(ValueError, match="corners"):
        check_tiling("w", shape, cubes)
    slabs = (ShardRecord((0, 0, 0), (1, 2, 2)), ShardRecord((1, 0, 0), (1, 2, 2)))
    check_tiling("w", shape, slabs)  # split in one dimension: 2 boxes x 2 corners


def many_shards(shape: tuple[int, int], boxes: Sequence[Box]) -> Manifest:
    """A uint8 tensor of ``shape`` in ``boxes``, each box with one chunk of its size."""
    sizes = sorted({ext[0] * ext[1] for _, ext in boxes})
    index = {n: i for i, n in enumerate(sizes)}
    chunks = tuple(ChunkRecord(f"{i:064x}", n, "raw", 0, 0, n) for i, n in enumerate(sizes))
    shards = tuple(ShardRecord(off, ext, (index[ext[0] * ext[1]],)) for off, ext in boxes)
    return Manifest(
        run="r",
        step=1,
        parent=None,
        created=0.0,
        tree={"d": [["w", {"T": 0}]]},
        tensors=(TensorRecord.sharded("w", "uint8", shape, shards),),
        packs=("packs/ab/x-0.pack",),
        chunks=chunks,
        format=SHARDED_FORMAT,
    )


def test_8k_shard_layouts_parse() -> None:
    """A 128 x 64 grid, and the layout that made the old pairwise check quadratic (columns cut at distinct rows)."""
    grid = [((2 * i, 2 * j), (2, 2)) for i in range(128) for j in range(64)]
    rows = 8192
    staggered = [b for j in range(4096) for b in (((0, j), (j + 1, 1)), ((j + 1, j), (rows - j - 1, 1)))]
    for shape, boxes in (((256, 128), grid), ((rows, 4096), staggered)):
        m = many_shards(shape, boxes)
        back = Manifest.from_bytes(m.to_bytes(), "k")
        assert len(back.tensors[0].shards) == 8192 and back == m
    obj = json.loads(many_shards((rows, 4096), staggered).to_bytes())
    obj["tensors"][0]["shards"][-1]["offsets"] = [4095, 4095]  # one row up: overlaps its column's first box
    with pytest.raises(CorruptObject, match="overlap"):
        Manifest.from_bytes(json.dumps(obj).encode(), "k")
