"""Reading and writing the catalog index's objects: log entries, snapshot roots and pages.

* A **log entry** (``index/log/<seq>.json``) says one checkpoint was added
  (with its :class:`~.records.CatalogRecord`) or deleted. It is created with a
  put-if-absent (``put_ref(key, data, None)``), so two writers never share a
  sequence number, and sealed with a digest.
* A **root** (``index/roots/<gen>.json``) is a compacted snapshot of every
  entry up to ``upto`` (except the ``held`` ones, still unresolved), created
  put-if-absent like an entry: of two compactions racing for one generation
  exactly one publishes. Sealed.
* The **head** (``index/head.json``) holds the highest sequence number any
  writer claimed and copies of the newest entries whose work is done (an
  add's manifest written, a delete's removed), which readers take instead of
  reading those entries (:func:`mark_done`). Sealed; updated by compare-and-swap.
* A **page** (``index/pages/<ab>/<hash>.zst``) is zstd-compressed JSON named by
  the BLAKE3 of its uncompressed bytes: immutable, shared between roots,
  verified on every read.

Anything read back is untrusted: a damaged or malformed object is an
:class:`IndexDamaged`, which makes the catalog fall back to listing manifests
(never to a wrong answer).

Example:
    >>> from weightbank.storage import open_storage
    >>> s = open_storage("memory://")
    >>> key = write_page(s, {"records": []})
    >>> read_page(s, key)
    {'records': []}
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zstandard

from ...errors import ConcurrentUpdate, CorruptObject, IndexDamaged
from ...format.frames import decompress
from ...format.hashing import digest
from ...format.schema import hex_digest, typed
from ...format.sealed import seal, unseal
from ...storage.base import Storage
from ..layout import INDEX_HEAD, INDEX_PAGES, is_pack_key, log_key, page_key, root_key
from . import bloom
from .records import CatalogRecord

__all__ = [
    "ADD",
    "DEL",
    "DONE_BYTES",
    "DONE_MAX",
    "Head",
    "IndexDamaged",
    "LogEntry",
    "Root",
    "mark_done",
    "parse_entry",
    "put_entry",
    "put_root",
    "raise_head",
    "read_entry",
    "read_head",
    "read_head_state",
    "read_page",
    "read_root",
    "write_page",
]

ADD = "add"
DEL = "del"
#: A page larger than this once decompressed is refused (a crafted page cannot exhaust memory).
MAX_PAGE_BYTES = 256 << 20
ROOT_VERSION = 1


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def write_page(storage: Storage, obj: dict[str, Any]) -> str:
    """Store ``obj`` as a page (idempotent: the same content has the same key); return its key."""
    raw = _json(obj)
    key = page_key(digest(raw))
    storage.write(key, zstandard.ZstdCompressor(level=3).compress(raw))
    return key


def read_page(storage: Storage, key: str) -> dict[str, Any]:
    """The page at ``key``, checked against its name. IndexDamaged if damaged, MissingObject if gone."""
    h = key[len(INDEX_PAGES) + 3 : -4] if key.startswith(INDEX_PAGES) and key.endswith(".zst") else ""
    if page_key(h) != key:
        raise IndexDamaged(key, "not a page key")
    data = storage.read(key)
    try:
        raw = decompress(data, MAX_PAGE_BYTES, key, "page")
    except CorruptObject as e:
        raise IndexDamaged(key, e.detail) from None
    if digest(raw) != h:
        raise IndexDamaged(key, "page bytes do not match their name")
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise IndexDamaged(key, f"page is not JSON ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise IndexDamaged(key, "page is not a JSON object")
    return obj


@dataclass(frozen=True)
class LogEntry:
    """One catalog log entry: checkpoint ``id`` added (with its record) or deleted."""

    seq: int
    op: str
    id: str
    record: CatalogRecord | None = None
    save_ids: tuple[str, ...] = ()
    wrote: tuple[str, ...] = ()  # packs the save wrote (their chunks go into the chunk index)
    #: A Bloom filter of the chunks the save wrote (:mod:`.bloom`), its bit array; None: not known
    #: (an entry of an older release, which a save must read the manifest of to know).
    chunks: bytes | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "seq": self.seq,
            "op": self.op,
            "id": self.id,
            "record": None if self.record is None else self.record.to_json(),
            "save_ids": list(self.save_ids),
            "wrote": list(self.wrote),
        }
        if self.chunks is not None:
            body["chunks"] = bloom.encode(self.chunks)
        return body

    def to_bytes(self) -> bytes:
        return seal(self.to_json())


def read_entry(storage: Storage, seq: int) -> LogEntry | None:
    """Log entry ``seq``, None if absent; IndexDamaged if unreadable."""
    key = log_key(seq)
    value = storage.get_ref(key)
    if value is None:
        return None
    try:
        body = unseal(value.data, key, what="catalog log entry").body
    except CorruptObject as e:
        raise IndexDamaged(key, e.detail or str(e)) from None
    return parse_entry(body, seq, key)


def parse_entry(body: Any, seq: int, key: str) -> LogEntry:
    """A log entry's JSON body (untrusted) as a LogEntry; IndexDamaged if it is malformed."""
    try:
        body = typed(body, dict, "entry")
        op = typed(body["op"], str, "op")
        cid = hex_digest(body["id"], "id")
        if typed(body["seq"], int, "seq") != seq or op not in (ADD, DEL):
            raise ValueError("entry does not match its key, or has an unknown op")
        record = None if body["record"] is None else CatalogRecord.from_json(body["record"])
        if (op == ADD) != (record is not None) or (record is not None and record.id != cid):
            raise ValueError("an add entry carries its checkpoint's record; a delete none")
        save_ids = tuple(typed(x, str, "save id") for x in typed(body["save_ids"], list, "save_ids"))
        wrote = tuple(typed(x, str, "pack") for x in typed(body["wrote"], list, "wrote"))
        if not all(is_pack_key(p) for p in wrote):
            raise ValueError("entry names something that is not a pack key")
        chunks = None if body.get("chunks") is None else bloom.check(body["chunks"])
    except CorruptObject as e:
        raise IndexDamaged(key, e.detail or str(e)) from None
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise IndexDamaged(key, f"malformed entry ({type(e).__name__}: {e})") from None
    return LogEntry(seq, op, cid, record, save_ids, wrote, chunks)


def put_entry(storage: Storage, entry: LogEntry) -> bool:
    """Create log entry ``entry.seq``; False if that number is taken."""
    try:
        storage.put_ref(log_key(entry.seq), entry.to_bytes(), None)
    except ConcurrentUpdate:
        return False
    return True


@dataclass(frozen=True)
class Root:
    """A compacted snapshot: every log entry up to ``upto`` except ``held`` is folded into its pages.

    ``runs`` maps each run to (checkpoint count, key of its run index page,
    newest record); ``ids``, ``chunks`` and ``recent`` are page keys (None in
    an empty snapshot).
    """

    gen: int
    upto: int
    held: tuple[int, ...]
    created: float
    count: int
    runs: dict[str, tuple[int, str, CatalogRecord]]
    ids: str | None
    chunks: str | None
    recent: str | None

    def to_bytes(self) -> bytes:
        return seal(
            {
                "version": ROOT_VERSION,
                "gen": self.gen,
                "upto": self.upto,
                "held": list(self.held),
                "created": self.created,
                "count": self.count,
                "runs": {r: [n, key, rec.to_json()] for r, (n, key, rec) in sorted(self.runs.items())},
                "ids": self.ids,
                "chunks": self.chunks,
                "recent": self.recent,
            }
        )


EMPTY_ROOT = Root(0, 0, (), 0.0, 0, {}, None, None, None)


def _page_ref(value: Any) -> str | None:
    if value is None:
        return None
    key = typed(value, str, "page key")
    if not key.startswith(INDEX_PAGES):
        raise ValueError("a root names something that is not a page")
    return str(key)


def read_root(storage: Storage, gen: int) -> Root | None:
    """Root ``gen``, None if absent; IndexDamaged if unreadable or written by a newer weightbank."""
    key = root_key(gen)
    value = storage.get_ref(key)
    if value is None:
        return None
    try:
        body = unseal(value.data, key, what="catalog root").body
        if typed(body["version"], int, "version") != ROOT_VERSION or typed(body["gen"], int, "gen") != gen:
            raise ValueError("root of another version, or not the generation its key says")
        runs = {}
        for run, row in typed(body["runs"], dict, "runs").items():
            n, pkey, rec = typed(row, list, "run row")
            runs[typed(run, str, "run")] = (
                typed(n, int, "count"),
                str(_page_ref(pkey)),
                CatalogRecord.from_json(rec),
            )
        held = tuple(typed(s, int, "held seq") for s in typed(body["held"], list, "held"))
        return Root(
            gen=gen,
            upto=typed(body["upto"], int, "upto"),
            held=held,
            created=float(typed(body["created"], (int, float), "created")),
            count=typed(body["count"], int, "count"),
            runs=runs,
            ids=_page_ref(body["ids"]),
            chunks=_page_ref(body["chunks"]),
            recent=_page_ref(body["recent"]),
        )
    except CorruptObject as e:
        raise IndexDamaged(key, e.detail or str(e)) from None
    except (KeyError, TypeError, ValueError, OverflowError) as e:
        raise IndexDamaged(key, f"malformed root ({type(e).__name__}: {e})") from None


def put_root(storage: Storage, root: Root) -> bool:
    """Publish ``root``; False if another compaction published that generation first."""
    try:
        storage.put_ref(root_key(root.gen), root.to_bytes(), None)
    except ConcurrentUpdate:
        return False
    return True


def delete_ref(storage: Storage, key: str) -> None:
    """Remove a log entry or an old root (refs are removed like data objects; absent keys are fine)."""
    storage.delete(key)


#: Entries the head lists as done at most (newest kept): beyond that a reader reads entries itself.
DONE_MAX = 48
#: Bytes of copies the head holds at most (a 70B model's save writes a Bloom filter of ~60 KB): the
#: newest copies that fit are kept, so every save and reader pays a bounded head.
DONE_BYTES = 256 << 10


@dataclass(frozen=True)
class Head:
    """``index/head.json``: the highest sequence number claimed, and the entries known to be *done*.

    An entry is done once its writer finished what it announced: an add's
    manifest is written, a delete's manifest is removed. A reader takes a done
    entry from here instead of reading it, and need not look for its manifest
    (see :mod:`.view`); entries not listed here are read and checked as
    before, so a head that lost its list costs requests, never answers.
    """

    seq: int
    token: str | None
    done: dict[int, LogEntry]

    def body(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": time.time(),
            "done": [e.to_json() for _, e in sorted(self.done.items())],
        }


def read_head_state(storage: Storage, *, copies: bool = True) -> Head:
    """The head (seq 0, no token, nothing done when there is none yet); IndexDamaged if unreadable.

    A done list that is not well formed (only a faulty writer seals one) is
    ignored: it is an optimisation, and the log still says everything.
    ``copies=False`` leaves the list unparsed (``done`` empty): for a caller
    that wants only the number.
    """
    value = storage.get_ref(INDEX_HEAD)
    if value is None:
        return Head(0, None, {})
    try:
        body = unseal(value.data, INDEX_HEAD, what="catalog head").body
        seq = typed(body["seq"], int, "seq")
        if seq < 0:
            raise ValueError("negative sequence number")
    except CorruptObject as e:
        raise IndexDamaged(INDEX_HEAD, e.detail or str(e)) from None
    except (KeyError, TypeError, ValueError) as e:
        raise IndexDamaged(INDEX_HEAD, f"malformed head ({type(e).__name__}: {e})") from None
    done: dict[int, LogEntry] = {}
    try:
        for item in typed(body.get("done", []), list, "done")[-DONE_MAX:] if copies else []:
            s = typed(typed(item, dict, "done entry")["seq"], int, "seq")
            if 0 < s <= seq:
                done[s] = parse_entry(item, s, INDEX_HEAD)
    except (IndexDamaged, KeyError, TypeError, ValueError):
        done = {}
    return Head(int(seq), value.token, done)


def read_head(storage: Storage) -> tuple[int, str | None]:
    """The highest sequence number the head records (0 when there is none yet) and its token."""
    head = read_head_state(storage, copies=False)
    return head.seq, head.token


def _update_head(storage: Storage, change: Callable[[Head], Head | None]) -> None:
    """Apply ``change`` to the head by compare-and-swap, retrying on races (None: nothing to write)."""
    for _ in range(64):
        try:
            current = read_head_state(storage)
        except IndexDamaged:
            damaged = storage.get_ref(INDEX_HEAD)  # replaced: a rebuild or this write repairs it
            current = Head(0, None if damaged is None else damaged.token, {})
        new = change(current)
        if new is None:
            return
        try:
            storage.put_ref(INDEX_HEAD, seal(new.body()), current.token)
            return
        except ConcurrentUpdate:
            continue


def raise_head(storage: Storage, seq: int) -> None:
    """Make the head record at least ``seq`` (it only grows; racing writers each retry until it does).

    A reader expects every entry up to the head, so an entry lost from the
    end of the log shows as a gap too. A crash before this leaves the head
    behind the log, which only weakens that check for a moment.
    """
    _update_head(storage, lambda h: None if h.seq >= seq else Head(seq, h.token, h.done))


def mark_done(storage: Storage, entry: LogEntry, upto: int = 0) -> None:
    """List ``entry`` as done in the head (call once its manifest is written, or removed).

    Entries at or below ``upto`` (of a root the caller saw: folded, or held
    by it, which readers look at anyway) are dropped, and only the newest that
    fit :data:`DONE_MAX` and :data:`DONE_BYTES` kept. Best effort: if the
    head keeps changing, readers read the entry and check its manifest.
    """

    def change(h: Head) -> Head | None:
        if entry.seq > h.seq:
            return None  # the head was rebuilt below this entry: the log is the truth now
        done = {s: e for s, e in h.done.items() if s > upto}
        done[entry.seq] = entry
        keep: dict[int, LogEntry] = {}
        size = 0
        for s in sorted(done, reverse=True)[:DONE_MAX]:
            size += len(json.dumps(done[s].to_json()))
            if size > DONE_BYTES:
                break
            keep[s] = done[s]
        return Head(h.seq, h.token, dict(sorted(keep.items())))

    _update_head(storage, change)
