"""Tags: named, movable pointers to checkpoints, each with its complete history.

A tag is one small ref object holding its current target, an undo stack and
every change ever made (who, when, from, to, why). Putting the history inside
the ref means the tag and its history change together in one
compare-and-swap: a concurrent change is detected (ConcurrentUpdate), never
lost, and the history can never disagree with the tag.

The undo stack gives ``rollback`` and ``tag@{N}`` their meaning: ``set X``
pushes X, ``untag`` pushes "none", ``rollback k`` pops k entries. So after
prod moved A → B → C, ``rollback`` goes to B and a second one to A (it never
flip-flops back to C), and ``prod@{1}`` is what a rollback would restore.

Example:
    >>> from weightbank.storage import open_storage
    >>> from weightbank.bank.tags import TagStore
    >>> tags = TagStore(open_storage("memory://"))
    >>> _ = tags.update("prod", "set", "a" * 64, by="me", why="first")
    >>> tags.target("prod")[:4]
    'aaaa'
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from ..errors import ConcurrentUpdate, CorruptObject, InvalidName, NoHistory, TagNotFound
from ..format.schema import finite, hex_digest, typed
from ..format.sealed import seal, unseal
from ..storage.base import Storage
from .layout import TAGS, check_name, check_new_name, quarantine_key, tag_key
from .results import TagEvent, TagInfo

__all__ = ["UNSET", "TagRecord", "TagStore", "Unset"]


class Unset:
    """The type of :data:`UNSET` (a typed sentinel: ``expect: str | Unset | None = UNSET``)."""

    def __repr__(self) -> str:
        return "UNSET"


UNSET: Final = Unset()
"""Sentinel: no expectation about a tag's current target."""


_ACTIONS = frozenset(("set", "untag", "rollback"))


def _valid_name(name: str) -> bool:
    try:
        check_name("tag", name)
    except InvalidName:
        return False
    return True


_LEGACY_KEYS = ("name", "target", "stack", "history")


def _id_or_none(value: Any, what: str) -> str | None:
    return None if value is None else hex_digest(value, what)


def _history_entry(h: Any) -> dict[str, Any]:
    """One history entry, checked (TypeError/ValueError say what is wrong)."""
    typed(h, dict, "history entry")
    action = typed(h.get("action"), str, "action")
    if action not in _ACTIONS:
        raise ValueError(f"unknown action {action[:20]!r}")
    _id_or_none(h.get("old"), "old")
    _id_or_none(h.get("new"), "new")
    finite(h.get("at"), "at")
    typed(h.get("by", ""), str, "by")
    typed(h.get("why", ""), str, "why")
    if "steps" in h and typed(h["steps"], int, "steps") < 1:
        raise ValueError("steps must be >= 1")
    entry: dict[str, Any] = h
    return entry


@dataclass
class TagRecord:
    """The stored form of one tag: its undo stack and every change, sealed with a digest.

    Everything is checked when read (:meth:`from_bytes`): ids are full
    digests, each history entry has a known action and a time, and the
    record's digest matches its content.
    """

    name: str
    stack: list[str | None] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    sealed: bool = True

    @property
    def target(self) -> str | None:
        return self.stack[-1] if self.stack else None

    def to_bytes(self) -> bytes:
        return seal({"name": self.name, "target": self.target, "stack": self.stack, "history": self.history})

    @classmethod
    def from_bytes(cls, name: str, data: bytes) -> TagRecord:
        key = tag_key(name)
        record = unseal(data, key, _LEGACY_KEYS, "tag record")
        obj = record.body
        try:
            stack = typed(obj.get("stack"), list, "stack")
            history = typed(obj.get("history"), list, "history")
            stack = [_id_or_none(s, "stack entry") for s in stack]
            history = [_history_entry(h) for h in history]
            if obj.get("name") != name:
                raise ValueError(f"record names tag {str(obj.get('name'))[:40]!r}")
            if obj.get("target") != (stack[-1] if stack else None):
                raise ValueError("target is not the top of the undo stack")
        except (ValueError, TypeError) as e:
            raise CorruptObject(key, detail=f"tag record is malformed ({e})") from None
        return cls(name=name, stack=stack, history=history, sealed=record.sealed)

    def events(self) -> list[TagEvent]:
        return [
            TagEvent(
                tag=self.name,
                action=h["action"],
                old=h.get("old"),
                new=h.get("new"),
                at=float(h["at"]),
                by=h.get("by", ""),
                why=h.get("why", ""),
            )
            for h in self.history
        ]


class TagStore:
    """Reads and compare-and-swaps tag records in a storage backend."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    def check_writable(self) -> None:
        """Raise now if this store cannot compare-and-swap refs (see ``Storage.check_refs``).

        Called before a save that will move tags writes any data, so a store
        that would refuse the tag update does not first commit the checkpoint.
        """
        self._storage.check_refs()

    def read(self, name: str) -> tuple[TagRecord | None, str | None]:
        """The tag's record and version token (None, None if it never existed)."""
        ref = self._storage.get_ref(tag_key(name))
        if ref is None:
            return None, None
        return TagRecord.from_bytes(name, ref.data), ref.token

    def target(self, name: str) -> str | None:
        """Current target, or None if the tag does not exist or was removed."""
        rec, _ = self.read(name)
        return rec.target if rec else None

    def names(self) -> list[str]:
        """Names of every tag ever created (including removed ones); refs whose key is no tag name are skipped."""
        out = []
        for key in self._storage.list_refs(TAGS):
            leaf = key[len(TAGS) :]
            if leaf.endswith(".json") and "/" not in leaf and _valid_name(leaf[:-5]):
                out.append(leaf[:-5])
        return sorted(out)

    def live(self, *, strict: bool = False) -> dict[str, str]:
        """Every tag that currently points somewhere: name → checkpoint id.

        A damaged record is left out (verify reports it), unless ``strict``: then
        it raises CorruptObject, since it may protect any checkpoint — deletes
        and prunes ask strictly, displays leniently.
        """
        out = {}
        for name in self.names():
            try:
                target = self.target(name)
            except CorruptObject as e:
                if strict:
                    raise CorruptObject(
                        e.key,
                        detail=f"{e.detail}; a damaged tag may protect any checkpoint, so nothing is"
                        f" deleted until it is repaired (`weightbank untag --force {name}`)",
                    ) from None
                continue
            if target is not None:
                out[name] = target
        return out

    def info(self, name: str) -> TagInfo:
        """The tag's target and when it last moved; a damaged record gives target None and its ``problem``."""
        try:
            rec, _ = self.read(name)
        except CorruptObject as e:
            return TagInfo(name=name, target=None, updated=0.0, events=0, problem=e.detail or str(e))
        if rec is None:
            raise TagNotFound(name, self.names())
        updated = float(rec.history[-1]["at"]) if rec.history else 0.0
        return TagInfo(name=name, target=rec.target, updated=updated, events=len(rec.history))

    def previous(self, name: str, n: int) -> str:
        """The tag's n-th previous target (``tag@{n}``); n=0 is the current one."""
        rec, _ = self.read(name)
        if rec is None:
            raise TagNotFound(name, self.names())
        if n >= len(rec.stack):
            raise NoHistory(name, n, len(rec.stack) - 1)
        target = rec.stack[-1 - n]
        if target is None:
            raise TagNotFound(f"{name}@{{{n}}}")
        return target

    def replace_damaged(self, name: str, *, by: str, why: str = "") -> TagEvent | None:
        """Replace ``name``'s damaged record by a removed tag, keeping the damaged bytes under ``quarantine/``.

        Returns None (and changes nothing) when the record is sound. The new
        record's one history entry says what was replaced and where its bytes are.
        """
        key = tag_key(name)
        ref = self._storage.get_ref(key)
        if ref is None:
            raise TagNotFound(name, self.names())
        try:
            TagRecord.from_bytes(name, ref.data)
            return None
        except CorruptObject as e:
            problem = e.detail or str(e)
        kept = quarantine_key(key)
        self._storage.write(kept, ref.data)  # durable before the record is replaced
        note = f"replaced a damaged record ({problem}); its bytes are kept at {kept}"
        reason = f"{why} ({note})" if why else note
        event = {"action": "untag", "old": None, "new": None, "at": time.time(), "by": by, "why": reason}
        rec = TagRecord(name=name, stack=[None], history=[event])
        self._storage.put_ref(key, rec.to_bytes(), ref.token)
        return rec.events()[-1]

    def update(
        self,
        name: str,
        action: Literal["set", "untag", "rollback"],
        new: str | None,
        *,
        by: str,
        why: str = "",
        steps: int = 1,
        expect: str | Unset | None = UNSET,
    ) -> TagEvent:
        """Apply one change with compare-and-swap.

        ``expect`` (a checkpoint id, or None for "tag absent/removed") makes the
        change conditional on the tag's current target as the caller last saw it.
        """
        # A tag whose name reads as an id prefix (made before such names were refused) can still be
        # removed or rolled back, never pointed anywhere new.
        (check_new_name if action == "set" else check_name)("tag", name)
        rec, token = self.read(name)
        if rec is None:
            if action != "set":
                raise TagNotFound(name, self.names())
            rec = TagRecord(name=name)
        old = rec.target
        if not isinstance(expect, Unset) and expect != old:
            raise ConcurrentUpdate(tag_key(name), f"tag {name!r} points to {old}, expected {expect}")
        if action == "set":
            rec.stack.append(new)
        elif action == "untag":
            if old is None:
                raise TagNotFound(name, self.names())
            rec.stack.append(None)
        else:
            if steps < 1:
                raise ValueError("rollback steps must be >= 1")
            if steps >= len(rec.stack) or rec.stack[-1 - steps] is None:
                available = len(rec.stack) - 1 if rec.stack else 0
                raise NoHistory(name, steps, max(available, 0))
            del rec.stack[-steps:]
            new = rec.target
        event = {"action": action, "old": old, "new": new, "at": time.time(), "by": by, "why": why}
        if action == "rollback":
            event["steps"] = steps
        rec.history.append(event)
        self._storage.put_ref(tag_key(name), rec.to_bytes(), token)
        return rec.events()[-1]
