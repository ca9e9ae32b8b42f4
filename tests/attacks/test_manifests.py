"""Crafted manifests: hash-valid, but malformed. Each is a typed error for itself and harmless to the rest.

Every entry names what it plants and what loading it must raise; the bank's
other checkpoints, tags and runs must keep working in this process and a
fresh one, ``verify`` must report it, and ``gc`` must refuse (a manifest it
cannot read may reference any pack) without deleting anything.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import weightbank as wb
from weightbank.bank.layout import manifest_key

from .craft import Sample, good_manifest, plant_manifest, sample_bank, still_usable

Mutation = Callable[[dict[str, Any]], Any]


_SPLICE = "@@splice@@"


def _deep_tree(levels: int) -> str:
    """The JSON text of a tree ``levels`` lists deep (too deep to build with json.dumps)."""
    return '{"l":[' * levels + '{"v":1}' + "]}" * levels


def _splice(path: tuple[Any, ...], text: str) -> Mutation:
    """Put raw JSON ``text`` at ``path`` once the manifest is serialized."""

    def apply(obj: dict[str, Any]) -> str:
        _set(path, _SPLICE)(obj)
        return text

    return apply


def _set(path: tuple[Any, ...], value: Any) -> Mutation:
    def apply(obj: dict[str, Any]) -> None:
        target = obj
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return apply


#: name → (mutation of a good manifest, or raw bytes), and the error it must raise.
ATTACKS: dict[str, tuple[Mutation | bytes, type[Exception]]] = {
    # issue 11, item 2
    "tree nested 100,000 levels deep": (_splice(("tree",), _deep_tree(100_000)), wb.CorruptObject),
    "tree nested just past the limit": (_splice(("tree",), _deep_tree(70)), wb.CorruptObject),
    "metrics hold a malformed encoded float": (_set(("metrics", "val"), {"$f": "zzz"}), wb.CorruptObject),
    "tree node past the tensor table": (_set(("tree",), {"d": [["w", {"T": 999}]]}), wb.CorruptObject),
    "config nested 100,000 levels": (
        _splice(("config", "x"), "[" * 100_000 + "]" * 100_000),
        wb.CorruptObject,
    ),
    "metrics nested past the limit": (_splice(("metrics", "x"), "[" * 220 + "]" * 220), wb.CorruptObject),
    "config with a bad encoded float": (_set(("config", "x"), {"$f": "nan", "y": 1}), wb.CorruptObject),
    "env that is a list": (_set(("env",), []), wb.CorruptObject),
    # issue 11, item 3
    "pack key containing NUL": (_set(("packs", 0), "packs/ab/ab\x00cd-0.pack"), wb.CorruptObject),
    "pack key that leaves the bank": (_set(("packs", 0), "packs/../../etc/passwd"), wb.CorruptObject),
    "stored_len of 2**45": (_set(("chunks", 0, 5), 1 << 45), wb.CorruptObject),
    "raw_len past the chunk size": (_set(("chunks", 0, 1), 1 << 40), wb.CorruptObject),
    "negative offset": (_set(("chunks", 0, 4), -1), wb.CorruptObject),
    "chunk hash that is not one": (_set(("chunks", 0, 0), "zz"), wb.CorruptObject),
    "unknown codec": (_set(("chunks", 0, 2), "future-codec"), wb.UnsupportedFormat),
    "codec args on a raw chunk": (
        lambda o: o["chunks"][0].append({"base": "a" * 64, "depth": 1}),
        wb.CorruptObject,
    ),
    "delta whose base is not listed": (
        lambda o: o["chunks"][0].__setitem__(slice(2, 7), ["delta", 0, 0, 4, {"base": "c" * 64, "depth": 1}]),
        wb.CorruptObject,
    ),
    "chunk size of zero": (_set(("chunk_size",), 0), wb.CorruptObject),
    "chunk size of 2**62": (_set(("chunk_size",), 1 << 62), wb.CorruptObject),
    "unknown dtype": (_set(("tensors", 0, "dtype"), "float1024"), wb.UnsupportedFormat),
    "a billion dimensions of size 1": (_set(("tensors", 0, "shape"), [1] * 100), wb.CorruptObject),
    "alias of another shape": (
        lambda o: o["tensors"].append({"name": "x", "dtype": "uint8", "shape": [3], "alias_of": 0}),
        wb.CorruptObject,
    ),
    "lossy summary of an unknown tensor": (
        _set(("lossy",), {"nope": {"codec": "int8", "max_abs": 0.0, "rel_err": 0.0}}),
        wb.CorruptObject,
    ),
    "parent that is no id": (_set(("parent",), "../x"), wb.CorruptObject),
    "created of 1e400": (_splice(("created",), "1e400"), wb.CorruptObject),
    "format from the future": (_set(("format",), 99), wb.UnsupportedFormat),
    "format zero": (_set(("format",), 0), wb.CorruptObject),
    "step that is a bool": (_set(("step",), True), wb.CorruptObject),
    "a 5,000-digit integer": (_splice(("step",), "9" * 5000), wb.CorruptObject),
    # raw bytes
    "not JSON": (b"\x00\xff{", wb.CorruptObject),
    "JSON but a list": (b"[1, 2]", wb.CorruptObject),
    "nested 100,000 lists": (b"[" * 100_000 + b"]" * 100_000, wb.CorruptObject),
    "NaN in metrics": (b'{"format":1,"metrics":{"a":NaN}}', wb.CorruptObject),
}


def _bytes(sample: Sample, attack: Mutation | bytes) -> bytes:
    if isinstance(attack, bytes):
        return attack
    obj = copy.deepcopy(good_manifest(sample))
    spliced = attack(obj)
    text = json.dumps(obj)
    if isinstance(spliced, str):
        text = text.replace(json.dumps(_SPLICE), spliced)
    return text.encode()


def _packs(root: Path) -> set[Path]:
    return set((root / "packs").rglob("*.pack"))


@pytest.mark.parametrize("name", sorted(ATTACKS))
def test_crafted_manifest_is_a_typed_error_and_harmless(tmp_path: Path, name: str) -> None:
    attack, error = ATTACKS[name]
    sample = sample_bank(tmp_path / "bank")
    bad = plant_manifest(sample.root, _bytes(sample, attack))
    for bank in (sample.bank, wb.open(str(sample.root), create=False)):
        with pytest.raises(error):
            bank.load(bad)
        # A manifest planted behind the bank's back has no catalog entry: by prefix it is not found
        # (the index lists what weightbank committed); by its full id it is read, and refused.
        with pytest.raises((error, wb.CheckpointNotFound)):
            bank.show(bad[:12])
        with pytest.raises(error):
            bank.show(bad)
        report = bank.verify()
        assert not report.ok
        assert [p.kind for p in report.problems] == ["manifest"]
        assert report.problems[0].key == manifest_key(bad)
        before = _packs(sample.root)
        with pytest.raises(wb.CorruptObject, match="gc refuses"):
            bank.gc(grace=0)
        assert _packs(sample.root) == before
    still_usable(sample, bad_refs=(bad,))


def test_a_clean_bank_reports_nothing_and_gc_runs(tmp_path: Path) -> None:
    """The control for the attacks above: the sample itself is clean."""
    sample = sample_bank(tmp_path / "bank")
    assert sample.bank.verify().problems == ()
    sample.bank.gc(grace=0)
    still_usable(sample)
