"""Format-3 manifests (weightbank.format.stored): content apart from locations, big tables in segments.

A manifest encodes to a draft (its id, content text, segments), is stored as
one object naming where its segments lie, and reads back whole: the same
header, tree, tensors and chunks, inline or cut into segments. The id is the
hash of the content alone, so moving chunks never changes it and changing
what a load returns always does. An unchanged re-save shares every segment
of its parent, so it writes a few KiB whatever the size of its chunk table.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import replace
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

import weightbank as wb
from weightbank.bank.layout import manifest_key, pack_key, segment_hash_from_key, segment_key
from weightbank.bank.listing import read_manifest
from weightbank.bank.marker import init_storage
from weightbank.errors import CorruptObject, UnsupportedFormat
from weightbank.format import stored
from weightbank.format.dtypes import itemsize
from weightbank.format.hashing import digest
from weightbank.format.manifest import COMPACT_FORMAT, ChunkRecord, Manifest, TensorRecord
from weightbank.format.schema import DeltaArgs, LossySummary
from weightbank.format.stored import (
    MAGIC,
    Draft,
    encode,
    is_compact,
    open_object,
    open_segment,
    relocate,
    seal_segment,
    split_object,
)
from weightbank.storage import CountingStorage, LocalStorage
from weightbank.storage.base import ObjectWriter, Storage

HEX = st.binary(min_size=32, max_size=32).map(bytes.hex)
DTYPES = ("float32", "float16", "bfloat16", "float64", "int64", "int32", "int8", "uint8", "bool")
PACK_KEYS = (pack_key("ab12cd", 0), pack_key("ab12cd", 1), pack_key("ef34", 0), pack_key("9z_x-y", 12))
# JSON metadata as jsonsafe.encode leaves it (no "$f" keys, finite floats).
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(10**12), 10**12),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=8),
)
KEYS = st.text(max_size=6).filter(lambda k: k != "$f")
METADATA = st.dictionaries(
    KEYS,
    st.one_of(SCALARS, st.lists(SCALARS, max_size=3), st.dictionaries(KEYS, SCALARS, max_size=2)),
    max_size=3,
)


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    """A valid manifest: random tensors (some aliased, some empty), chunks adding up to each tensor."""
    chunk_size = draw(st.sampled_from([8, 64, 4 << 20]))
    names = draw(st.lists(st.text(max_size=10), max_size=8, unique=True))
    packs = tuple(
        draw(st.lists(st.sampled_from(PACK_KEYS), min_size=1, max_size=len(PACK_KEYS), unique=True))
    )
    tensors: list[TensorRecord] = []
    chunks: list[ChunkRecord] = []
    for name in names:
        if tensors and draw(st.integers(0, 4)) == 0:
            j = draw(st.integers(0, len(tensors) - 1))
            if tensors[j].alias_of is None:
                tensors.append(TensorRecord(name, tensors[j].dtype, tensors[j].shape, alias_of=j))
                continue
        dtype = draw(st.sampled_from(DTYPES))
        shape = tuple(draw(st.lists(st.integers(0, 4), max_size=3)))
        rec = TensorRecord(name, dtype, shape)
        left = rec.numel * itemsize(dtype)
        idx: list[int] = []
        while left > 0:
            raw = min(left, chunk_size)
            left -= raw
            same = [k for k, c in enumerate(chunks) if c.raw_len == raw]
            reuse = draw(st.sampled_from(["no", "index", "record"])) if same else "no"
            if reuse == "index":
                idx.append(draw(st.sampled_from(same)))  # a chunk the state holds twice, listed once
                continue
            if reuse == "record":  # ... or listed twice (equal rows: equal segments, stored once)
                idx.append(len(chunks))
                chunks.append(chunks[draw(st.sampled_from(same))])
                continue
            codec = draw(st.sampled_from(["raw", "zstd", "planes", "delta"] if chunks else ["raw", "zstd"]))
            args = None
            if codec == "delta":
                depth = draw(st.integers(1, 30))
                args = DeltaArgs(draw(st.sampled_from([c.hash for c in chunks])), depth, 0.125, depth)
            idx.append(len(chunks))
            chunks.append(
                ChunkRecord(
                    hash=draw(HEX),
                    raw_len=raw,
                    codec=codec,
                    pack=draw(st.integers(0, len(packs) - 1)),
                    offset=draw(st.integers(0, 1 << 40)),
                    stored_len=draw(st.integers(0, raw + 64)),
                    args=args,
                )
            )
        tensors.append(replace(rec, chunks=tuple(idx), numpy=draw(st.booleans())))
    floats = [t.name for t in tensors if t.dtype in ("float32", "float16") and t.alias_of is None]
    lossy = {n: LossySummary("int8", 0.5, 0.01) for n in floats[:1]} if draw(st.booleans()) else {}
    return Manifest(
        run=draw(st.text(max_size=10)),
        step=draw(st.none() | st.integers(0, 1 << 40)),
        parent=draw(st.none() | HEX),
        created=draw(st.floats(0, 4e9)),
        message=draw(st.text(max_size=20)),
        metrics=draw(METADATA),
        config=draw(METADATA),
        meta=draw(METADATA),
        env=draw(METADATA),
        tree={"d": [[t.name, {"T": i}] for i, t in enumerate(tensors)]},
        tensors=tuple(tensors),
        chunk_size=chunk_size,
        packs=packs,
        chunks=tuple(chunks),
        lossy=lossy,
    )


#: How a body or location table is cut: the real constants, or small ones that cut tiny manifests often.
CUTS = {
    "inline": {"INLINE_MAX": stored.INLINE_MAX},
    "one segment each": {"INLINE_MAX": 64},
    "many segments": {"INLINE_MAX": 64, "SEGMENT_MIN": 64, "SEGMENT_MASK": 1},
    # 23 bytes: the empty location table ({"packs":[],"rows":[]}) stays inline. Cut, it would make no
    # segment at all and read back as a head without locations (the real INLINE_MAX never gets there).
    "a segment per row": {"INLINE_MAX": 23, "SEGMENT_MIN": 1, "SEGMENT_MASK": 0},
    "segments at their maximum": {"INLINE_MAX": 32, "SEGMENT_MIN": 1 << 20, "SEGMENT_MAX": 100},
}


@contextmanager
def cutting(how: str) -> Iterator[None]:
    with mock.patch.multiple(stored, **CUTS[how]):  # type: ignore[call-overload]
        yield


def keys_for(draft: Draft, save_id: str = "s1") -> dict[str, str]:
    return {h: segment_key(save_id, h) for h in draft.segments}


def stored_and_read(draft: Draft, keys: Mapping[str, str] | None = None) -> Manifest:
    """``draft`` stored (object and sealed segments) and read back, every step checked."""
    keys = keys_for(draft) if keys is None else keys
    data = draft.object(keys)
    assert is_compact(data)
    content, _ = split_object(data, "m")
    assert content == draft.content and digest(content) == draft.cid
    opened = open_object(data, "m", draft.cid)
    assert sorted(opened.needed) == sorted((h, keys[h], len(t)) for h, t in draft.segments.items())
    texts = {h: open_segment(seal_segment(draft.segments[h]), h, k, n) for h, k, n in opened.needed}
    return opened.manifest(texts)


def placed(m: Manifest, segments: tuple[str, ...]) -> Manifest:
    """``m`` as a format-3 reader gives it back: packs in the order chunks first use them, unused ones gone."""
    used = list(dict.fromkeys(m.packs[c.pack] for c in m.chunks))
    chunks = tuple(replace(c, pack=used.index(m.packs[c.pack])) for c in m.chunks)
    return replace(m, packs=tuple(used), chunks=chunks, format=COMPACT_FORMAT, segments=segments)


def located(m: Manifest) -> list[tuple[Any, ...]]:
    """Every chunk with its pack by name (what a reader reads, whatever the pack table's order)."""
    return [(c.hash, c.raw_len, c.codec, m.packs[c.pack], c.offset, c.stored_len, c.args) for c in m.chunks]


@settings(max_examples=250, deadline=None)
@given(m=manifests(), how=st.sampled_from(sorted(CUTS)))
def test_a_manifest_round_trips_inline_or_in_segments(m: Manifest, how: str) -> None:
    with cutting(how):
        draft = encode(m)
    assert draft.manifest == replace(m, format=COMPACT_FORMAT)
    for h, text in draft.segments.items():
        assert digest(text) == h
    if how == "a segment per row" and m.chunks:
        assert draft.segments and draft.locations_inline is None and draft.location_segments
    # Whatever the cut, a manifest is one object exactly when neither table has segments.
    inline_body = b'"body":{"inline":' in draft.content
    assert inline_body == all(h in draft.location_segments for h in draft.segments)
    assert (draft.locations_inline is not None) == (not draft.location_segments)
    if how == "inline" and len(m.chunks) < 100 and len(m.tensors) < 50:
        assert draft.segments == {} and draft.locations_inline is not None  # small: under 16 KiB
    assert b"\x00" not in draft.content  # NUL in a name or message is escaped: the head starts at the first
    keys = keys_for(draft)
    back = stored_and_read(draft, keys)
    segments = tuple(keys[h] for h in draft.segments)
    assert back == placed(m, segments) == placed(draft.placed(keys), segments)
    # Field by field, for a readable failure: header, body, locations.
    for name in ("run", "step", "parent", "created", "message", "metrics", "config", "meta", "env"):
        assert getattr(back, name) == getattr(m, name), name
    assert (back.tree, back.tensors, back.chunk_size, back.lossy) == (
        m.tree,
        m.tensors,
        m.chunk_size,
        m.lossy,
    )
    assert located(back) == located(m)
    assert set(back.packs) == {m.packs[c.pack] for c in m.chunks}
    assert back.format == COMPACT_FORMAT and set(back.segments) == set(keys.values())
    # The one-document form (what trash keeps) reads back too, and re-encoding changes nothing.
    assert Manifest.from_json(back.to_json(), "t") == back
    with cutting(how):
        again = encode(back)
    assert (again.cid, again.content, again.segments) == (draft.cid, draft.content, draft.segments)


STATE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.uint8, torch.bool)


@st.composite
def states(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    names = draw(
        st.lists(st.text(st.characters(codec="ascii"), min_size=1, max_size=8), max_size=6, unique=True)
    )
    out = {}
    for name in names:
        dtype = draw(st.sampled_from(STATE_DTYPES))
        shape = tuple(draw(st.lists(st.integers(0, 9), max_size=3)))
        seed = draw(st.integers(0, 1 << 30))
        values = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 100
        out[name] = values.to(dtype)
    return out


@settings(max_examples=25, deadline=None)
@given(state=states(), chunk_size=st.sampled_from([64, 128, 1024]), how=st.sampled_from(sorted(CUTS)))
def test_what_a_bank_writes_reads_back_through_encode(
    state: dict[str, torch.Tensor], chunk_size: int, how: str
) -> None:
    bank = wb.open("memory://")
    with cutting(how):
        cid = bank.save(state, run="r", step=1, chunk_size=chunk_size, metrics={"x": 1.5}).id
        second = bank.save(state, run="r", step=2, chunk_size=chunk_size).id
    m = read_manifest(bank.storage, cid)
    assert m.format == COMPACT_FORMAT and m.chunk_size == chunk_size
    assert all(segment_hash_from_key(k) for k in m.segments)
    with cutting(how):
        draft = encode(m)
    assert draft.cid == cid  # what the bank stored is exactly what encode makes of what it reads
    assert stored_and_read(draft, {segment_hash_from_key(k): k for k in m.segments}) == m
    assert read_manifest(bank.storage, second).segments == m.segments  # the re-save shares every segment
    back = bank.load(cid)
    assert back.keys() == state.keys()
    for name, t in state.items():
        assert back[name].dtype == t.dtype and torch.equal(back[name], t)


def big_manifest(n: int, *, pack: str = PACK_KEYS[0], step: int = 1) -> Manifest:
    """``n`` float32 tensors of 4 elements, one chunk each, back to back in one pack."""
    tensors = tuple(TensorRecord(f"layers.{i}.weight", "float32", (4,), (i,)) for i in range(n))
    chunks = tuple(ChunkRecord(digest(str(i).encode()), 16, "raw", 0, 64 * i, 16) for i in range(n))
    return Manifest(
        run="r",
        step=step,
        parent=None,
        created=1.0,
        tree={"d": [[t.name, {"T": i}] for i, t in enumerate(tensors)]},
        tensors=tensors,
        chunk_size=16,
        packs=(pack,),
        chunks=chunks,
    )


def small_manifest() -> Manifest:
    return Manifest(
        run="r",
        step=3,
        parent="c" * 64,
        created=1.5,
        message="m",
        metrics={"loss": 0.5},
        config={"lr": 0.1},
        meta={"k": "v"},
        env={"host": "h"},
        tree={"d": [["w", {"T": 0}], ["v", {"T": 1}], ["u", {"T": 2}]]},
        tensors=(
            TensorRecord("w", "float32", (2, 2), (0,)),
            TensorRecord("v", "float32", (2, 2), alias_of=0),
            TensorRecord("u", "float32", (8,), (1, 2)),
        ),
        chunk_size=16,
        packs=(PACK_KEYS[0], PACK_KEYS[1]),
        chunks=(
            ChunkRecord("b" * 64, 16, "raw", 0, 0, 16),
            ChunkRecord("a" * 64, 16, "delta", 1, 64, 12, DeltaArgs("b" * 64, 1, 0.25, 1)),
            ChunkRecord("d" * 64, 16, "zstd", 1, 128, 9),
        ),
    )


def moved(m: Manifest) -> Manifest:
    """``m`` with every chunk somewhere else, coded otherwise: other packs, offsets, codecs, lengths, args."""
    packs = (PACK_KEYS[3], PACK_KEYS[2], PACK_KEYS[0])
    codecs = ["zstd", "raw", "planes"]
    chunks = tuple(
        replace(
            c,
            pack=(i * 7) % len(packs),
            offset=c.offset * 3 + 4096,
            codec=codecs[i % 3] if i else "delta",
            stored_len=c.stored_len + 1,
            args=DeltaArgs(m.chunks[-1].hash, 2, 0.5, 2) if i == 0 else None,
        )
        for i, c in enumerate(m.chunks)
    )
    return replace(m, packs=packs, chunks=chunks)


@pytest.mark.parametrize("how", sorted(CUTS))
@pytest.mark.parametrize("build", [small_manifest, lambda: big_manifest(400)], ids=["small", "400 tensors"])
def test_the_id_is_independent_of_locations(build: Callable[[], Manifest], how: str) -> None:
    m = build()
    other = moved(m)
    assert located(other) != located(m)
    with cutting(how):
        a, b = encode(m), encode(other)
    assert a.cid == b.cid and a.content == b.content
    body = [h for h in a.segments if h not in a.location_segments]
    assert body == [h for h in b.segments if h not in b.location_segments]
    if a.location_segments:
        assert a.location_segments != b.location_segments
    else:
        assert a.locations_inline != b.locations_inline
    # Each reads back with its own locations, under the same id.
    assert located(stored_and_read(b)) == located(other)
    assert located(stored_and_read(a)) == located(m)


def _rename(m: Manifest, i: int, name: str) -> Manifest:
    tensors = list(m.tensors)
    tensors[i] = replace(tensors[i], name=name)
    tree = json.loads(json.dumps(m.tree).replace(json.dumps(m.tensors[i].name), json.dumps(name)))
    return replace(m, tensors=tuple(tensors), tree=tree)


def _chunk_hash(m: Manifest, i: int) -> Manifest:
    chunks = list(m.chunks)
    chunks[i] = replace(chunks[i], hash="e" * 64)
    return replace(m, chunks=tuple(chunks))


def _tensor(m: Manifest, i: int, **changes: Any) -> Manifest:
    tensors = list(m.tensors)
    tensors[i] = replace(tensors[i], **changes)
    return replace(m, tensors=tuple(tensors))


#: Changes to what a checkpoint *is*: each must change the id.
CONTENT_CHANGES: dict[str, Callable[[Manifest], Manifest]] = {
    "step": lambda m: replace(m, step=(m.step or 0) + 1),
    "no step": lambda m: replace(m, step=None),
    "run": lambda m: replace(m, run=m.run + "x"),
    "parent": lambda m: replace(m, parent="f" * 64),
    "created": lambda m: replace(m, created=m.created + 1e-6),
    "message": lambda m: replace(m, message=m.message + " "),
    "metrics": lambda m: replace(m, metrics={**m.metrics, "loss": 0.25}),
    "a new metric": lambda m: replace(m, metrics={**m.metrics, "acc": 1}),
    "config": lambda m: replace(m, config={"lr": 0.2}),
    "meta": lambda m: replace(m, meta={"k": "w"}),
    "env": lambda m: replace(m, env={**m.env, "changed": True}),
    "chunk size": lambda m: replace(m, chunk_size=m.chunk_size * 2),
    "lossy": lambda m: replace(m, lossy={m.tensors[0].name: LossySummary("int8", 0.5, 0.01)}),
    "a chunk hash": lambda m: _chunk_hash(m, 0),
    "the last chunk hash": lambda m: _chunk_hash(m, len(m.chunks) - 1),
    "a tensor name": lambda m: _rename(m, 0, "renamed"),
    "the last tensor's name": lambda m: _rename(m, len(m.tensors) - 1, "renamed"),
    "a dtype": lambda m: _tensor(m, 0, dtype="int32"),
    "a shape": lambda m: _tensor(m, 0, shape=(4, 1) if m.tensors[0].shape != (4, 1) else (1, 4)),
    "numpy": lambda m: _tensor(m, 0, numpy=True),
    "the tree": lambda m: replace(m, tree={"d": [*m.tree["d"], ["extra", {"v": 1}]]}),
    "the tree's order": lambda m: replace(m, tree={"d": m.tree["d"][::-1]}),
    "a chunk's raw length": lambda m: replace(m, chunks=(replace(m.chunks[0], raw_len=15), *m.chunks[1:])),
}


@pytest.mark.parametrize("how", ["inline", "many segments"])
@pytest.mark.parametrize("change", sorted(CONTENT_CHANGES))
@pytest.mark.parametrize("build", [small_manifest, lambda: big_manifest(400)], ids=["small", "400 tensors"])
def test_a_change_to_the_content_changes_the_id(build: Callable[[], Manifest], change: str, how: str) -> None:
    m = build()
    changed = CONTENT_CHANGES[change](m)
    assert changed != m
    with cutting(how):
        a, b = encode(m), encode(changed)
        c = encode(moved(changed))
    assert a.cid != b.cid
    assert c.cid == b.cid  # and the changed manifest's id ignores its locations too


def test_the_id_is_the_hash_of_the_content_text() -> None:
    draft = encode(small_manifest())
    assert draft.cid == digest(draft.content)
    content = json.loads(draft.content)
    assert content["format"] == COMPACT_FORMAT
    assert set(content) == {
        "format",
        *("run", "step", "parent", "created", "message", "metrics", "config", "meta", "env"),
        "chunk_size",
        "body",
    }
    body = content["body"]["inline"]
    assert body["chunks"] == [[c.hash, c.raw_len] for c in small_manifest().chunks]
    for where in (b"packs/", b"offset", b"zstd", b"delta"):
        assert where not in draft.content  # no location in what the id covers


def _refs(storage: Storage, cid: str) -> tuple[list[str], list[str]]:
    """A stored manifest's body segment hashes (in the content) and location segment hashes (in the head)."""
    content, head = split_object(storage.read(manifest_key(cid)), manifest_key(cid))
    body = json.loads(content)["body"]
    location = json.loads(head)
    return [h for h, _ in body.get("segments", [])], [h for h, _ in location.get("segments", [])]


def test_an_unchanged_resave_has_exactly_the_same_segments() -> None:
    m = big_manifest(3000)
    first = encode(m)
    again = encode(replace(m, step=2, created=99.0, parent=first.cid, message="again"))
    assert len(first.segments) > 10 and first.location_segments
    assert again.cid != first.cid
    assert again.segments == first.segments and again.location_segments == first.location_segments


def test_one_changed_tensor_of_3000_rewrites_a_few_segments() -> None:
    bank = wb.open("memory://")
    gen = torch.Generator().manual_seed(1)
    state = {f"layers.{i:04d}.weight": torch.randn(4, generator=gen) for i in range(3000)}
    one = bank.save(state, run="r", step=1).id
    two = bank.save(state, run="r", step=2).id
    state["layers.1500.weight"] = torch.randn(4, generator=gen)
    three = bank.save(state, run="r", step=3).id
    m1, m2, m3 = (read_manifest(bank.storage, c) for c in (one, two, three))
    assert m2.segments == m1.segments and _refs(bank.storage, two) == _refs(bank.storage, one)
    (body2, loc2), (body3, loc3) = _refs(bank.storage, two), _refs(bank.storage, three)
    assert len(body2) >= 10 and len(loc2) >= 3
    new_body, new_loc = set(body3) - set(body2), set(loc3) - set(loc2)
    assert 1 <= len(new_body) <= 3 and 1 <= len(new_loc) <= 3, (len(new_body), len(new_loc))
    assert len(body3) - len(new_body) >= len(body2) - 3  # the rest is shared as it was
    # The new checkpoint's segments other than those few are the very objects its parent names.
    shared = set(m3.segments) & set(m2.segments)
    assert len(shared) >= len(m2.segments) - 6
    assert torch.equal(bank.load(three)["layers.1500.weight"], state["layers.1500.weight"])


class _CountedWriter:
    def __init__(self, outer: ByteCounting, key: str, inner: ObjectWriter) -> None:
        self.outer, self.key, self.inner = outer, key, inner

    def write(self, data: bytes | memoryview) -> None:
        self.outer.add(self.key, len(data))
        self.inner.write(data)

    def commit(self) -> None:
        self.inner.commit()

    def abort(self) -> None:
        self.inner.abort()


class ByteCounting(CountingStorage):
    """CountingStorage that also adds up the bytes written, by key (objects, streamed objects, refs)."""

    def __init__(self, inner: Storage) -> None:
        super().__init__(inner)
        self.written: dict[str, int] = {}
        self._bytes_lock = threading.Lock()

    def add(self, key: str, n: int) -> None:
        with self._bytes_lock:
            self.written[key] = self.written.get(key, 0) + n

    def total_written(self) -> int:
        with self._bytes_lock:
            return sum(self.written.values())

    def write(self, key: str, data: bytes | memoryview) -> None:
        self.add(key, len(data))
        super().write(key, data)

    def open_writer(self, key: str) -> ObjectWriter:
        return _CountedWriter(self, key, super().open_writer(key))

    def put_ref(self, key: str, data: bytes, expect: str | None) -> str:
        self.add(key, len(data))
        return super().put_ref(key, data, expect)

    def reset(self) -> None:
        super().reset()
        with self._bytes_lock:
            self.written = {}


@pytest.mark.parametrize("codec", ["raw", "auto"])
def test_an_unchanged_resave_of_ten_thousand_chunks_writes_a_few_kib(tmp_path: Path, codec: str) -> None:
    path = tmp_path / "bank"
    storage = ByteCounting(LocalStorage(path))
    assert init_storage(storage, create=True) == 3
    bank = wb.Bank(storage)
    gen = torch.Generator().manual_seed(7)
    state = {f"t{i:03d}": torch.randn(6400, generator=gen) for i in range(100)}  # 100 chunks of 256 B each
    first = bank.save(state, run="r", step=1, chunk_size=256, codec=codec)
    m1 = read_manifest(storage, first.id)
    assert len(m1.chunks) == 10_000 and len(m1.segments) > 10
    assert first.save_stats.manifest_bytes > 64 << 10  # the first save writes the whole table
    assert storage.total_written() > 1 << 20  # (and its packs: the counter sees streamed writes)
    storage.reset()
    second = bank.save(state, run="r", step=2, chunk_size=256, codec=codec)
    written = dict(storage.written)
    assert second.parent == first.id and second.save_stats.written_bytes == 0
    assert sum(written.values()) <= 64 << 10, sorted(written.items(), key=lambda kv: -kv[1])[:8]
    assert not [k for k in written if k.startswith(("segments/", "packs/"))]
    m2 = read_manifest(storage, second.id)
    assert m2.segments == m1.segments
    size = (path / manifest_key(second.id)).stat().st_size
    assert second.save_stats.manifest_bytes == size == written[manifest_key(second.id)]
    assert size <= 16 << 10
    bank.close()
    fresh = wb.open(str(path), create=False)
    back = fresh.load(second.id)
    assert back.keys() == state.keys()
    for name, t in state.items():
        assert torch.equal(back[name], t)
    assert fresh.verify(second.id).ok


def test_relocate_keeps_the_content_and_the_id() -> None:
    m = big_manifest(1500)
    draft = encode(m)
    assert draft.location_segments
    other = moved(m)
    again = relocate(draft.content, draft.cid, other)
    assert (again.cid, again.content) == (draft.cid, draft.content)
    body = [h for h in draft.segments if h not in draft.location_segments]
    assert [h for h in again.segments if h not in again.location_segments] == body
    assert all(again.segments[h] == b"" for h in body)  # the body segments are the stored ones: not rebuilt
    texts = {**draft.segments, **{h: t for h, t in again.segments.items() if t}}
    keys = {h: segment_key("s2", h) for h in again.segments}
    opened = open_object(again.object(keys), "m", draft.cid)
    back = opened.manifest({h: texts[h] for h, _, _ in opened.needed})
    assert located(back) == located(other)
    assert back == placed(other, tuple(keys[h] for h in again.segments))


def test_a_draft_needs_a_key_for_every_segment() -> None:
    with cutting("many segments"):
        draft = encode(small_manifest())
    assert draft.segments
    keys = keys_for(draft)
    keys.pop(next(iter(keys)))
    with pytest.raises(KeyError):
        draft.object(keys)


def test_names_with_nul_and_newlines_round_trip() -> None:
    m = _rename(small_manifest(), 0, 'a\x00b\n"c"\\')
    m = replace(m, message="\x00\n", run="r\x00", metrics={"\x00": "\x00"})
    for how in ("inline", "a segment per row"):
        with cutting(how):
            draft = encode(m)
        assert b"\x00" not in draft.content
        assert stored_and_read(draft).tensors[0].name == 'a\x00b\n"c"\\'


# -- refusals ------------------------------------------------------------------------------------------


def _frame(payload: bytes) -> bytes:
    return zstandard.ZstdCompressor(write_checksum=True).compress(payload)


def test_open_segment_refuses_what_is_not_the_segment_it_names() -> None:
    text = b'{"packs":[],"rows":[]}'
    h = digest(text)
    data = seal_segment(text)
    assert open_segment(data, h, "k", len(text)) == text == open_segment(data, h, "k")
    refusals = {
        "wrong hash": (data, digest(b"other"), len(text)),
        "wrong size": (data, h, len(text) + 1),
        "size zero": (data, h, 0),
        "another text": (seal_segment(text + b" "), h, None),
        "plain bytes": (text, h, None),
        "empty": (b"", h, None),
        "zstd magic, then nothing": (data[:4], h, None),
        "truncated frame": (data[:-5], h, None),
        "checksum fails": (data[:-1] + bytes([data[-1] ^ 0xFF]), h, None),
    }
    for what, (blob, hh, size) in refusals.items():
        with pytest.raises(CorruptObject) as info:
            open_segment(blob, hh, "segments/ab/x.zst", size)
        assert info.value.key == "segments/ab/x.zst", what


def test_open_segment_names_both_hashes_on_a_mismatch() -> None:
    with pytest.raises(CorruptObject, match="segment bytes changed") as info:
        open_segment(seal_segment(b"abc"), "0" * 64, "k")
    assert (info.value.expected, info.value.actual) == ("0" * 64, digest(b"abc"))


def test_open_object_refuses_damaged_objects() -> None:
    draft = encode(small_manifest())
    data = draft.object({})
    payload = zstandard.ZstdDecompressor().decompress(data)
    content, head = payload[len(MAGIC) :].split(b"\x00", 1)
    assert open_object(data, "m", draft.cid).manifest({}).run == "r"
    refusals: dict[str, tuple[bytes, str, str]] = {
        "wrong cid": (data, digest(b"x"), "manifest content changed"),
        "missing magic": (
            _frame(content + b"\x00" + head),
            digest(content),
            "not a format-3 manifest object",
        ),
        "another magic": (_frame(b"WBM4\n" + content + b"\x00" + head), digest(content), "not a format-3"),
        "no NUL separator": (_frame(MAGIC + content + head), digest(content + head), "has no location head"),
        "truncated frame": (data[: len(data) // 2], draft.cid, "zstd frame"),
        "frame cut before its checksum": (data[:-4], draft.cid, "zstd frame"),
        "checksum fails": (data[:-1] + bytes([data[-1] ^ 1]), draft.cid, "zstd frame"),
        "two frames": (data + data, draft.cid, ""),
        "not zstd": (payload, draft.cid, "zstd frame"),
        "empty": (b"", draft.cid, "zstd frame"),
        "content not JSON": (
            _frame(MAGIC + b"{x\x00{}"),
            digest(b"{x"),
            "manifest content is not valid JSON",
        ),
        "content a list": (_frame(MAGIC + b"[]\x00{}"), digest(b"[]"), "not a JSON object"),
        "head not JSON": (_frame(MAGIC + content + b"\x00{"), draft.cid, "location head is not valid JSON"),
        "head a list": (_frame(MAGIC + content + b"\x00[]"), draft.cid, "location head"),
        "head without keys": (_frame(MAGIC + content + b'\x00{"inline":{}}'), draft.cid, "keys"),
    }
    for what, (blob, cid, why) in refusals.items():
        if what == "two frames":
            # One frame is read; what follows it is not part of the manifest. Either refusing it or
            # reading the first frame is sound: never a different manifest.
            with suppress(CorruptObject):
                assert open_object(blob, "m", cid).manifest({}) == open_object(data, "m", cid).manifest({})
            continue
        with pytest.raises(CorruptObject, match=why) as info:
            open_object(blob, "manifests/ab/x.json", cid)
        assert info.value.key == "manifests/ab/x.json", what


def test_open_object_refuses_a_content_format_it_does_not_know() -> None:
    draft = encode(small_manifest())
    content = json.loads(draft.content)
    for fmt, error in (
        (99, UnsupportedFormat),
        (4, UnsupportedFormat),
        (1, CorruptObject),
        (None, CorruptObject),
    ):
        content["format"] = fmt
        text = json.dumps(content).encode()
        with pytest.raises(error):
            open_object(
                _frame(MAGIC + text + b'\x00{"inline":{"packs":[],"rows":[]},"keys":{}}'), "m", digest(text)
            )


def test_assembling_without_a_needed_segment_is_corrupt() -> None:
    with cutting("many segments"):
        draft = encode(big_manifest(50))
    opened = open_object(draft.object(keys_for(draft)), "m", draft.cid)
    texts = {h: draft.segments[h] for h, _, _ in opened.needed}
    texts.pop(next(iter(texts)))
    with pytest.raises(CorruptObject, match="KeyError"):
        opened.manifest(texts)


def test_is_compact_tells_format_3_objects_from_json_manifests() -> None:
    draft = encode(small_manifest())
    assert is_compact(draft.object({}))
    assert not is_compact(small_manifest().to_bytes())
    assert not is_compact(b"")


def test_chunks_that_are_only_delta_bases_live_in_the_head_and_no_tensor_can_name_them() -> None:
    """A delta chunk's base (its parent's chunk) is listed in the location head, not in the content,
    so chains can be re-encoded without a new id; a content that makes a tensor name such a row is
    refused (the head, which the id does not cover, would choose the tensor's bytes)."""
    bank = wb.open("memory://")
    w = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(1))
    first = bank.save({"w": w}, run="r", step=0)
    changed = w * (1 + 1e-4)  # a small update of every weight: an XOR delta against the parent's chunks
    second = bank.save({"w": changed}, run="r", step=1, parent=first.id)
    m = read_manifest(bank.storage, second.id)
    assert any(c.codec == "delta" for c in m.chunks)
    content_rows = len({i for t in m.tensors for i in t.chunks})
    assert content_rows < len(m.chunks), "the chain's bases are in the table, after the tensors' chunks"
    draft = encode(m)
    assert draft.cid == second.id
    content = json.loads(draft.content)
    assert len(content["body"]["inline"]["chunks"]) == content_rows
    # A content (so a new id) whose tensor names the first base-only row:
    content["body"]["inline"]["tensors"][0]["chunks"][0] = content_rows
    forged = json.dumps(content, separators=(",", ":")).encode()
    _, head = split_object(draft.object({}), "m")
    data = zstandard.ZstdCompressor().compress(MAGIC + forged + b"\x00" + head)
    with pytest.raises(CorruptObject, match="a tensor names a chunk the content does not list"):
        open_object(data, "m", digest(forged)).manifest({})
