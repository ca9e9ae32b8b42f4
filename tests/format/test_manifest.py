"""Manifests parse back exactly; malformed ones are CorruptObject, newer ones UnsupportedFormat."""

from __future__ import annotations

import json

import pytest

from weightbank.errors import CorruptObject, UnsupportedFormat
from weightbank.format.manifest import (
    FORMAT_VERSION,
    NEWEST_FORMAT,
    SHARDED_FORMAT,
    ChunkRecord,
    Manifest,
    ShardRecord,
    TensorRecord,
)


def sample() -> Manifest:
    return Manifest(
        run="r",
        step=3,
        parent=None,
        created=1.5,
        metrics={"loss": {"$f": "nan"}},
        tree={"d": [["w", {"T": 0}], ["v", {"T": 1}]]},
        tensors=(
            TensorRecord("w", "float32", (2, 2), (0,)),
            TensorRecord("v", "float32", (2, 2), alias_of=0),
        ),
        packs=("packs/ab/x-0.pack",),
        chunks=(ChunkRecord("a" * 64, 16, "raw", 0, 0, 16, {"base": "b" * 64}),),
    )


def test_round_trip() -> None:
    m = sample()
    assert Manifest.from_bytes(m.to_bytes(), "k") == m
    assert m.nbytes == 16 and m.stored_bytes == 16
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
