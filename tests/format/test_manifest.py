"""Manifests parse back exactly; malformed ones are CorruptObject, newer ones UnsupportedFormat."""

from __future__ import annotations

import json

import pytest

from weightbank.errors import CorruptObject, UnsupportedFormat
from weightbank.format.manifest import FORMAT_VERSION, ChunkRecord, Manifest, TensorRecord


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
    obj["format"] = FORMAT_VERSION + 1
    with pytest.raises(UnsupportedFormat, match="upgrade"):
        Manifest.from_bytes(json.dumps(obj).encode(), "k")
