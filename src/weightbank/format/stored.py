"""How a format-3 manifest is stored: an id over its content alone, locations apart, big tables shared.

A format-1/2 manifest is one JSON document and its checkpoint id is the hash
of all of it, pack names and offsets included, so no byte could ever move
without changing ids. A format-3 manifest splits what a checkpoint *is* from
where its bytes lie:

* the **content text** (JSON): every header field (run, step, parent,
  created, message, metrics, config, meta, env, chunk_size, lossy) and the
  **body** — the state's tree, the tensor table and each chunk's
  ``[hash, raw_len]``. The checkpoint id is the BLAKE3 hash of this text and
  nothing else: it names what a load returns.
* the **location head** (JSON, not covered by the id): each chunk's
  ``[pack, offset, codec, stored_len, args?]`` — where its bytes lie and how
  they are coded — and the storage key of every segment. A repack rewrites
  it (new packs) and the id, every tag and every lineage link stay as they
  were. It is still checked: every chunk read is verified against its hash
  from the content, so a wrong location is a CorruptObject, never wrong bytes.
  The content lists the chunks the tensors are made of; a chunk that is only
  the base of a delta chain is a row of the head, ``[hash, raw_len, pack,
  offset, codec, stored_len, args?]``, after the content's rows, so chains can
  be re-encoded onto other bases (a newest keyframe, reverse deltas) without
  changing the id either. A tensor may name content rows only.

The stored object is one zstd frame (content checksum on)::

    b"WBM3\\n" + content text + b"\\x00" + location head

A body or location table longer than :data:`INLINE_MAX` bytes of JSON is cut
into **segments**, each stored as its own object (zstd) and named by the hash
of its text: the content lists the body's segment hashes (so the id covers
them, a Merkle tree of one level) and the head lists the location segments.
Cuts fall at row boundaries chosen by the rows' own bytes (content-defined,
as restic cuts files), so an unchanged re-save of a state with ten thousand
chunks reuses every segment of its parent and writes a manifest of a few KiB,
and a change to a few tensors rewrites only the segments around them. A
location segment is self-contained (its own pack table), so it is shared
as-is between checkpoints.

This module builds and parses those bytes; the bank stores them
(:mod:`weightbank.bank.listing` reads, :mod:`weightbank.bank.parts` writes).

Example:
    >>> from weightbank.format.manifest import Manifest
    >>> draft = encode(Manifest(run="r", step=1, parent=None, created=0.0))
    >>> opened = open_object(draft.object({}), "m", draft.cid)
    >>> opened.needed, opened.manifest({}).run, opened.manifest({}).format
    ([], 'r', 3)
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import zstandard

from ..errors import CorruptObject, UnsupportedFormat
from .frames import decompress
from .hashing import digest
from .manifest import COMPACT_FORMAT, NEWEST_FORMAT, Manifest, TensorRecord
from .schema import hex_digest, typed

__all__ = [
    "INLINE_MAX",
    "MAGIC",
    "Draft",
    "Opened",
    "canonical",
    "encode",
    "is_compact",
    "open_object",
    "open_segment",
    "relocate",
    "seal_segment",
    "split_object",
]

MAGIC = b"WBM3\n"
#: A body or location table longer than this (JSON bytes) is stored in segments.
INLINE_MAX = 16 << 10
#: A segment is cut after a row once it holds at least this many bytes and the row's bytes say so.
SEGMENT_MIN = 8 << 10
#: ... and always once it holds this many (a single row longer than this makes a segment alone).
SEGMENT_MAX = 128 << 10
#: One row in ``SEGMENT_MASK + 1`` ends a segment (past SEGMENT_MIN): ~24 KiB on average for chunk rows.
SEGMENT_MASK = 255
#: A stored manifest or segment larger than this once decompressed is refused as crafted.
MAX_TEXT = 256 << 20
#: More segments than this in one manifest is refused as malformed.
MAX_SEGMENTS = 1 << 20

_ZSTD_FRAME = b"\x28\xb5\x2f\xfd"
_HEADER_FIELDS = ("run", "step", "parent", "created", "message", "metrics", "config", "meta", "env")


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode()


def _compress(text: bytes) -> bytes:
    return zstandard.ZstdCompressor(level=3, write_checksum=True).compress(text)


def _decompress(data: bytes, key: str) -> bytes:
    return decompress(data, MAX_TEXT, key)


def is_compact(data: bytes) -> bool:
    """Whether stored manifest bytes are a format-3 object (format 1/2 manifests are plain JSON)."""
    return data[:4] == _ZSTD_FRAME


def _cut(rows: list[bytes], marks: Iterable[bytes]) -> list[list[bytes]]:
    """``rows`` in consecutive groups; a group ends where a row's ``mark`` bytes say so (content-defined)."""
    groups: list[list[bytes]] = []
    current: list[bytes] = []
    size = 0
    for row, mark in zip(rows, marks, strict=True):
        current.append(row)
        size += len(row) + 2
        if size >= SEGMENT_MAX or (size >= SEGMENT_MIN and zlib.crc32(mark) & SEGMENT_MASK == 0):
            groups.append(current)
            current, size = [], 0
    if current:
        groups.append(current)
    return groups


@dataclass(frozen=True)
class Draft:
    """A manifest encoded and not stored yet: its id, content text, and the segments it needs.

    ``segments`` maps each segment's hash to its text (body segments first, in
    order). :meth:`object` builds the stored manifest once the caller knows
    the storage key of every segment.
    """

    cid: str
    content: bytes
    manifest: Manifest
    segments: dict[str, bytes] = field(default_factory=dict)
    locations_inline: bytes | None = None
    location_segments: tuple[str, ...] = ()

    def object(self, keys: Mapping[str, str]) -> bytes:
        """The stored manifest object, naming ``keys[h]`` as the place of segment ``h``.

        KeyError if a segment has no key.
        """
        head: dict[str, Any] = {"keys": {h: keys[h] for h in self.segments}}
        if self.locations_inline is not None:
            text = b'{"inline":' + self.locations_inline + b"," + _json(head)[1:]
        else:
            head["segments"] = [[h, len(self.segments[h])] for h in self.location_segments]
            text = _json(head)
        return _compress(MAGIC + self.content + b"\x00" + text)

    def placed(self, keys: Mapping[str, str]) -> Manifest:
        """The manifest, knowing where its segments are stored (what gc and trash need)."""
        return replace(self.manifest, format=COMPACT_FORMAT, segments=tuple(keys[h] for h in self.segments))


def _referenced(m: Manifest) -> set[int]:
    """Indices of the chunks some tensor is made of (the others are only bases of delta chains)."""
    out = {c for t in m.tensors for c in t.chunks}
    out.update(c for t in m.tensors for s in t.shards for c in s.chunks)
    return out


def canonical(m: Manifest) -> Manifest:
    """``m`` with its chunk table in stored order: the chunks tensors are made of, in their order,
    then the chunks that are only bases of delta chains (which the location head holds)."""
    used = _referenced(m)
    order = [i for i in range(len(m.chunks)) if i in used] + [
        i for i in range(len(m.chunks)) if i not in used
    ]
    if order == list(range(len(m.chunks))):
        return m
    new = {old: i for i, old in enumerate(order)}

    def remap(t: TensorRecord) -> TensorRecord:
        shards = tuple(replace(s, chunks=tuple(new[c] for c in s.chunks)) for s in t.shards)
        return replace(t, chunks=tuple(new[c] for c in t.chunks), shards=shards)

    return replace(m, chunks=tuple(m.chunks[i] for i in order), tensors=tuple(map(remap, m.tensors)))


def _body(m: Manifest) -> list[bytes]:
    rows = [b'{"tree":' + _json(m.tree) + b',"tensors":[']
    tensors = [_json(t.to_json()) for t in m.tensors]
    rows += [t + b"," for t in tensors[:-1]] + tensors[-1:]
    rows.append(b'],"chunks":[')
    chunks = [f'["{c.hash}",{c.raw_len}]'.encode() for c in m.chunks[: len(_referenced(m))]]
    rows += [c + b"," for c in chunks[:-1]] + chunks[-1:]
    rows.append(b"]}")
    return rows


def _location_rows(m: Manifest) -> list[tuple[str, list[Any]]]:
    """Each chunk's place and coding, in stored order; a base-only chunk's row starts with its
    ``hash`` and ``raw_len`` (the content does not list it)."""
    content = len(_referenced(m))
    out = []
    for i, c in enumerate(m.chunks):
        row: list[Any] = [c.offset, c.codec, c.stored_len]
        if c.args is not None:
            row.append(c.args.to_json())
        out.append((m.packs[c.pack], row if i < content else [c.hash, c.raw_len, *row]))
    return out


def _location_table(rows: list[tuple[str, list[Any]]]) -> bytes:
    packs: dict[str, int] = {}
    table = [
        [packs.setdefault(p, len(packs)), *row]
        if not isinstance(row[0], str)
        else [*row[:2], packs.setdefault(p, len(packs)), *row[2:]]
        for p, row in rows
    ]
    return _json({"packs": list(packs), "rows": table})


def _locations(m: Manifest) -> tuple[bytes | None, dict[str, bytes], tuple[str, ...]]:
    """(the whole location table if short enough to inline, else None; segments by hash; their order)."""
    rows = _location_rows(m)
    whole = _location_table(rows)
    if len(whole) <= INLINE_MAX:
        return whole, {}, ()
    # Cut where the chunk hashes say (not the locations): the same rows wherever their bytes lie,
    # so a repack changes only the segments whose rows moved, and as many of them.
    marks = [c.hash.encode() for c in m.chunks]
    segments: dict[str, bytes] = {}
    order = []
    start = 0
    for group in _cut([_json(r) for _, r in rows], marks):
        text = _location_table(rows[start : start + len(group)])
        start += len(group)
        h = digest(text)
        segments.setdefault(h, text)  # equal groups are stored once, listed each time they occur
        order.append(h)
    return None, segments, tuple(order)


def _content(m: Manifest, body_ref: bytes) -> bytes:
    head: dict[str, Any] = {"format": COMPACT_FORMAT}
    head.update((k, getattr(m, k)) for k in _HEADER_FIELDS)
    head["chunk_size"] = m.chunk_size
    if m.lossy:
        head["lossy"] = {name: s.to_json() for name, s in m.lossy.items()}
    return _json(head)[:-1] + b',"body":' + body_ref + b"}"


def encode(m: Manifest) -> Draft:
    """``m`` as a format-3 draft: id, content text and segments (its ``packs``/offsets go to the head).

    The draft's manifest has its chunk table in stored order (:func:`canonical`).
    """
    m = canonical(m)
    body_rows = _body(m)
    body_text = b"\n".join(body_rows)
    segments: dict[str, bytes] = {}
    if len(body_text) <= INLINE_MAX:
        content = _content(m, b'{"inline":' + body_text + b"}")
    else:
        refs = []
        for group in _cut(body_rows, body_rows):
            text = b"\n".join(group) + b"\n"
            h = digest(text)
            segments.setdefault(h, text)
            refs.append([h, len(text)])
        content = _content(m, _json({"segments": refs}))
    return _with_locations(digest(content), content, m, segments)


def _with_locations(cid: str, content: bytes, m: Manifest, body: dict[str, bytes]) -> Draft:
    inline, loc, order = _locations(m)
    segments = dict(body)
    for h, text in loc.items():
        segments.setdefault(h, text)
    return Draft(cid, content, replace(m, format=COMPACT_FORMAT), segments, inline, order)


def relocate(content: bytes, cid: str, m: Manifest) -> Draft:
    """A draft keeping ``content`` (so the id ``cid``) byte for byte, with ``m``'s locations.

    ``m`` must be the manifest ``content`` describes with its chunks moved
    (what a repack makes); the body segments are those ``content`` names.
    """
    opened = _parse_content(content, "<relocate>")
    body = {h: b"" for h, _ in opened}
    draft = _with_locations(cid, content, m, {})
    segments = {**body, **draft.segments}
    return replace(draft, segments=segments)


def split_object(data: bytes, key: str) -> tuple[bytes, bytes]:
    """A stored format-3 object's (content text, location head text). CorruptObject if it is not one."""
    payload = _decompress(data, key)
    if not payload.startswith(MAGIC):
        raise CorruptObject(key, detail="not a format-3 manifest object")
    end = payload.find(b"\x00", len(MAGIC))
    if end < 0:
        raise CorruptObject(key, detail="manifest object has no location head")
    return payload[len(MAGIC) : end], payload[end + 1 :]


def _loads(text: bytes, key: str, what: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, UnicodeDecodeError) as e:
        raise CorruptObject(key, detail=f"{what} is not valid JSON ({e})") from None
    except RecursionError:
        raise CorruptObject(key, detail=f"{what} is nested too deeply") from None


def _segment_refs(obj: Any) -> list[tuple[str, int]]:
    refs = typed(obj, list, "segments")
    if len(refs) > MAX_SEGMENTS:
        raise ValueError("too many segments")
    out = []
    for ref in refs:
        typed(ref, list, "segment")
        if len(ref) != 2:
            raise ValueError("a segment reference has two fields")
        n = typed(ref[1], int, "segment size")
        if not 0 < n <= MAX_TEXT:
            raise ValueError("segment size out of range")
        out.append((hex_digest(ref[0], "segment hash"), n))
    return out


def _parse_content(content: bytes, key: str) -> list[tuple[str, int]]:
    """The body segments ``content`` names (empty for an inline body); checks only what that needs."""
    obj = _loads(content, key, "manifest content")
    try:
        body = typed(typed(obj, dict, "content")["body"], dict, "body")
        return [] if "inline" in body else _segment_refs(body["segments"])
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptObject(key, detail=f"manifest content is malformed ({type(e).__name__}: {e})") from None


@dataclass(frozen=True)
class Opened:
    """A stored format-3 manifest, checked against its id, waiting for the segments it names.

    ``needed``: (segment hash, storage key, text size) for every segment to read, each once.
    """

    key: str
    content: bytes
    fields: dict[str, Any]
    head: dict[str, Any]
    body_refs: list[tuple[str, int]]
    location_refs: list[tuple[str, int]]
    keys: dict[str, str]
    needed: list[tuple[str, str, int]]

    def manifest(self, texts: Mapping[str, bytes]) -> Manifest:
        """The whole manifest, given the text of every needed segment (verified: see :func:`open_segment`).

        CorruptObject if the parts do not fit together, UnsupportedFormat for
        what this reader cannot decode.
        """
        try:
            return self._assemble(texts)
        except (KeyError, TypeError, ValueError, IndexError, OverflowError) as e:
            raise CorruptObject(self.key, detail=f"manifest is malformed ({type(e).__name__}: {e})") from None

    def _assemble(self, texts: Mapping[str, bytes]) -> Manifest:
        if self.body_refs:
            body = _loads(b"".join(texts[h] for h, _ in self.body_refs), self.key, "manifest body")
        else:
            body = self.fields["body"]["inline"]
        typed(body, dict, "body")
        if self.location_refs:
            parsed: dict[str, Any] = {}
            for h, _ in self.location_refs:
                if h not in parsed:
                    parsed[h] = _loads(texts[h], self.key, "location segment")
            tables = [parsed[h] for h, _ in self.location_refs]
        else:
            tables = [self.head["inline"]]
        packs: dict[str, int] = {}
        rows: list[list[Any]] = []  # [pack, offset, codec, stored_len, args?]
        bases: list[list[Any]] = []  # [hash, raw_len, pack, offset, codec, stored_len, args?]
        for table in tables:
            typed(table, dict, "location table")
            names = [typed(p, str, "pack") for p in typed(table["packs"], list, "packs")]
            for row in typed(table["rows"], list, "rows"):
                typed(row, list, "location")
                base = bool(row) and isinstance(row[0], str)
                if len(row) not in ((6, 7) if base else (4, 5)):
                    raise ValueError("location rows have 4 or 5 fields (6 or 7 for a base-only chunk)")
                if bases and not base:
                    raise ValueError("a content chunk's location after a base-only chunk's")
                at = 2 if base else 0
                pidx = typed(row[at], int, "pack index")
                if not 0 <= pidx < len(names):
                    raise ValueError("a location names a pack outside its table")
                fixed = [*row[:at], packs.setdefault(names[pidx], len(packs)), *row[at + 1 :]]
                (bases if base else rows).append(fixed)
        content_rows = typed(body["chunks"], list, "chunks")
        if len(content_rows) != len(rows):
            raise ValueError(f"{len(content_rows)} chunks but {len(rows)} locations")
        chunks = []
        for c, loc in zip(content_rows, rows, strict=True):
            typed(c, list, "chunk")
            if len(c) != 2:
                raise ValueError("content chunk rows have two fields")
            # [hash, raw_len, codec, pack, offset, stored_len, args?]: the format-1 row, checked as one.
            chunks.append([c[0], c[1], loc[2], loc[0], loc[1], loc[3], *loc[4:]])
        chunks.extend([b[0], b[1], b[4], b[2], b[3], b[5], *b[6:]] for b in bases)
        whole = {k: v for k, v in self.fields.items() if k != "body"}
        whole.update(
            tree=body["tree"],
            tensors=body["tensors"],
            packs=list(packs),
            chunks=chunks,
            segments=list(self.keys.values()),
        )
        m = Manifest.from_json(whole, self.key)
        # A tensor is made of content rows only: a base-only row comes from the head, which the id
        # does not cover, so letting a tensor name one would let a head change what a load returns.
        if any(i >= len(content_rows) for i in _referenced(m)):
            raise ValueError("a tensor names a chunk the content does not list")
        return m


def open_object(data: bytes, key: str, cid: str) -> Opened:
    """Check a stored format-3 manifest against its id ``cid`` and read its head.

    CorruptObject for damaged bytes (a zstd frame that fails its checksum, a
    content text whose hash is not ``cid``, a malformed head), UnsupportedFormat
    for a content format newer than this reader.
    """
    content, head_text = split_object(data, key)
    actual = digest(content)
    if actual != cid:
        raise CorruptObject(
            key, expected=cid, actual=actual, checkpoint=cid, detail="manifest content changed"
        )
    obj = _loads(content, key, "manifest content")
    if not isinstance(obj, dict):
        raise CorruptObject(key, detail="manifest content is not a JSON object")
    fmt = obj.get("format")
    if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt > NEWEST_FORMAT:
        raise UnsupportedFormat(key, fmt, NEWEST_FORMAT)
    head = _loads(head_text, key, "location head")
    try:
        if fmt != COMPACT_FORMAT:
            raise ValueError(f"format {fmt!r} in a format-3 object")
        body = typed(obj["body"], dict, "body")
        body_refs = [] if "inline" in body else _segment_refs(body["segments"])
        typed(head, dict, "location head")
        if "inline" in head:
            typed(head["inline"], dict, "inline locations")
        keys = {
            hex_digest(h, "segment hash"): typed(k, str, "segment key")
            for h, k in typed(head["keys"], dict, "keys").items()
        }
        location_refs = [] if "inline" in head else _segment_refs(head["segments"])
        for refs, what in ((body_refs, "body"), (location_refs, "location table")):
            if sum(n for _, n in refs) > MAX_TEXT:
                raise ValueError(f"the {what} segments add up to more than {MAX_TEXT} bytes")
        sizes: dict[str, int] = {}
        for h, n in [*body_refs, *location_refs]:
            if sizes.setdefault(h, n) != n:
                raise ValueError(f"segment {h[:12]} is listed with two sizes")
            if h not in keys:
                raise ValueError(f"segment {h[:12]} has no key")
        if len(sizes) != len(keys):
            raise ValueError("the head names segments the manifest does not use")
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptObject(key, detail=f"manifest object is malformed ({type(e).__name__}: {e})") from None
    needed = [(h, keys[h], n) for h, n in sizes.items()]
    return Opened(key, content, obj, head, body_refs, location_refs, keys, needed)


def seal_segment(text: bytes) -> bytes:
    """A segment's stored bytes (zstd with a checksum; its name carries the hash of ``text``)."""
    return _compress(text)


def open_segment(data: bytes, h: str, key: str, size: int | None = None) -> bytes:
    """A segment's text, checked against its hash ``h`` (and ``size`` when known). CorruptObject if damaged."""
    text = _decompress(data, key)
    if size is not None and len(text) != size:
        raise CorruptObject(key, detail=f"segment holds {len(text)} bytes, its manifest says {size}")
    actual = digest(text)
    if actual != h:
        raise CorruptObject(key, expected=h, actual=actual, detail="segment bytes changed")
    return text
