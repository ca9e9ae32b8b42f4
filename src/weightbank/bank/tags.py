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

import json
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import ConcurrentUpdate, CorruptObject, NoHistory, TagNotFound
from ..storage.base import Storage
from .layout import TAGS, check_name, check_new_name, tag_key
from .results import TagEvent, TagInfo

__all__ = ["UNSET", "TagRecord", "TagStore"]


class _Unset:
    def __repr__(self) -> str:
        return "UNSET"


UNSET: Any = _Unset()
"""Sentinel: no expectation about a tag's current target."""


@dataclass
class TagRecord:
    """The stored form of one tag."""

    name: str
    stack: list[str | None] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def target(self) -> str | None:
        return self.stack[-1] if self.stack else None

    def to_bytes(self) -> bytes:
        obj = {"name": self.name, "target": self.target, "stack": self.stack, "history": self.history}
        return json.dumps(obj, separators=(",", ":")).encode()

    @classmethod
    def from_bytes(cls, name: str, data: bytes) -> TagRecord:
        try:
            obj = json.loads(data)
            stack = obj["stack"]
            history = obj["history"]
            if not isinstance(stack, list) or not isinstance(history, list):
                raise TypeError("stack/history must be lists")
            if not all(s is None or isinstance(s, str) for s in stack):
                raise TypeError("stack entries must be ids or null")
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptObject(tag_key(name), detail=f"tag record is malformed ({e})") from None
        return cls(name=name, stack=stack, history=history)

    def events(self) -> list[TagEvent]:
        return [
            TagEvent(
                tag=self.name,
                action=h.get("action", "set"),
                old=h.get("old"),
                new=h.get("new"),
                at=float(h.get("at", 0.0)),
                by=str(h.get("by", "")),
                why=str(h.get("why", "")),
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
        check = getattr(self._storage, "check_refs", None)
        if callable(check):
            check()

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
        """Names of every tag ever created (including removed ones)."""
        out = []
        for key in self._storage.list_refs(TAGS):
            leaf = key[len(TAGS) :]
            if leaf.endswith(".json") and "/" not in leaf:
                out.append(leaf[:-5])
        return sorted(out)

    def live(self) -> dict[str, str]:
        """Every tag that currently points somewhere: name → checkpoint id."""
        out = {}
        for name in self.names():
            target = self.target(name)
            if target is not None:
                out[name] = target
        return out

    def info(self, name: str) -> TagInfo:
        rec, _ = self.read(name)
        if rec is None:
            raise TagNotFound(name, self.names())
        updated = float(rec.history[-1].get("at", 0.0)) if rec.history else 0.0
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

    def update(
        self,
        name: str,
        action: Literal["set", "untag", "rollback"],
        new: str | None,
        *,
        by: str,
        why: str = "",
        steps: int = 1,
        expect: Any = UNSET,
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
        if expect is not UNSET and expect != old:
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
