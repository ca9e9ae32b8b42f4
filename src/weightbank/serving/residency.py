"""What a load needs and what is resident: load plans from manifests, resident entries, victim choice.

A :class:`LoadPlan` is computed from a checkpoint's manifest alone (no tensor I/O): the
module's names, each tensor's content key and exact byte size, so the bytes a
load adds to a tier are known before anything is read. :func:`choose_victims`
picks the fewest least-recently-used idle entries whose eviction makes room,
counting a shared tensor as freed only when no remaining holder keeps it.

Example:
    >>> from weightbank.serving.budget import TierLedger
    >>> from weightbank.serving.pool import TensorPool
    >>> pool = TensorPool(TierLedger("device", 10)); _ = pool.reserve("k", 8, "a")
    >>> e = Entry(cid="a", tier="device", keys={"k": 8}, module=None, loaded_at=0.0, last_used=0.0)
    >>> [v.cid for v in choose_victims(pool, [e], needed=5)]
    ['a']
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ..bank.checkpoint import Checkpoint
from ..bank.results import CheckpointInfo
from ..errors import BudgetExceeded
from .budget import TIERS
from .pool import TensorPool
from .results import CacheEvent, ModelStatus
from .tiers import to_host

__all__ = ["Entry", "Flight", "LoadPlan", "Residency", "choose_victims", "make_plan"]


@dataclass(frozen=True)
class LoadPlan:
    """A checkpoint's tensors as the cache needs them: module names → content keys, sizes, sources."""

    cid: str
    info: CheckpointInfo
    names: tuple[tuple[str, str], ...]
    """(module state_dict name, content key) for every tensor the module gets."""
    sizes: dict[str, int]
    """Bytes of each distinct content key."""
    source: dict[str, str]
    """A checkpoint tensor name to read each content key from."""

    @property
    def nbytes(self) -> int:
        return sum(self.sizes.values())


def make_plan(checkpoint: Checkpoint, prefix: str = "") -> LoadPlan:
    """The plan of one checkpoint, keeping tensors under ``prefix`` (removed from their names).

    Example:
        >>> import torch, weightbank as wb
        >>> bank = wb.open("memory://"); cid = bank.save({"a": torch.ones(2), "b": torch.ones(2)}).id
        >>> plan = make_plan(bank.checkpoint(cid))
        >>> len(plan.names), plan.nbytes   # equal tensors are one pooled tensor
        (2, 8)
    """
    m = checkpoint.manifest
    names: list[tuple[str, str]] = []
    sizes: dict[str, int] = {}
    source: dict[str, str] = {}
    for i, t in enumerate(m.tensors):
        if not t.name.startswith(prefix):
            continue
        key = m.content_key(i)
        names.append((t.name[len(prefix) :], key))
        sizes.setdefault(key, t.nbytes)
        source.setdefault(key, t.name)
    return LoadPlan(cid=checkpoint.id, info=checkpoint.info, names=tuple(names), sizes=sizes, source=source)


@dataclass(eq=False)
class Entry:
    """One resident checkpoint: its tier, the content keys it holds there and (on the device) its module."""

    cid: str
    tier: Literal["device", "host"]
    keys: dict[str, int]
    module: nn.Module | None
    loaded_at: float
    """Cache-clock time it arrived in its tier (for min_residency)."""
    last_used: float
    """Cache-clock time of its last lease (for LRU and TTL)."""
    wall_loaded: float = field(default_factory=time.time)
    wall_used: float = field(default_factory=time.time)
    leases: int = 0
    doomed: bool = False
    """Unload was asked while leased: it goes when its last lease ends."""


def choose_victims(pool: TensorPool, candidates: Sequence[Entry], needed: int) -> list[Entry] | None:
    """The fewest LRU ``candidates`` whose eviction makes room for ``needed`` bytes; None if all cannot.

    ``candidates`` must already be the evictable entries of the pool's tier.
    """
    led = pool.ledger
    if led.fits(needed):
        return []

    def enough(chosen: Iterable[Entry]) -> bool:
        return led.used - pool.freed_if_dropped((c.cid, c.keys) for c in chosen) + needed <= led.budget

    chosen: list[Entry] = []
    for e in sorted(candidates, key=lambda e: e.last_used):
        chosen.append(e)
        if enough(chosen):
            break
    else:
        return None
    for e in list(chosen[:-1]):  # spare earlier victims whose eviction turned out not to be needed
        trial = [c for c in chosen if c is not e]
        if enough(trial):
            chosen = trial
    return chosen


@dataclass(eq=False)
class Flight:
    """One load in progress; its identity is the pool holder for the tensors it reserves."""

    cid: str
    source: str
    leases: int = 0
    done: threading.Event = field(default_factory=threading.Event)
    module: nn.Module | None = None
    error: BaseException | None = None


class Residency:
    """Which checkpoint is resident in which tier, and every eviction and demotion.

    The pools and entries of all tiers live here; the cache drives it under its
    lock (nothing here locks or waits). ``loading(cid)`` tells which
    checkpoints have a load in flight (they are not evicted).
    """

    def __init__(
        self,
        pools: dict[str, TensorPool],
        device: torch.device,
        *,
        min_residency: float,
        loading: Callable[[str], bool],
        emit: Callable[[CacheEvent], None],
    ) -> None:
        self.pools = pools
        self.device = device
        self.min_residency = min_residency
        self.entries: dict[str, Entry] = {}
        self.pins: set[str] = set()
        self.evictions: dict[str, int] = {}
        self.freed_device = False
        self._loading = loading
        self._emit = emit

    # -- holding ---------------------------------------------------------------------------
    def drop_holder(self, tier: str, holder: Hashable, keys: Iterable[str]) -> None:
        """Drop ``holder`` from ``keys`` in ``tier``'s pool (freed slots are uncounted there)."""
        pool = self.pools[tier]
        for key in list(keys):
            if pool.drop(key, holder) and tier == "device":
                self.freed_device = True

    # -- choosing --------------------------------------------------------------------------
    def evictable(self, e: Entry, now: float) -> bool:
        """Host entries always; device entries when idle, unpinned, not loading and old enough."""
        if e.tier == "host":
            return True
        return (
            e.leases == 0
            and e.cid not in self.pins
            and not self._loading(e.cid)
            and now - e.loaded_at >= self.min_residency
        )

    def victims(self, tier: str, needed: int, now: float, exclude: str) -> list[Entry] | None:
        """LRU idle entries of ``tier`` (other than ``exclude``) to evict for ``needed`` bytes; None if impossible."""
        candidates = [
            e for e in self.entries.values() if e.tier == tier and e.cid != exclude and self.evictable(e, now)
        ]
        return choose_victims(self.pools[tier], candidates, needed)

    def retry_in(self, now: float, deadline: float) -> float:
        """Seconds a load waiting for room sleeps: until the next idle entry ages past min_residency, at most."""
        wake = deadline
        for e in self.entries.values():
            if e.tier == "device" and e.leases == 0 and e.cid not in self.pins:
                wake = min(wake, e.loaded_at + self.min_residency)
        return max(0.001, wake - now)

    def check_fits_with_pins(self, plan: LoadPlan, *, pinning: bool = False) -> None:
        """BudgetExceeded (permanent) if ``plan`` beside every pinned checkpoint cannot fit the device budget."""
        keys = dict(plan.sizes)
        for cid in self.pins:
            e = self.entries.get(cid)
            if e is not None and cid != plan.cid and e.tier == "device":
                keys.update(e.keys)
        total = sum(keys.values())
        led = self.pools["device"].ledger
        if total > led.budget:
            pinned = total - plan.nbytes
            raise BudgetExceeded(
                "device",
                needed=total,
                used=led.used,
                budget=led.budget,
                ref=plan.cid,
                transient=False,
                detail=(
                    f"{'pinning it' if pinning else 'it'} needs {plan.nbytes} bytes"
                    + (f" beside {pinned} bytes of pinned checkpoints" if pinned > 0 else "")
                ),
            )

    # -- moving ----------------------------------------------------------------------------
    def evict(self, e: Entry, reason: str, *, now: float, demote: bool) -> None:
        """Remove ``e`` from its tier: demoted to the host when asked and it fits, else released."""
        tier = e.tier
        if tier == "device" and demote and self._demote(e, now):
            reason = "demote"
        else:
            self.drop_holder(tier, e.cid, e.keys)
            e.module = None
            del self.entries[e.cid]
        self.evictions[reason] = self.evictions.get(reason, 0) + 1
        self._emit(CacheEvent("evict", e.cid, tier, nbytes=sum(e.keys.values()), reason=reason))

    def _demote(self, e: Entry, now: float) -> bool:
        dev, host = self.pools["device"], self.pools["host"]
        if host.ledger.budget <= 0:
            return False
        needed = sum(n for k, n in e.keys.items() if k not in host)
        victims = self.victims("host", needed, now, exclude=e.cid)
        if victims is None:
            return False
        for v in victims:
            self.evict(v, "pressure", now=now, demote=False)
        for key, n in e.keys.items():
            if key in host:
                host.hold(key, e.cid)
            else:
                host.reserve(key, n, e.cid, ref=e.cid)
                host.fill(key, to_host(dev.tensor(key), self.device))
        self.drop_holder("device", e.cid, e.keys)
        e.tier = "host"
        e.module = None
        e.loaded_at = e.last_used = now
        e.wall_loaded = time.time()
        return True

    def sweep(self, now: float, ttl: float) -> int:
        """Evict (demoting from the device) every idle entry unused for ``ttl`` seconds."""
        expired = [e for e in self.entries.values() if now - e.last_used >= ttl and self.evictable(e, now)]
        n = 0
        for e in expired:
            if self.entries.get(e.cid) is not e:
                continue  # gone already: an earlier entry's demotion made room on the host with it
            self.evict(e, "ttl", now=now, demote=True)
            n += 1
        return n

    # -- reporting -------------------------------------------------------------------------
    def status(self, e: Entry) -> ModelStatus:
        return ModelStatus(
            checkpoint=e.cid,
            tier=e.tier,
            nbytes=sum(e.keys.values()),
            unique_bytes=self.pools[e.tier].freed_if_dropped([(e.cid, e.keys)]),
            leases=e.leases,
            pinned=e.cid in self.pins,
            loaded_at=e.wall_loaded,
            last_used=e.wall_used,
        )

    def resident(self) -> dict[str, int]:
        out = dict.fromkeys(TIERS, 0)
        for e in self.entries.values():
            out[e.tier] += 1
        return out
