"""Fuzzing every parser of stored bytes: only typed errors, and memory bounded by the input.

Each target takes bytes (or JSON) a damaged disk or a hostile writer could
leave in a bank. Whatever hypothesis feeds it, it must return normally or
raise a :class:`~weightbank.WeightbankError` (never ``ValueError``,
``IndexError``, ``MemoryError``, ``RecursionError``...), and allocate no more
than a bound proportional to what it was asked to produce.
"""

from __future__ import annotations

import functools
import json
import tracemalloc
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import weightbank as wb
from weightbank.bank.events import EventLog
from weightbank.bank.layout import EVENTS
from weightbank.bank.leases import Lease, all_leases
from weightbank.bank.maintenance import TrashEntry, read_trash
from weightbank.bank.tags import TagRecord
from weightbank.format.codecs import CODECS
from weightbank.format.delta import decode_chain
from weightbank.format.manifest import Manifest
from weightbank.format.planes import encode_planes, layout_for
from weightbank.format.sealed import seal
from weightbank.storage import open_storage

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
#: What a parser may allocate beyond its output buffer, whatever its input claims.
SLACK = 16 << 20


def _bounded(fn: Callable[[], Any], limit: int) -> None:
    """Run ``fn``; it may raise only WeightbankError, and may allocate at most ``limit`` bytes."""
    tracemalloc.start()
    try:
        fn()
    except wb.WeightbankError:
        pass
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak <= limit, f"peak {peak} bytes for a parser bounded by {limit}"


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=30,
)


# -- chunk payloads --------------------------------------------------------------------------------


def _planes_seed() -> bytes:
    return encode_planes(
        memoryview(np.linspace(-1, 1, 512, dtype=np.float32).tobytes()), layout_for("float32")
    )


@FUZZ
@given(codec=st.sampled_from(sorted(c for c in CODECS if c != "delta")), payload=st.binary(max_size=4096),
       out_len=st.sampled_from([0, 8, 64, 2048, 1 << 20]))  # fmt: skip
@example(codec="planes", payload=_planes_seed(), out_len=2048)
@example(codec="planes", payload=_planes_seed()[:40], out_len=2048)
def test_payload_decoders_raise_only_corrupt_object(codec: str, payload: bytes, out_len: int) -> None:
    out = bytearray(out_len)
    _bounded(lambda: CODECS[codec].decode(memoryview(payload), memoryview(out)), out_len * 4 + SLACK)


@FUZZ
@given(links=st.lists(st.tuples(st.sampled_from(["planes", "sparse", "delta", "raw", "zstd"]),
                                st.binary(max_size=1024)), min_size=1, max_size=4))  # fmt: skip
def test_delta_chains_raise_only_corrupt_object(links: list[tuple[str, bytes]]) -> None:
    out = bytearray(2048)
    views = [(c, memoryview(p)) for c, p in links]
    _bounded(lambda: decode_chain(views, None, memoryview(out)), 32 * len(out) + SLACK)


@FUZZ
@given(flips=st.lists(st.integers(0, 10_000), min_size=1, max_size=8))
def test_flipped_plane_payloads_raise_only_corrupt_object(flips: list[int]) -> None:
    payload = bytearray(_planes_seed())
    for f in flips:
        payload[f % len(payload)] ^= 1 << (f % 8)
    out = bytearray(2048)
    _bounded(lambda: CODECS["planes"].decode(memoryview(bytes(payload)), memoryview(out)), SLACK)


# -- JSON records ----------------------------------------------------------------------------------


def _good_manifest() -> dict[str, Any]:
    bank = wb.open("memory://")
    info = bank.save({"w": torch.ones(4, 4), "opt": {"step": 3, "lr": float("nan")}}, metrics={"v": 1.0})
    obj: dict[str, Any] = json.loads(bank._catalog.get(info.id).to_bytes())
    return obj


GOOD = _good_manifest()


@st.composite
def mutated_manifests(draw: st.DrawFn) -> bytes:
    """A good manifest with one field anywhere replaced by an arbitrary JSON value."""
    obj = json.loads(json.dumps(GOOD))
    paths: list[tuple[Any, Any]] = []

    def walk(node: Any) -> None:
        items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else []
        for k, v in items:
            paths.append((node, k))
            walk(v)

    walk(obj)
    node, key = draw(st.sampled_from(paths))
    node[key] = draw(json_values)
    return json.dumps(obj).encode()


@FUZZ
@given(data=mutated_manifests() | st.binary(max_size=512))
def test_manifest_parser_raises_only_typed_errors(data: bytes) -> None:
    def parse() -> None:
        m = Manifest.from_bytes(data, "k")
        # A manifest that parses can be walked and summarized without another check.
        _ = m.nbytes, m.stored_bytes, m.decoded_metrics(), m.decoded_meta(), m.sharded
        _ = [m.content_key(i) for i in range(len(m.tensors))]

    _bounded(parse, 64 * len(data) + SLACK)


def _tag_events(data: bytes) -> object:
    return TagRecord.from_bytes("prod", data).events()


@FUZZ
@given(obj=st.dictionaries(st.sampled_from(["name", "target", "stack", "history", "digest"]), json_values))
def test_tag_record_parser_raises_only_typed_errors(obj: dict[str, Any]) -> None:
    body = {k: v for k, v in obj.items() if k != "digest"}
    for data in (json.dumps(obj).encode(), seal(body)):
        _bounded(functools.partial(_tag_events, data), 64 * len(data) + SLACK)


@FUZZ
@given(events=json_values, sealed=st.booleans())
def test_event_log_parser_raises_only_typed_errors(events: Any, sealed: bool) -> None:
    storage = open_storage("memory://")
    body = {"run": "r", "events": events}
    data = seal(body) if sealed else json.dumps(body).encode()
    storage.put_ref(f"{EVENTS}r.json", data, None)
    _bounded(lambda: EventLog(storage).read("r"), 64 * len(data) + SLACK)


@FUZZ
@given(body=json_values, where=st.sampled_from(["trash/", "leases/"]))
def test_trash_and_lease_parsers_never_raise(body: Any, where: str) -> None:
    """A damaged trash entry or lease is listed with its problem (gc then errs on the safe side), never raised."""
    storage = open_storage("memory://")
    sealable = isinstance(body, dict) and "digest" not in body
    data = seal(body) if sealable else json.dumps(body).encode()
    storage.write(f"{where}{'a' * 64}.json", data)
    entries: list[TrashEntry | Lease] = [*read_trash(storage), *all_leases(storage)]
    assert len(entries) == 1 and entries[0].problem


@FUZZ
@given(field=st.sampled_from(["save", "chunk_size", "packs", "chunks", "tensors", "lossy", "stats"]),
       value=json_values)  # fmt: skip
def test_part_parser_raises_only_corrupt_object(field: str, value: Any) -> None:
    part = wb.open("memory://").save_part({"w": torch.ones(8), "n": np.arange(4)}, lossy=None).to_json()
    part[field] = value
    _bounded(lambda: wb.SavePart.from_json(part), SLACK)


@pytest.mark.parametrize("depth", [1000, 100_000])
def test_deep_json_in_every_record(depth: int) -> None:
    deep = b"[" * depth + b"]" * depth
    storage = open_storage("memory://")
    storage.put_ref(f"{EVENTS}r.json", b'{"run": "r", "events": ' + deep + b"}", None)
    with pytest.raises(wb.CorruptObject):
        EventLog(storage).read("r")
    with pytest.raises(wb.CorruptObject):
        TagRecord.from_bytes("prod", b'{"name": "prod", "history": ' + deep + b"}")
    with pytest.raises(wb.CorruptObject):
        Manifest.from_bytes(deep, "k")
