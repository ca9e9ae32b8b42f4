"""ModelCache: many checkpoints served from one process, loaded on first use under a byte budget.

Invariants (each has a test):

* **The budget is never exceeded.** Before a load, the bytes it will add — its
  tensors not already resident in the tier, computed from the manifest with
  no I/O — are reserved; idle checkpoints are evicted first to make room, and
  a reservation that would pass the budget is refused, never honoured.
* **A leased checkpoint is never evicted or changed.** Modules are never
  mutated after they are built; a new version is a new module.
* **Single flight.** However many callers want a checkpoint that is not
  resident, it is loaded once; they all wait for that one load while
  resident checkpoints keep serving. At most ``max_concurrent_loads`` loads
  run at once.
* **A load fails only for its own reasons.** Loads that share a tensor read it
  once; if the load reading it fails (a corrupt sibling, a read error), the
  others adopt the reserved slot and read the tensor from their own
  checkpoint instead of inheriting that error.
* **Swap by difference.** Tensors are pooled by content key, so a load reads
  (or promotes from the host tier) only the tensors not already on the device.
* **Release for real.** Eviction drops the module and the pool's references;
  a tensor no resident checkpoint holds is freed (and CUDA's cached blocks are
  returned with ``empty_cache``).

Eviction picks idle checkpoints (no lease, not pinned, resident for at least
``min_residency`` seconds) in least-recently-used order; an idle checkpoint
unused for ``ttl`` seconds is released without pressure. A device victim is
demoted to the host tier when the host budget allows, so bringing it back is a
copy, not a read.

This module owns residency over time (leases, single flight, pins, sweeps,
statistics); filling one load (making room, reading or promoting its tensors,
sharing slots with concurrent loads, building the module) is
:class:`~weightbank.serving.loading.Loader`'s.

Below the memory tiers, a remote bank's local disk cache (``Bank.cache``) is
the disk tier: every chunk a load fetches stays there, so a checkpoint evicted
from memory comes back with local reads. ``budget={"disk": "100GiB"}`` sets
that cache's cap, ``prefetch(ref, tier="disk")`` fills it without loading, and
``stats().disk`` reports it. A bank without a disk cache (a local directory)
is its own disk tier: the ``disk`` budget then has nothing to cap.

Example:
    >>> import torch, weightbank as wb
    >>> bank = wb.open("memory://")
    >>> cid = bank.save(torch.nn.Linear(2, 2).state_dict(), tags=["prod"]).id
    >>> cache = wb.ModelCache(bank, build=lambda info: torch.nn.Linear(2, 2), budget={"device": "1MiB"})
    >>> with cache.lease("prod") as model:
    ...     y = model(torch.ones(1, 2))
    >>> cache.stats().tiers["device"].used
    24
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Literal, overload

import torch
from torch import nn

from ..bank.bank import Bank
from ..bank.results import PrefetchReport
from ..bank.trust import Verify, check_verify
from ..errors import CheckpointNotFound, InvalidRequest
from .budget import DISK, TIERS, TierLedger, parse_budget
from .lease import Lease, Prefetch
from .loading import Factory, Loader, Opener
from .pool import TensorPool
from .residency import Entry, Flight, LoadPlan, Residency, make_plan
from .results import CacheEvent, CacheStats, ModelStatus
from .tiers import parse_device, release_device_memory

__all__ = ["ModelCache"]

Listener = Callable[[CacheEvent], None]
_HEX = frozenset("0123456789abcdef")
_PLAN_CACHE = 4096


def _is_id(ref: str) -> bool:
    """Whether ``ref`` is a full checkpoint id (taken as is, without asking the bank)."""
    return len(ref) == 64 and _HEX.issuperset(ref)


class ModelCache:
    """Checkpoints of one bank, built by ``build(info)`` and filled from a content-shared tensor pool.

    Args:
        bank: where checkpoints come from (only its public API is used).
        build: ``build(info) -> nn.Module`` makes the empty module of a checkpoint
            (from ``info.config``); it runs under ``torch.device(build_on)``.
        device: ``"cpu"`` or ``"cuda[:N]"``.
        budget: ``{"device": "20GiB", "host": "64GiB"}`` or ``"device=20GiB,host=64GiB"``;
            no budget means an unbounded device tier and no host tier. A ``disk`` entry
            caps the bank's disk cache (resizing ``bank.cache``, shared by its other users).
        ttl: seconds an idle checkpoint stays in a tier without pressure (None: forever).
        min_residency: seconds a newly loaded checkpoint is safe from eviction (against thrashing).
        max_concurrent_loads: loads running at once; more wait their turn.
        wait_timeout: seconds a load waits for room while everything is leased or pinned
            before raising BudgetExceeded (0: fail at once).
        prefix: only checkpoint tensors under this name prefix, with it removed, fill the module
            (``"model."`` for a training checkpoint that also holds optimizer state).
        build_on: device the factory runs under; ``"meta"`` allocates nothing.
        clock: monotonic seconds (tests pass a fake one).
        sweep_interval: seconds between background TTL sweeps (None: ttl/4, at most 1 s; 0: never).
        verify: how loads check the chunks they read: ``"always"``, ``"once"`` (a chunk this
            process verified from the same unchanged local files is trusted: reloads of shared
            tensors skip the hash), ``"never"`` (unsafe); None: the bank's (see :func:`weightbank.open`).
    """

    def __init__(
        self,
        bank: Bank,
        build: Factory,
        *,
        device: str | torch.device = "cpu",
        budget: str | Mapping[str, str | int] | None = None,
        ttl: float | None = None,
        min_residency: float = 0.0,
        max_concurrent_loads: int = 2,
        wait_timeout: float = 30.0,
        prefix: str = "",
        build_on: str = "meta",
        clock: Callable[[], float] = time.monotonic,
        sweep_interval: float | None = None,
        verify: Verify | None = None,
    ) -> None:
        if max_concurrent_loads < 1:
            raise InvalidRequest("max_concurrent_loads must be at least 1", "max_concurrent_loads")
        self.bank = bank
        self.device = parse_device(device)
        self.ttl = ttl
        self.min_residency = min_residency
        self.wait_timeout = wait_timeout
        self.prefix = prefix
        self._clock = clock
        budgets = parse_budget(budget)
        disk = budgets.pop(DISK, None)
        if budget is None or (disk is not None and not any(budgets.values())):
            budgets["device"] = 1 << 62  # no memory budget given: an unbounded device tier
        if disk is not None and bank.cache is not None:
            bank.cache.resize(disk)
        self._pools = {t: TensorPool(TierLedger(t, budgets[t])) for t in TIERS}
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._flights: dict[str, Flight] = {}
        self._res = Residency(
            self._pools,
            self.device,
            min_residency=min_residency,
            loading=self._flights.__contains__,
            emit=self._emit,
        )
        self._entries = self._res.entries
        self._pins = self._res.pins
        self._plans: OrderedDict[str, LoadPlan] = OrderedDict()
        self._loader = Loader(
            bank,
            self._pools,
            self._res,
            self._cond,
            device=self.device,
            build=build,
            build_on=build_on,
            clock=clock,
            verify=None if verify is None else check_verify(verify),
        )
        self._listeners: list[Listener] = []
        self._load_slots = threading.BoundedSemaphore(max_concurrent_loads)
        self._max_loads = max_concurrent_loads
        self._executor: ThreadPoolExecutor | None = None
        self._closed = False
        self._hits = dict.fromkeys(TIERS, 0)
        self._misses = dict.fromkeys(TIERS, 0)
        self._loads = 0
        self._load_seconds = 0.0
        self._bytes_loaded = {"host": 0, "bank": 0}
        self._queue_wait = 0.0
        self._stop = threading.Event()
        self._sweeper: threading.Thread | None = None
        interval = sweep_interval if sweep_interval is not None else (min(ttl / 4, 1.0) if ttl else 0)
        if ttl is not None and interval > 0:
            self._sweeper = threading.Thread(
                target=self._sweep_loop, args=(interval,), name="weightbank-cache-ttl", daemon=True
            )
            self._sweeper.start()

    # -- public API ----------------------------------------------------------------------
    def lease(self, ref: str) -> Lease:
        """A context manager that loads ``ref`` if needed and keeps it resident and unchanged while held.

        Example:
            >>> import torch, weightbank as wb
            >>> bank = wb.open("memory://"); _ = bank.save(torch.nn.Linear(1, 1).state_dict(), tags=["v1"])
            >>> cache = wb.ModelCache(bank, build=lambda info: torch.nn.Linear(1, 1))
            >>> with cache.lease("v1") as model:
            ...     model(torch.ones(1, 1)).shape
            torch.Size([1, 1])
        """
        return Lease(self, ref)

    def load(self, ref: str) -> ModelStatus:
        """Make ``ref`` resident on the device (waiting for it) without leasing it.

        Example:
            >>> import torch, weightbank as wb
            >>> bank = wb.open("memory://"); _ = bank.save(torch.nn.Linear(1, 1).state_dict(), tags=["v1"])
            >>> wb.ModelCache(bank, build=lambda info: torch.nn.Linear(1, 1)).load("v1").tier
            'device'
        """
        return self._load(self._opener(ref))

    def _load(self, opener: Opener) -> ModelStatus:
        cid, _ = self._acquire(opener, lease=True)
        try:
            with self._lock:
                st = self._res.status(self._entries[cid])
        finally:
            self._release(cid)
        return replace(st, leases=st.leases - 1)

    @overload
    def prefetch(self, ref: str, *, tier: Literal["device"] = "device") -> Prefetch[ModelStatus]: ...

    @overload
    def prefetch(self, ref: str, *, tier: Literal["disk"]) -> Prefetch[PrefetchReport]: ...

    def prefetch(self, ref: str, *, tier: str = "device") -> Prefetch[ModelStatus] | Prefetch[PrefetchReport]:
        """Start loading ``ref`` in the background; the handle's ``wait()`` returns its status.

        ``tier="disk"`` only downloads and verifies its chunks into the bank's
        disk cache (``Bank.prefetch``; nothing to do for a bank without one) and
        ``wait()`` returns that :class:`~weightbank.PrefetchReport`.

        Example:
            >>> import torch, weightbank as wb
            >>> bank = wb.open("memory://"); _ = bank.save(torch.nn.Linear(1, 1).state_dict(), tags=["v1"])
            >>> wb.ModelCache(bank, build=lambda info: torch.nn.Linear(1, 1)).prefetch("v1").wait().leases
            0
        """
        if tier not in ("device", DISK):
            raise InvalidRequest(f"prefetch goes to the device or the disk tier, not {tier!r}", "tier")
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(self._max_loads, thread_name_prefix="weightbank-prefetch")
            executor = self._executor
        if tier == DISK:
            return Prefetch(executor.submit(self.bank.prefetch, ref))
        return Prefetch(executor.submit(self.load, ref))

    def unload(self, ref: str) -> bool:
        """Release ``ref`` from every tier (and unpin it); a leased one goes when its last lease ends.

        Returns whether it was resident.

        Example:
            >>> import torch, weightbank as wb
            >>> bank = wb.open("memory://"); _ = bank.save(torch.nn.Linear(1, 1).state_dict(), tags=["v1"])
            >>> cache = wb.ModelCache(bank, build=lambda info: torch.nn.Linear(1, 1)); _ = cache.load("v1")
            >>> cache.unload("v1"), cache.models()
            (True, [])
        """
        cid = self.resolve(ref)
        with self._cond:
            self._pins.discard(cid)
            e = self._entries.get(cid)
            if e is None:
                return False
            if e.leases:
                e.doomed = True
            else:
                self._res.evict(e, "unload", now=self._clock(), demote=False)
            self._cond.notify_all()
        self._release_freed()
        return True

    def pin(self, ref: str) -> ModelStatus:
        """Load ``ref`` and keep it on the device until ``unpin``; BudgetExceeded if pins would pass the budget.

        Example:
            >>> import torch, weightbank as wb
            >>> bank = wb.open("memory://"); _ = bank.save(torch.nn.Linear(1, 1).state_dict(), tags=["v1"])
            >>> wb.ModelCache(bank, build=lambda info: torch.nn.Linear(1, 1)).pin("v1").pinned
            True
        """
        opener = self._opener(ref)
        cid = opener.cid
        plan = self._plan(opener)
        with self._cond:
            self._res.check_fits_with_pins(plan, pinning=True)
            added = cid not in self._pins
            self._pins.add(cid)
        try:
            return self._load(opener)
        except BaseException:
            if added:
                with self._cond:
                    self._pins.discard(cid)
                    self._cond.notify_all()
            raise

    def unpin(self, ref: str) -> bool:
        """Let ``ref`` be evicted again; returns whether it was pinned.

        Example:
            >>> import torch, weightbank as wb
            >>> bank = wb.open("memory://"); _ = bank.save(torch.nn.Linear(1, 1).state_dict(), tags=["v1"])
            >>> cache = wb.ModelCache(bank, build=lambda info: torch.nn.Linear(1, 1)); _ = cache.pin("v1")
            >>> cache.unpin("v1"), cache.unpin("v1")
            (True, False)
        """
        cid = self.resolve(ref)
        with self._cond:
            was = cid in self._pins
            self._pins.discard(cid)
            self._cond.notify_all()
        return was

    def status(self, ref: str) -> ModelStatus:
        """Where ``ref``'s checkpoint is resident now; CheckpointNotFound if it is not."""
        cid = self.resolve(ref)
        with self._lock:
            e = self._entries.get(cid)
            if e is None:
                raise CheckpointNotFound(ref, detail="it is not resident in the cache")
            return self._res.status(e)

    def models(self) -> list[ModelStatus]:
        """Every resident checkpoint, most recently used first.

        Example:
            >>> import torch, weightbank as wb
            >>> wb.ModelCache(wb.open("memory://"), build=lambda info: torch.nn.Linear(1, 1)).models()
            []
        """
        with self._lock:
            entries = sorted(self._entries.values(), key=lambda e: e.last_used, reverse=True)
            return [self._res.status(e) for e in entries]

    def stats(self) -> CacheStats:
        """Counters and gauges: bytes per tier vs budget, hits/misses, loads, evictions, leases.

        Example:
            >>> import torch, weightbank as wb
            >>> wb.ModelCache(wb.open("memory://"), build=lambda info: torch.nn.Linear(1, 1)).stats().loads
            0
        """
        disk = (
            self.bank.cache.stats() if self.bank.cache is not None else None
        )  # outside the lock: it may scan
        with self._lock:
            return CacheStats(
                tiers={t: p.ledger.stats() for t, p in self._pools.items()},
                hits=dict(self._hits),
                misses=dict(self._misses),
                loads=self._loads,
                load_seconds=self._load_seconds,
                bytes_loaded=dict(self._bytes_loaded),
                bytes_reused=self._loader.bytes_reused,
                evictions=dict(self._res.evictions),
                leases=sum(e.leases for e in self._entries.values()),
                loads_in_flight=len(self._flights),
                resident=self._res.resident(),
                pinned=len(self._pins),
                queue_wait_seconds=self._queue_wait,
                disk=disk,
            )

    def subscribe(self, listener: Listener) -> None:
        """Call ``listener(event)`` for every hit, miss, load, eviction and load wait.

        Listeners run under the cache's lock: keep them fast and never call the cache from one.

        Example:
            >>> import torch, weightbank as wb
            >>> cache = wb.ModelCache(wb.open("memory://"), build=lambda info: torch.nn.Linear(1, 1))
            >>> cache.subscribe(print)
        """
        with self._lock:
            self._listeners.append(listener)

    def sweep(self) -> int:
        """Release idle checkpoints unused for ``ttl`` seconds now; returns how many moved or went."""
        with self._cond:
            n = self._sweep_locked(self._clock())
        self._release_freed()
        return n

    def close(self) -> None:
        """Stop background work and release every checkpoint (leases still held keep their modules alive)."""
        self._stop.set()
        if self._sweeper is not None:
            self._sweeper.join()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
        with self._cond:
            self._closed = True
            self._pins.clear()
            for e in list(self._entries.values()):
                self._res.evict(e, "unload", now=self._clock(), demote=False)
            self._cond.notify_all()
        self._release_freed()

    def __enter__(self) -> ModelCache:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- resolution and plans ---------------------------------------------------------
    def resolve(self, ref: str) -> str:
        """The checkpoint id ``ref`` names; a full id is taken as is (a load of an unknown one fails then).

        Example:
            >>> import torch, weightbank as wb
            >>> bank = wb.open("memory://"); cid = bank.save({"w": torch.ones(1)}, tags=["v1"]).id
            >>> wb.ModelCache(bank, build=lambda info: torch.nn.Linear(1, 1)).resolve("v1") == cid
            True
        """
        if _is_id(ref):
            return ref  # checked by Bank.checkpoint when it is loaded: no extra listing per request
        return self.bank.resolve(ref)

    def _opener(self, ref: str) -> Opener:
        """``ref``'s checkpoint for a load: a name is resolved now, once, and its handle kept for the load."""
        if _is_id(ref):
            return Opener(self.bank, ref)  # opened only if a load needs it: a hit asks the bank nothing
        checkpoint = self.bank.checkpoint(ref)
        return Opener(self.bank, checkpoint.id, checkpoint)

    def _plan(self, opener: Opener) -> LoadPlan:
        cid = opener.cid
        with self._lock:
            plan = self._plans.get(cid)
        if plan is not None:
            return plan
        plan = make_plan(opener(), self.prefix)
        with self._lock:
            self._plans[cid] = plan
            while len(self._plans) > _PLAN_CACHE:
                self._plans.popitem(last=False)
        return plan

    # -- leases -------------------------------------------------------------------------
    def _acquire(self, ref: str | Opener, *, lease: bool) -> tuple[str, nn.Module]:
        opener = ref if isinstance(ref, Opener) else self._opener(ref)
        cid = opener.cid
        t0 = self._clock()
        with self._cond:
            if self._closed:
                raise InvalidRequest("the cache is closed")
            self._sweep_locked(t0)
            e = self._entries.get(cid)
            if e is not None and e.tier == "device" and e.module is not None:
                self._touch(e, t0, lease)
                self._hits["device"] += 1
                self._emit(CacheEvent("hit", cid, "device"))
                return cid, e.module
            self._misses["device"] += 1
            self._emit(CacheEvent("miss", cid, "device"))
            flight = self._flights.get(cid)
            owner = flight is None
            if flight is None:
                flight = Flight(cid, source="host" if e is not None else "bank")
                self._flights[cid] = flight
            if flight.source == "host":
                self._hits["host"] += 1
                self._emit(CacheEvent("hit", cid, "host"))
            else:
                self._misses["host"] += 1
                self._emit(CacheEvent("miss", cid, "host"))
            if lease:
                flight.leases += 1
        if owner:
            self._fly(flight, opener)
        else:
            flight.done.wait()
        waited = self._clock() - t0
        with self._lock:
            self._queue_wait += waited
            self._emit(CacheEvent("wait", cid, "device", seconds=waited))
        if flight.error is not None:
            raise flight.error
        if flight.module is None:
            raise AssertionError("a finished load has a module or an error")
        return cid, flight.module

    def _touch(self, e: Entry, now: float, lease: bool) -> None:
        e.last_used = now
        e.wall_used = time.time()
        if lease:
            e.leases += 1

    def _release(self, cid: str) -> None:
        with self._cond:
            e = self._entries.get(cid)
            if e is None and self._closed:
                return
            if e is None or e.leases <= 0:
                raise AssertionError(f"lease of {cid[:12]} released twice")
            e.leases -= 1
            now = self._clock()
            e.last_used, e.wall_used = now, time.time()
            if e.doomed and e.leases == 0:
                self._res.evict(e, "unload", now=now, demote=False)
            self._cond.notify_all()
        self._release_freed()

    # -- loading -------------------------------------------------------------------------
    def _fly(self, flight: Flight, opener: Opener) -> None:
        """Run one load to completion; on success the entry holds the flight's leases."""
        t0 = self._clock()
        try:
            plan = self._plan(opener)
            self._load_slots.acquire()
            try:
                module, source_bytes = self._loader.load(
                    flight, plan, opener, deadline=self._clock() + self.wait_timeout
                )
            finally:
                self._load_slots.release()
            with self._cond:
                self._complete(flight, plan, module)
                seconds = self._clock() - t0
                self._loads += 1
                self._load_seconds += seconds
                for tier, n in source_bytes.items():
                    self._bytes_loaded[tier] += n
                self._emit(
                    CacheEvent(
                        "load", flight.cid, flight.source, seconds=seconds, nbytes=sum(source_bytes.values())
                    )
                )
        except BaseException as exc:
            with self._cond:
                flight.error = exc
                for tier, pool in self._pools.items():
                    self._res.drop_holder(tier, flight, pool.keys())
                self._flights.pop(flight.cid, None)
                self._cond.notify_all()
            raise
        finally:
            flight.done.set()
            self._release_freed()

    def _complete(self, flight: Flight, plan: LoadPlan, module: nn.Module) -> None:
        dev = self._pools["device"]
        now, wall = self._clock(), time.time()
        old = self._entries.get(flight.cid)
        if old is not None:  # it was on the host tier: it moves up
            self._res.drop_holder(old.tier, old.cid, old.keys)
        for key in plan.sizes:
            dev.hold(key, flight.cid)
        self._res.drop_holder("device", flight, plan.sizes)
        e = Entry(
            cid=flight.cid,
            tier="device",
            keys=dict(plan.sizes),
            module=module,
            loaded_at=now,
            last_used=now,
            wall_loaded=wall,
            wall_used=wall,
            leases=flight.leases,
        )
        self._entries[flight.cid] = e
        flight.module = module
        self._flights.pop(flight.cid, None)
        self._cond.notify_all()

    def _sweep_locked(self, now: float) -> int:
        if self.ttl is None:
            return 0
        n = self._res.sweep(now, self.ttl)
        if n:
            self._cond.notify_all()
        return n

    def _sweep_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.sweep()

    def _release_freed(self) -> None:
        with self._lock:
            freed, self._res.freed_device = self._res.freed_device, False
        if freed:
            release_device_memory(self.device)

    def _emit(self, event: CacheEvent) -> None:
        for listener in self._listeners:
            listener(event)
