"""The content-keyed tensor pool of one tier: each distinct tensor held once, with its holders.

Tensors are keyed by :attr:`~weightbank.TensorInfo.content_key`, which is
equal for two tensors exactly when dtype, shape and bytes are equal, so two
resident checkpoints that share a tensor share one pooled copy, and its bytes
are counted once in the tier's :class:`~weightbank.serving.budget.TierLedger`.

A slot is *reserved* (its bytes counted) before its tensor exists and is then
filled or failed by its *loader* (the load that reserved it); other loads that
need the same tensor hold the pending slot and wait for it instead of reading it
again. A load fails only for its own reasons: when a loader fails and other
loads still hold the slot, the slot stays reserved (its bytes stay counted) with
no loader, its waiters are woken, and one of them adopts it and reads the tensor
from its own checkpoint (:meth:`TensorPool.adopt`). A slot lives while it has
holders (resident checkpoints, loads in flight); when
the last holder lets go the slot and its tensor are dropped and its bytes
uncounted. The pool keeps no other reference, so a dropped tensor is freed as
soon as no module uses it.

Not thread-safe by itself: the cache calls it under its lock (waiting on a
slot's ``ready`` event is the exception, and happens without the lock).

Example:
    >>> import torch
    >>> from weightbank.serving.budget import TierLedger
    >>> pool = TensorPool(TierLedger("device", 100))
    >>> _ = pool.reserve("k", 8, holder="a"); pool.fill("k", torch.zeros(2))
    >>> _ = pool.hold("k", "b"); pool.drop("k", "a"), pool.drop("k", "b"), pool.ledger.used
    (0, 8, 0)
"""

from __future__ import annotations

import threading
from collections.abc import Hashable, Iterable
from dataclasses import dataclass, field

import torch

from .budget import TierLedger

__all__ = ["Slot", "TensorPool"]


@dataclass(eq=False)
class Slot:
    """One pooled tensor (``None`` while its load is in flight) and who holds it.

    ``ready`` is set when the tensor arrives, or when its loader failed and the
    slot has no loader (``loader is None``): a waiter then adopts it or, if it was
    dropped (no holder left), sees ``error``. Adopting a slot gives it a fresh
    ``ready`` event, so every wait is on the current loader's event.
    """

    key: str
    nbytes: int
    tensor: torch.Tensor | None = None
    holders: set[Hashable] = field(default_factory=set)
    ready: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None
    loader: Hashable | None = None


class TensorPool:
    """Tensors of one tier by content key, reference-counted by holder."""

    def __init__(self, ledger: TierLedger) -> None:
        self.ledger = ledger
        self._slots: dict[str, Slot] = {}

    @property
    def tier(self) -> str:
        return self.ledger.tier

    def __contains__(self, key: object) -> bool:
        return key in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    def get(self, key: str) -> Slot | None:
        return self._slots.get(key)

    def keys(self) -> list[str]:
        return list(self._slots)

    def tensor(self, key: str) -> torch.Tensor:
        """The ready tensor under ``key`` (KeyError if absent or still pending)."""
        t = self._slots[key].tensor
        if t is None:
            raise KeyError(key)
        return t

    def hold(self, key: str, holder: Hashable) -> Slot:
        """Add ``holder`` to an existing slot (pending or ready)."""
        slot = self._slots[key]
        slot.holders.add(holder)
        return slot

    def reserve(self, key: str, nbytes: int, holder: Hashable, ref: str = "") -> Slot:
        """Count ``nbytes`` and create a pending slot; BudgetExceeded (nothing changed) if it does not fit."""
        if key in self._slots:
            raise AssertionError(f"slot {key[:12]} already exists")
        self.ledger.reserve(nbytes, ref)
        slot = Slot(key=key, nbytes=nbytes, holders={holder}, loader=holder)
        self._slots[key] = slot
        return slot

    def fill(self, key: str, tensor: torch.Tensor) -> None:
        slot = self._slots[key]
        slot.tensor = tensor
        slot.ready.set()

    def adopt(self, key: str, holder: Hashable) -> bool:
        """Make ``holder`` the loader of a pending slot whose loader failed; False if it has one or is filled.

        Example:
            >>> from weightbank.serving.budget import TierLedger
            >>> pool = TensorPool(TierLedger("device", 100))
            >>> _ = pool.reserve("k", 8, holder="a"); _ = pool.hold("k", "b")
            >>> pool.adopt("k", "b"); pool.fail("k", OSError("bad read"), holder="a")
            False
            >>> pool.adopt("k", "b"), pool.get("k").loader, pool.ledger.used
            (True, 'b', 8)
        """
        slot = self._slots.get(key)
        if slot is None or holder not in slot.holders or slot.tensor is not None or slot.loader is not None:
            return False
        slot.loader = holder
        slot.ready = threading.Event()
        return True

    def fail(self, key: str, error: BaseException, holder: Hashable) -> None:
        """``holder``'s load of a pending slot failed.

        If other loads hold the slot, it stays reserved without a loader and its
        waiters are woken to adopt it: the failure is ``holder``'s alone. Otherwise
        the slot is dropped and uncounted.
        """
        slot = self._slots.get(key)
        if slot is None or slot.tensor is not None or slot.loader != holder:
            return
        slot.loader = None
        slot.error = error
        if not slot.holders - {holder}:
            del self._slots[key]
            self.ledger.release(slot.nbytes)
        slot.ready.set()

    def drop(self, key: str, holder: Hashable) -> int:
        """Remove ``holder`` from ``key``; returns the bytes freed (the slot's, if it was the last holder)."""
        slot = self._slots.get(key)
        if slot is None or holder not in slot.holders:
            return 0
        slot.holders.discard(holder)
        if slot.holders:
            return 0
        del self._slots[key]
        self.ledger.release(slot.nbytes)
        return slot.nbytes

    def freed_if_dropped(self, holdings: Iterable[tuple[Hashable, Iterable[str]]]) -> int:
        """Bytes that dropping every (holder, keys) pair would free, without dropping anything."""
        remaining: dict[str, set[Hashable]] = {}
        freed = 0
        for holder, keys in holdings:
            for key in keys:
                slot = self._slots.get(key)
                if slot is None:
                    continue
                left = remaining.setdefault(key, set(slot.holders))
                if holder in left:
                    left.discard(holder)
                    if not left:
                        freed += slot.nbytes
        return freed

    def resident_bytes(self) -> int:
        """Sum of every slot's bytes; always equal to the ledger's count (a test checks it)."""
        return sum(s.nbytes for s in self._slots.values())
