"""Live tags: requests naming a tag follow it as it moves, and a move flips only once the target is warm.

:class:`LiveTags` serves tags from a snapshot. A background thread polls the
bank's tags (cheap: small ref objects); when one moved (``weightbank tag``,
``rollback``, the HTTP API, another process), the new target is loaded and
warmed first, and only then does the snapshot entry change — one atomic
assignment, so a request resolves either the old or the new target, never a
cold one. Requests already running hold leases on the old checkpoint and
finish on it. If the new target cannot be loaded the tag keeps serving its old
target and the failure is kept in :attr:`LiveTags.errors` (tried again at the
next poll). A tag whose record is damaged (``TagInfo.problem``) is a poll
failure too: it keeps serving its last good target, and one damaged at
start-up is not served; either way the problem is in :attr:`LiveTags.errors`
and logged (``weightbank.serving``) when it first appears.

Example:
    >>> import torch, weightbank as wb
    >>> from weightbank.serving.live import LiveTags
    >>> bank = wb.open("memory://"); a = bank.save(torch.nn.Linear(1, 1).state_dict(), tags=["prod"]).id
    >>> cache = wb.ModelCache(bank, build=lambda info: torch.nn.Linear(1, 1))
    >>> live = LiveTags(bank, cache, poll=0)
    >>> b = bank.save(torch.nn.Linear(1, 1).state_dict(), tags=["prod"]).id
    >>> live.resolve("prod") == a, live.refresh() == {"prod": b}, live.resolve("prod") == b
    (True, True, True)
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from torch import nn

from ..bank.bank import Bank
from .cache import ModelCache

__all__ = ["LiveTags"]

log = logging.getLogger("weightbank.serving")

Warmup = Callable[[nn.Module], None]


class LiveTags:
    """Tag → checkpoint snapshot that moves only after the new target is resident (and warmed)."""

    def __init__(
        self, bank: Bank, cache: ModelCache, *, poll: float = 1.0, warmup: Warmup | None = None
    ) -> None:
        self.bank = bank
        self.cache = cache
        self.warmup = warmup
        self.errors: dict[str, str] = {}
        self._snapshot, damaged = self._poll()
        for name, problem in damaged.items():
            self._fail(name, f"CorruptObject: {problem}; not served until the record is repaired")
        self._refresh_lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if poll > 0:
            self._thread = threading.Thread(
                target=self._loop, args=(poll,), name="weightbank-tags", daemon=True
            )
            self._thread.start()

    def resolve(self, ref: str) -> str:
        """The checkpoint id ``ref`` names now: served tags from the snapshot, anything else from the bank.

        Example:
            >>> import torch, weightbank as wb
            >>> bank = wb.open("memory://"); cid = bank.save({"w": torch.ones(1)}, tags=["prod"]).id
            >>> LiveTags(bank, wb.ModelCache(bank, build=lambda i: torch.nn.Linear(1, 1)), poll=0).resolve("prod") == cid
            True
        """
        target = self._snapshot.get(ref)
        return target if target is not None else self.cache.resolve(ref)

    def snapshot(self) -> dict[str, str]:
        """The tags as served right now."""
        return dict(self._snapshot)

    def refresh(self) -> dict[str, str]:
        """Poll the bank once; warm and flip every moved tag. Returns the tags that flipped.

        Example:
            >>> import torch, weightbank as wb
            >>> bank = wb.open("memory://")
            >>> LiveTags(bank, wb.ModelCache(bank, build=lambda i: torch.nn.Linear(1, 1)), poll=0).refresh()
            {}
        """
        with self._refresh_lock:
            current, damaged = self._poll()
            flipped: dict[str, str] = {}
            # a damaged record says nothing about where the tag points: it is no removal
            for name in [n for n in self._snapshot if n not in current and n not in damaged]:
                self._snapshot.pop(name, None)
                self.errors.pop(name, None)
            for name, problem in damaged.items():
                served = self._snapshot.get(name)
                still = f"still serving {served}" if served else "not served"
                self._fail(name, f"CorruptObject: {problem}; {still} until the record is repaired")
            for name, target in current.items():
                if self._snapshot.get(name) == target:
                    self.errors.pop(name, None)  # e.g. a repaired record, or a move undone
                    continue
                try:
                    self._warm(target)
                except Exception as e:  # keep serving the old target; retried at the next poll
                    self._fail(name, f"{type(e).__name__}: {e}")
                    continue
                self._snapshot[name] = target  # the flip: one atomic assignment
                self.errors.pop(name, None)
                flipped[name] = target
            return flipped

    def _poll(self) -> tuple[dict[str, str], dict[str, str]]:
        """The bank's tags now: (name → target for the sound records, name → problem for the damaged)."""
        targets: dict[str, str] = {}
        damaged: dict[str, str] = {}
        for t in self.bank.tags():
            if t.problem:
                damaged[t.name] = t.problem
            elif t.target:
                targets[t.name] = t.target
        return targets, damaged

    def _fail(self, name: str, message: str) -> None:
        """Record a tag's poll failure; logged once per new message, not at every poll."""
        if self.errors.get(name) != message:
            log.warning("tag %r: %s", name, message)
        self.errors[name] = message

    def _warm(self, cid: str) -> None:
        with self.cache.lease(cid) as model:
            if self.warmup is not None:
                self.warmup(model)

    def _loop(self, poll: float) -> None:
        while not self._stop.wait(poll):
            try:
                self.refresh()
            except Exception as e:  # a storage hiccup must not kill the watcher
                self.errors["*"] = f"{type(e).__name__}: {e}"

    def close(self) -> None:
        """Stop watching."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
