"""Live tags: requests naming a tag follow it as it moves, and a move flips only once the target is warm.

:class:`LiveTags` serves tags from a snapshot. A background thread polls the
bank's tags (cheap: small ref objects); when one moved (``weightbank tag``,
``rollback``, the HTTP API, another process), the new target is loaded and
warmed first, and only then does the snapshot entry change — one atomic
assignment, so a request resolves either the old or the new target, never a
cold one. Requests already running hold leases on the old checkpoint and
finish on it. If the new target cannot be loaded the tag keeps serving its old
target and the failure is kept in :attr:`LiveTags.errors` (tried again at the
next poll).

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

import threading
from collections.abc import Callable

from torch import nn

from ..bank.bank import Bank
from .cache import ModelCache

__all__ = ["LiveTags"]

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
        self._snapshot: dict[str, str] = {t.name: t.target for t in bank.tags() if t.target}
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
            current = {t.name: t.target for t in self.bank.tags() if t.target}
            flipped: dict[str, str] = {}
            for name in [n for n in self._snapshot if n not in current]:
                self._snapshot.pop(name, None)
                self.errors.pop(name, None)
            for name, target in current.items():
                if self._snapshot.get(name) == target:
                    continue
                try:
                    self._warm(target)
                except Exception as e:  # keep serving the old target; retried at the next poll
                    self.errors[name] = f"{type(e).__name__}: {e}"
                    continue
                self._snapshot[name] = target  # the flip: one atomic assignment
                self.errors.pop(name, None)
                flipped[name] = target
            return flipped

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
