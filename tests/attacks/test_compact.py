"""Crafted format-3 manifest objects: each a typed error for itself and harmless to the rest.

A format-3 manifest is one zstd frame, ``WBM3\\n`` + content + NUL + location
head, and its segments are objects of their own (:mod:`weightbank.format.stored`).
The id covers the content alone, so an attack on the content is planted under
the content's new hash, and an attack on the head (or on a segment) keeps
the id of the checkpoint it damages. The sample's manifests are cut into
segments (a small ``INLINE_MAX`` while it is saved), so every attack has a
body segment and a location segment to aim at.

Each attack in :data:`ATTACKS` is planted where it makes sense:

* as a *copy* of the sample's newest checkpoint (its message changed, so a
  new id; its segments shared with the original): loading it (or ``show``)
  raises the typed error the table names, for the reason :data:`WHY` names;
  the sample stays usable in this process and a fresh one; ``verify``
  reports that manifest alone; ``gc`` and ``repack`` refuse and delete
  nothing; once it is removed, gc runs and keeps the sample's segments;
* *in place* on the sample's first checkpoint, the content kept byte for byte
  (the same id) — a head rewritten, a segment damaged: that checkpoint fails
  to load, its sibling and the tag still load, ``verify`` names it, ``gc``
  and ``repack`` refuse.

A readable head that moves a chunk inside its pack is caught by the chunk's
hash: a CorruptObject, never other bytes. Frames past ``MAX_TEXT`` (declared
or not) are refused before they are decompressed, and ``verify(ref)`` checks
the stored object, not a cached manifest (two bugs these tests found).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import zstandard

import weightbank as wb
from weightbank.bank.layout import manifest_key, segment_hash_from_key, segment_key
from weightbank.errors import WeightbankError
from weightbank.format import stored
from weightbank.format.hashing import digest
from weightbank.format.stored import MAGIC, seal_segment, split_object

from .craft import Sample, sample_bank, still_usable


def _compress(payload: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3, write_checksum=True).compress(payload)


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


@dataclass
class Stored:
    """One stored format-3 manifest taken apart, to be mutated and planted again."""

    root: Path
    cid: str
    content: dict[str, Any]
    content_text: bytes
    head: dict[str, Any]

    @classmethod
    def of(cls, root: Path, cid: str) -> Stored:
        content, head = split_object((root / manifest_key(cid)).read_bytes(), manifest_key(cid))
        return cls(root, cid, json.loads(content), content, json.loads(head))

    # -- what the manifest names --------------------------------------------------------------------
    def body_refs(self) -> list[list[Any]]:
        refs: list[list[Any]] = self.content["body"]["segments"]
        return refs

    def location_refs(self) -> list[list[Any]]:
        refs: list[list[Any]] = self.head["segments"]
        return refs

    def key(self, h: str) -> str:
        k: str = self.head["keys"][h]
        return k

    def path(self, h: str) -> Path:
        return self.root / self.key(h)

    def text(self, h: str) -> bytes:
        return zstandard.ZstdDecompressor().decompress(self.path(h).read_bytes())

    def plant_segment(self, text: bytes, save_id: str = "crafted") -> str:
        """Store ``text`` as a well-named segment; its hash."""
        h = digest(text)
        path = self.root / segment_key(save_id, h)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(seal_segment(text))
        return h

    def inline_locations(self) -> dict[str, Any]:
        """Move the location table from its segments into the head (a valid form); the table."""
        rows: list[Any] = []
        packs: list[str] = []
        for h, _ in self.location_refs():
            table = json.loads(self.text(h))
            for row in table["rows"]:
                name = table["packs"][row[0]]
                if name not in packs:
                    packs.append(name)
                rows.append([packs.index(name), *row[1:]])
            del self.head["keys"][h]
        del self.head["segments"]
        self.head["inline"] = {"packs": packs, "rows": rows}
        inline: dict[str, Any] = self.head["inline"]
        return inline

    # -- planting -----------------------------------------------------------------------------------
    def object(self, *, keep_content: bool) -> tuple[str, bytes]:
        content = self.content_text if keep_content else _json(self.content)
        return digest(content), _compress(MAGIC + content + b"\x00" + _json(self.head))

    def plant(self, data: bytes, cid: str) -> str:
        path = self.root / manifest_key(cid)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return cid


@pytest.fixture
def sample(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Sample:
    """The attack sample, its manifests stored in segments (body and locations both)."""
    with monkeypatch.context() as mp:
        mp.setattr(stored, "INLINE_MAX", 64)
        s = sample_bank(tmp_path / "bank")
    for cid in (s.first, s.second):
        st = Stored.of(s.root, cid)
        assert len(st.body_refs()) == 1 and len(st.location_refs()) == 1
    return s


#: An attack mutates a Stored in place (content, head, segments in storage), or returns the object bytes.
Attack = Callable[[Stored], bytes | None]


def _set_key(h_of: Callable[[Stored], str], key: Callable[[Stored, str], object]) -> Attack:
    def apply(s: Stored) -> None:
        h = h_of(s)
        s.head["keys"][h] = key(s, h)

    return apply


def _body_hash(s: Stored) -> str:
    h: str = s.body_refs()[0][0]
    return h


def _location_hash(s: Stored) -> str:
    h: str = s.location_refs()[0][0]
    return h


def _replace_segment_bytes(s: Stored) -> None:
    """The body segment's stored bytes swapped for another text of the same length (hash mismatch)."""
    h = _body_hash(s)
    text = bytearray(s.text(h))
    text[text.index(b'"w"') + 1] = ord("x")  # the tensor "w" renamed "x"
    s.path(h).write_bytes(seal_segment(bytes(text)))


def _location_row(change: Callable[[dict[str, Any]], None]) -> Attack:
    def apply(s: Stored) -> None:
        change(s.inline_locations())

    return apply


def _location_segment_text(change: Callable[[bytes], bytes]) -> Attack:
    """The location segment replaced by a crafted, well-named, hash-valid one (the content kept)."""

    def apply(s: Stored) -> None:
        old = _location_hash(s)
        text = change(s.text(old))
        h = s.plant_segment(text)
        del s.head["keys"][old]
        s.head["keys"][h] = segment_key("crafted", h)
        s.head["segments"] = [[h, len(text)]]

    return apply


def _location_segment(change: Callable[[dict[str, Any]], None]) -> Attack:
    def edit(text: bytes) -> bytes:
        table = json.loads(text)
        change(table)
        return _json(table)

    return _location_segment_text(edit)


def _body_segment(change: Callable[[bytes], bytes]) -> Attack:
    """The body segment replaced by a crafted, well-named, hash-valid one (a content change: a new id)."""

    def apply(s: Stored) -> None:
        old = _body_hash(s)
        text = change(s.text(old))
        h = s.plant_segment(text)
        del s.head["keys"][old]
        s.head["keys"][h] = segment_key("crafted", h)
        s.content["body"]["segments"] = [[h, len(text)]]

    return apply


def _content(change: Callable[[dict[str, Any]], None]) -> Attack:
    def apply(s: Stored) -> None:
        change(s.content)

    return apply


def _head_text(text: bytes) -> Attack:
    def apply(s: Stored) -> bytes:
        return _compress(MAGIC + _json(s.content) + b"\x00" + text)

    return apply


def _set(path: tuple[Any, ...], value: Any) -> Callable[[Any], None]:
    def apply(obj: Any) -> None:
        for k in path[:-1]:
            obj = obj[k]
        obj[path[-1]] = value

    return apply


def _delete_segment(s: Stored) -> None:
    s.path(_body_hash(s)).unlink()


def _segment_emptied(s: Stored) -> None:
    s.path(_body_hash(s)).write_bytes(b"")


def _segment_made_a_directory(s: Stored) -> None:
    path = s.path(_body_hash(s))
    path.unlink()
    path.mkdir()


def _drop_key(s: Stored) -> None:
    del s.head["keys"][_body_hash(s)]


def _inline_list(s: Stored) -> None:
    s.inline_locations()
    s.head["inline"] = []


def _inline_and_segments(s: Stored) -> None:
    """An inline table (the real one) next to the location segments it came from, still listed."""
    head = json.loads(json.dumps(s.head))
    table = s.inline_locations()
    s.head = head
    s.head["inline"] = table


def _location_listed_twice(s: Stored) -> None:
    s.head["segments"] = s.location_refs() * 2


#: Where an attack is planted: on a copy of the newest checkpoint (a new id), also in place on the first
#: checkpoint (the content kept, so the id too), or in place only (it damages a segment it shares).
COPY, BOTH, IN_PLACE = "copy", "both", "in place"

#: name → (attack, the error loading it raises, where it is planted).
ATTACKS: dict[str, tuple[Attack, type[WeightbankError], str]] = {
    # segment keys and segments
    "segment key with path traversal": (
        _set_key(_body_hash, lambda s, h: "segments/../../x"),
        wb.CorruptObject,
        BOTH,
    ),
    "segment key with traversal inside a well-formed name": (
        _set_key(_body_hash, lambda s, h: f"segments/{h[:2]}/../../{h}.zst"),
        wb.CorruptObject,
        BOTH,
    ),
    "segment key naming a pack": (
        _set_key(_body_hash, lambda s, h: "packs/ab/ab12-0.pack"),
        wb.CorruptObject,
        BOTH,
    ),
    "segment key whose hash part is another segment's": (
        _set_key(_body_hash, lambda s, h: s.key(_location_hash(s))),
        wb.CorruptObject,
        BOTH,
    ),
    "segment key whose hash part differs from the listed hash": (
        _set_key(_body_hash, lambda s, h: segment_key("evil", "ab" * 32)),
        wb.CorruptObject,
        BOTH,
    ),
    "segment key that is not a string": (_set_key(_body_hash, lambda s, h: 7), wb.CorruptObject, BOTH),
    "listed segment missing from storage": (
        _set_key(_body_hash, lambda s, h: segment_key("gone", h)),
        wb.CorruptObject,
        BOTH,
    ),
    "location segment missing from storage": (
        _set_key(_location_hash, lambda s, h: segment_key("gone", h)),
        wb.CorruptObject,
        BOTH,
    ),
    "segment bytes replaced (hash mismatch)": (_replace_segment_bytes, wb.CorruptObject, IN_PLACE),
    "segment deleted": (_delete_segment, wb.CorruptObject, IN_PLACE),
    "segment emptied": (_segment_emptied, wb.CorruptObject, IN_PLACE),
    "segment replaced by a directory": (_segment_made_a_directory, wb.CorruptObject, IN_PLACE),
    "segment with no key in the head": (
        _drop_key,
        wb.CorruptObject,
        BOTH,
    ),
    "head names a segment the manifest does not use": (
        lambda s: s.head["keys"].__setitem__("cd" * 32, segment_key("x", "cd" * 32)),
        wb.CorruptObject,
        BOTH,
    ),
    "location segment listed with a wrong size": (
        lambda s: s.location_refs()[0].__setitem__(1, s.location_refs()[0][1] + 1),
        wb.CorruptObject,
        BOTH,
    ),
    "body segment listed with a wrong size": (
        lambda s: s.body_refs()[0].__setitem__(1, s.body_refs()[0][1] - 1),
        wb.CorruptObject,
        COPY,
    ),
    "body segment of 2**40 bytes": (
        lambda s: s.body_refs()[0].__setitem__(1, 1 << 40),
        wb.CorruptObject,
        COPY,
    ),
    "segment hash that is not one": (
        lambda s: s.body_refs()[0].__setitem__(0, "../" * 10),
        wb.CorruptObject,
        COPY,
    ),
    "body segment listed twice with two sizes": (
        lambda s: s.body_refs().append([_body_hash(s), 5]),
        wb.CorruptObject,
        COPY,
    ),
    "body segment that is not JSON": (_body_segment(lambda t: t[:-7]), wb.CorruptObject, COPY),
    "body segment whose tensor has no chunks": (
        _body_segment(lambda t: t.replace(b'"chunks":[0]', b'"chunks":[]')),
        wb.CorruptObject,
        COPY,
    ),
    "location segment that is not JSON": (_location_segment_text(lambda t: t[:-3]), wb.CorruptObject, BOTH),
    "location segment nested 100,000 levels": (
        _location_segment_text(lambda t: b"[" * 100_000 + b"]" * 100_000),
        wb.CorruptObject,
        BOTH,
    ),
    "location segment that is an empty object": (
        _location_segment(lambda t: t.clear()),
        wb.CorruptObject,
        BOTH,
    ),
    "location segment whose row names a pack outside its table": (
        _location_segment(lambda t: t["rows"][0].__setitem__(0, 3)),
        wb.CorruptObject,
        BOTH,
    ),
    "location segment with one row too few": (
        _location_segment(lambda t: t["rows"].pop()),
        wb.CorruptObject,
        BOTH,
    ),
    # the location table, inline in the head
    "location rows fewer than content chunk rows": (
        _location_row(lambda t: t["rows"].pop()),
        wb.CorruptObject,
        BOTH,
    ),
    "location rows more than content chunk rows": (
        _location_row(lambda t: t["rows"].append(list(t["rows"][0]))),
        wb.CorruptObject,
        BOTH,
    ),
    "location row pointing at a pack outside its table": (
        _location_row(lambda t: t["rows"][0].__setitem__(0, len(t["packs"]))),
        wb.CorruptObject,
        BOTH,
    ),
    "location row with a negative pack index": (
        _location_row(lambda t: t["rows"][0].__setitem__(0, -1)),
        wb.CorruptObject,
        BOTH,
    ),
    "location naming a non-pack key": (
        _location_row(lambda t: t["packs"].__setitem__(0, "manifests/../../etc/passwd")),
        wb.CorruptObject,
        BOTH,
    ),
    "location naming a pack key with traversal": (
        _location_row(lambda t: t["packs"].__setitem__(0, "packs/../../etc/passwd")),
        wb.CorruptObject,
        BOTH,
    ),
    "unknown codec in a location row": (
        _location_row(lambda t: t["rows"][0].__setitem__(2, "future-codec")),
        wb.UnsupportedFormat,
        BOTH,
    ),
    "location row with three fields": (
        _location_row(lambda t: t["rows"][0].pop()),
        wb.CorruptObject,
        BOTH,
    ),
    "location row with a negative offset": (
        _location_row(lambda t: t["rows"][0].__setitem__(1, -1)),
        wb.CorruptObject,
        BOTH,
    ),
    "location row with a stored length of 2**45": (
        _location_row(lambda t: t["rows"][0].__setitem__(3, 1 << 45)),
        wb.CorruptObject,
        BOTH,
    ),
    "location row with codec args on a raw chunk": (
        _location_row(lambda t: t["rows"][1].append({"base": "a" * 64, "depth": 1})),
        wb.CorruptObject,
        BOTH,
    ),
    "location row of a delta whose base is not listed": (
        _location_row(
            lambda t: t["rows"][1].__setitem__(
                slice(2, 5), ["delta", 4, {"base": "c" * 64, "depth": 1, "cost": 0.1, "gen": 1}]
            )
        ),
        wb.CorruptObject,
        BOTH,
    ),
    "location table that is a list": (_inline_list, wb.CorruptObject, BOTH),
    "inline locations next to listed location segments": (_inline_and_segments, wb.CorruptObject, BOTH),
    "location segment listed twice": (_location_listed_twice, wb.CorruptObject, BOTH),
    # the content
    "content format 99": (_content(_set(("format",), 99)), wb.UnsupportedFormat, COPY),
    "content format 1 in a format-3 object": (_content(_set(("format",), 1)), wb.CorruptObject, COPY),
    "content format that is a string": (_content(_set(("format",), "3")), wb.CorruptObject, COPY),
    "content without a body": (_content(lambda c: c.pop("body")), wb.CorruptObject, COPY),
    "content body that is a list": (_content(_set(("body",), [])), wb.CorruptObject, COPY),
    "content with a chunk size of zero": (_content(_set(("chunk_size",), 0)), wb.CorruptObject, COPY),
    "content step that is a bool": (_content(_set(("step",), True)), wb.CorruptObject, COPY),
    "content parent that is no id": (_content(_set(("parent",), "../x")), wb.CorruptObject, COPY),
    # the head, and the frame
    "a head that is not JSON": (_head_text(b"\xff{not json"), wb.CorruptObject, COPY),
    "a head that is a list": (_head_text(b"[1,2]"), wb.CorruptObject, COPY),
    "a head without keys": (_head_text(b'{"segments":[]}'), wb.CorruptObject, COPY),
    "a head nested 100,000 levels": (_head_text(b"[" * 100_000 + b"]" * 100_000), wb.CorruptObject, COPY),
    "no NUL between content and head": (
        lambda s: _compress(MAGIC + _json(s.content) + _json(s.head)),
        wb.CorruptObject,
        COPY,
    ),
    "no magic": (
        lambda s: _compress(_json(s.content) + b"\x00" + _json(s.head)),
        wb.CorruptObject,
        COPY,
    ),
    "a truncated frame": (
        lambda s: s.object(keep_content=False)[1][:-9],
        wb.CorruptObject,
        COPY,
    ),
    "a frame whose checksum fails": (
        lambda s: (lambda d: d[:-1] + bytes([d[-1] ^ 1]))(s.object(keep_content=False)[1]),
        wb.CorruptObject,
        COPY,
    ),
    "zstd magic then garbage": (lambda s: b"\x28\xb5\x2f\xfd" + b"\xff" * 40, wb.CorruptObject, COPY),
}


#: What each refusal says (a regex searched in the error): the check that caught the attack is the one named.
WHY: dict[str, str] = {
    "a frame whose checksum fails": "zstd frame",
    "a head nested 100,000 levels": "location head is nested too deeply",
    "a head that is a list": "location head has",
    "a head that is not JSON": "location head is not valid JSON",
    "a head without keys": "KeyError: 'keys'",
    "a truncated frame": "zstd frame",
    "body segment listed twice with two sizes": "listed with two sizes",
    "body segment listed with a wrong size": "segment holds .* bytes, its manifest says",
    "body segment of 2**40 bytes": "segment size out of range",
    "body segment that is not JSON": "manifest body is not valid JSON",
    "body segment whose tensor has no chunks": "chunks of 'w' do not add up",
    "content body that is a list": "body has",
    "content format 1 in a format-3 object": "format 1 in a format-3 object",
    "content format 99": "format version 99",
    "content format that is a string": "format '3' in a format-3 object",
    "content parent that is no id": "parent",
    "content step that is a bool": "step",
    "content with a chunk size of zero": "chunk_size 0",
    "content without a body": "KeyError: 'body'",
    "head names a segment the manifest does not use": "names segments the manifest does not use",
    "inline locations next to listed location segments": "names segments the manifest does not use",
    "listed segment missing from storage": "segment of checkpoint .* is gone",
    "location naming a non-pack key": "which is not a pack key",
    "location naming a pack key with traversal": "which is not a pack key",
    "location row of a delta whose base is not listed": "base is not in the chunk table",
    "location row pointing at a pack outside its table": "names a pack outside its table",
    "location row with a negative offset": "points outside its pack table",
    "location row with a negative pack index": "names a pack outside its table",
    "location row with a stored length of 2**45": "stored bytes",
    "location row with codec args on a raw chunk": "raw chunk .* has codec args",
    "location row with three fields": "location rows have 4 or 5 fields",
    "location rows fewer than content chunk rows": "2 chunks but 1 locations",
    "location rows more than content chunk rows": "2 chunks but 3 locations",
    "location segment listed twice": "2 chunks but 4 locations",
    "location segment listed with a wrong size": "segment holds .* bytes, its manifest says",
    "location segment missing from storage": "segment of checkpoint .* is gone",
    "location segment nested 100,000 levels": "location segment is nested too deeply",
    "location segment that is an empty object": "KeyError: 'packs'",
    "location segment that is not JSON": "location segment is not valid JSON",
    "location segment whose row names a pack outside its table": "names a pack outside its table",
    "location segment with one row too few": "2 chunks but 1 locations",
    "location table that is a list": "inline locations has",
    "no NUL between content and head": "has no location head",
    "no magic": "not a format-3 manifest object",
    "segment bytes replaced (hash mismatch)": "segment bytes changed",
    "segment deleted": "segment of checkpoint .* is gone",
    "segment emptied": "zstd frame",
    "segment replaced by a directory": "segment of checkpoint .* is gone",
    "segment hash that is not one": "segment hash",
    "segment key naming a pack": "which is not a segment key",
    "segment key that is not a string": "segment key has",
    "segment key whose hash part differs from the listed hash": "names another hash",
    "segment key whose hash part is another segment's": "names another hash",
    "segment key with path traversal": "which is not a segment key",
    "segment key with traversal inside a well-formed name": "which is not a segment key",
    "segment with no key in the head": "has no key",
    "unknown codec in a location row": "future-codec",
    "zstd magic then garbage": "zstd frame",
}


def _packs(root: Path) -> set[Path]:
    return set((root / "packs").rglob("*.pack"))


def _craft(sample: Sample, cid: str, attack: Attack, *, copy: bool) -> str:
    """Apply ``attack`` to the stored manifest ``cid`` and plant the result; the id it is planted under.

    ``copy``: first change the content's message, so the result is a new checkpoint (a new id) that
    shares every segment with ``cid``; else the content is kept byte for byte (the id stays ``cid``).
    """
    s = Stored.of(sample.root, cid)
    if copy:
        s.content["message"] = "crafted"
    raw = attack(s)
    if raw is not None:
        return s.plant(raw, digest(_json(s.content)))
    new, data = s.object(keep_content=not copy)
    assert copy or new == cid
    return s.plant(data, new)


def _refused_everywhere(
    sample: Sample, bad: str, error: type[WeightbankError], why: str | None = None
) -> None:
    for bank in (sample.bank, wb.open(str(sample.root), create=False)):
        with pytest.raises(error, match=why):
            bank.load(bad)
        with pytest.raises(error, match=why):
            bank.show(bad)
        report = bank.verify()
        assert not report.ok
        assert [(p.kind, p.key) for p in report.problems] == [("manifest", manifest_key(bad))]
        before = _packs(sample.root)
        with pytest.raises(wb.CorruptObject, match="gc refuses"):
            bank.gc(grace=0)
        with pytest.raises(wb.CorruptObject, match="repack refuses"):
            bank.repack(min_dead=0.01)
        assert _packs(sample.root) == before


def _segments(root: Path) -> set[Path]:
    return set((root / "segments").rglob("*.zst"))


@pytest.mark.parametrize("name", sorted(n for n, (_, _, where) in ATTACKS.items() if where != IN_PLACE))
def test_crafted_compact_manifest_is_a_typed_error_and_harmless(sample: Sample, name: str) -> None:
    attack, error, _ = ATTACKS[name]
    assert issubclass(error, WeightbankError)
    theirs = _segments(sample.root)
    bad = _craft(sample, sample.second, attack, copy=True)
    assert bad not in (sample.first, sample.second)
    _refused_everywhere(sample, bad, error, WHY[name])
    still_usable(sample, bad_refs=(bad,))
    # Once it is gone gc runs again: what the attack planted goes, the sample's segments stay.
    (sample.root / manifest_key(bad)).unlink()
    assert sample.bank.verify().ok
    sample.bank.gc(grace=0)
    assert _segments(sample.root) == theirs
    still_usable(sample)


@pytest.mark.parametrize("name", sorted(n for n, (_, _, where) in ATTACKS.items() if where != COPY))
def test_head_or_segment_damage_breaks_only_that_checkpoint(sample: Sample, name: str) -> None:
    """The content kept (the id stays): the sample's first checkpoint is damaged, the second is not."""
    attack, error, _ = ATTACKS[name]
    bad = _craft(sample, sample.first, attack, copy=False)
    assert bad == sample.first
    # A fresh view reads the damaged object (the sample's own process may answer from the manifest it
    # cached when it saved: the same content, read before the damage).
    with pytest.raises(error, match=WHY[name]):
        wb.open(str(sample.root), create=False).load(sample.first)
    for bank in (sample.bank, wb.open(str(sample.root), create=False)):
        assert torch.equal(bank.load("prod")["w"], sample.state["w"])
        assert torch.equal(bank.load(sample.second)["b"], sample.state["b"])
        assert bank.resolve("r@latest") == sample.second
        assert bank.verify(sample.second).ok
        report = bank.verify()
        assert [(p.kind, p.key, p.checkpoint) for p in report.problems] == [
            ("manifest", manifest_key(sample.first), sample.first)
        ]
        before = _packs(sample.root)
        with pytest.raises(wb.CorruptObject, match="gc refuses"):
            bank.gc(grace=0)
        with pytest.raises(wb.CorruptObject, match="repack refuses"):
            bank.repack(min_dead=0.01)
        assert _packs(sample.root) == before


def test_every_attack_is_planted_somewhere_and_says_why() -> None:
    assert {where for _, _, where in ATTACKS.values()} == {COPY, BOTH, IN_PLACE}
    assert set(WHY) == set(ATTACKS)


def test_a_clean_segmented_sample_reports_nothing_and_gc_keeps_its_segments(sample: Sample) -> None:
    """The control for the attacks above."""
    segments = _segments(sample.root)
    assert len(segments) == 4
    assert sample.bank.verify().problems == ()
    sample.bank.gc(grace=0)
    assert _segments(sample.root) == segments
    still_usable(sample)


#: name → (how the first checkpoint's location rows change, whether its load must still return the right bytes).
#: Chunk 0 is "w" (planes, at offset 0), chunk 1 is "b" (raw, 32 bytes), both in one pack.
MOVES: dict[str, tuple[Callable[[list[list[Any]]], None], bool]] = {
    "chunk 1 read from chunk 0's place": (lambda rows: rows.__setitem__(1, list(rows[0])), False),
    "chunk 0 read from chunk 1's place": (lambda rows: rows.__setitem__(0, list(rows[1])), False),
    "the two chunks' places swapped": (lambda rows: rows.reverse(), False),
    "chunk 1 one byte further on": (lambda rows: rows[1].__setitem__(1, rows[1][1] + 1), False),
    "chunk 1 one byte earlier": (lambda rows: rows[1].__setitem__(1, rows[1][1] - 1), False),
    "chunk 0 one byte shorter": (lambda rows: rows[0].__setitem__(3, rows[0][3] - 1), False),
    "chunk 0 read as raw": (lambda rows: rows[0].__setitem__(2, "raw"), False),
    "chunk 1 read as planes": (lambda rows: rows[1].__setitem__(2, "planes"), False),
    "chunk 1 past the end of its pack": (lambda rows: rows[1].__setitem__(1, 1 << 20), False),
    # A raw chunk is read raw_len bytes from its offset, and hashed: a wrong stored_len changes nothing
    # read (verify, which checks the record itself, reports it).
    "raw chunk 1 one byte shorter": (lambda rows: rows[1].__setitem__(3, rows[1][3] - 1), True),
}


@pytest.mark.parametrize("name", sorted(MOVES))
def test_a_location_moved_inside_a_pack_is_corrupt_never_wrong_bytes(sample: Sample, name: str) -> None:
    change, loads = MOVES[name]
    s = Stored.of(sample.root, sample.first)
    change(s.inline_locations()["rows"])
    cid, data = s.object(keep_content=True)
    assert cid == sample.first  # a head change keeps the id: only the hash check stands in the way
    s.plant(data, cid)
    expect = {"w": torch.arange(64, dtype=torch.float32).reshape(8, 8), "b": torch.ones(8)}
    for bank in (wb.open(str(sample.root), create=False),):
        if not loads:
            with pytest.raises(wb.CorruptObject):
                bank.load(sample.first)
        for tensor in ("w", "b"):
            try:
                got = bank.load(sample.first, select=tensor)
            except wb.CorruptObject:
                assert not loads
                continue
            assert torch.equal(got[tensor], expect[tensor])  # whatever loads is the checkpoint's bytes
        report = bank.verify()
        assert {p.checkpoint for p in report.problems} == {sample.first}
        # The chunk is reported; a head whose stored lengths moved also no longer matches the catalog record.
        kinds = {p.kind for p in report.problems}
        assert "corrupt" in kinds and kinds <= {"corrupt", "index"}
        assert torch.equal(bank.load("prod")["w"], sample.state["w"])


def _declared_size(frame: bytes, size: int) -> bytes:
    """``frame`` (written without a content size) with a header that declares ``size`` bytes of content."""
    fhd = frame[4]
    assert fhd & 0xE0 == 0, "no content size and not single-segment: a window descriptor follows"
    return frame[:4] + bytes([fhd | 0xC0]) + frame[5:6] + struct.pack("<Q", size) + frame[6:]


#: The bound on decompressed manifest objects and segments (MAX_TEXT) is not applied before


def test_a_frame_declaring_a_huge_content_size_is_corrupt(sample: Sample) -> None:
    small = zstandard.ZstdCompressor(write_checksum=True, write_content_size=False).compress(MAGIC + b"{}")
    bomb = _declared_size(small, 1 << 62)
    bad = digest(b"bomb")
    Stored.of(sample.root, sample.second).plant(bomb, bad)
    _refused_everywhere(sample, bad, wb.CorruptObject)
    still_usable(sample, bad_refs=(bad,))


def test_a_manifest_past_max_text_is_refused(sample: Sample, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stored, "MAX_TEXT", 8 << 10)
    s = Stored.of(sample.root, sample.second)
    s.content["message"] = "x" * (64 << 10)  # compresses to almost nothing
    cid, data = s.object(keep_content=False)
    assert len(data) < 4 << 10
    s.plant(data, cid)
    _refused_everywhere(sample, cid, wb.CorruptObject)


def test_a_segment_past_max_text_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(stored, "MAX_TEXT", 8 << 10)
    text = b" " * (64 << 10)
    with pytest.raises(wb.CorruptObject):
        stored.open_segment(seal_segment(text), digest(text), "segments/x", None)


def test_frames_without_a_declared_size_are_bounded(sample: Sample, monkeypatch: pytest.MonkeyPatch) -> None:
    """A frame that declares no size is cut off at MAX_TEXT (what zstandard does honour)."""
    monkeypatch.setattr(stored, "MAX_TEXT", 8 << 10)
    s = Stored.of(sample.root, sample.second)
    s.content["message"] = "x" * (64 << 10)
    payload = MAGIC + _json(s.content) + b"\x00" + _json(s.head)
    data = zstandard.ZstdCompressor(write_checksum=True, write_content_size=False).compress(payload)
    cid = s.plant(data, digest(_json(s.content)))
    _refused_everywhere(sample, cid, wb.CorruptObject)
    still_usable(sample, bad_refs=(cid,))


def test_segment_hash_from_a_key_is_what_the_reader_compares(sample: Sample) -> None:
    s = Stored.of(sample.root, sample.second)
    for h, k in s.head["keys"].items():
        assert segment_hash_from_key(k) == h


def _repacked_elsewhere(root: Path) -> tuple[wb.Bank, str]:
    """A bank that saved two checkpoints and holds their manifests; another process then deleted the
    first, repacked (the second's chunks moved to a new pack, its location head rewritten) and ran gc
    (the old pack is gone). Returns the first process's bank and the surviving checkpoint."""
    bank = wb.open(str(root))
    ids = [
        bank.save({"a": torch.full((64,), float(s)), "b": torch.ones(64)}, run="r", step=s, codec="raw").id
        for s in range(2)
    ]
    assert bank.verify(ids[1]).ok and torch.equal(bank.load(ids[1])["a"], torch.ones(64))
    other = wb.open(str(root), create=False)
    other.delete(ids[0])
    assert other.repack().manifests_rewritten == 1
    assert other.gc(grace=0).packs_deleted
    assert other.verify(ids[1]).ok and wb.open(str(root), create=False).verify().ok
    return bank, ids[1]


def test_a_process_loads_a_checkpoint_another_one_repacked(tmp_path: Path) -> None:
    bank, cid = _repacked_elsewhere(tmp_path / "bank")
    assert torch.equal(bank.load(cid)["a"], torch.ones(64))  # its cached locations are gone: read again
    assert bank.verify(cid).ok and bank.verify().ok


def test_verify_of_one_checkpoint_reads_the_locations_stored_now(tmp_path: Path) -> None:
    bank, cid = _repacked_elsewhere(tmp_path / "bank")
    assert bank.verify(cid).problems == ()


def test_verify_of_one_checkpoint_sees_its_damaged_head(sample: Sample) -> None:
    sample.bank.load(sample.first)  # this process has read (and cached) the manifest
    _craft(sample, sample.first, ATTACKS["location rows fewer than content chunk rows"][0], copy=False)
    assert wb.open(str(sample.root), create=False).verify(sample.first).problems  # a fresh view sees it
    assert sample.bank.verify().problems  # and so does a whole-bank verify here
    assert sample.bank.verify(sample.first).problems
