"""One load's tensors: room made on the device, missing tensors read or promoted, shared slots awaited, the module built.

:class:`Loader` is the part of :class:`~weightbank.ModelCache` that fills one
:class:`~weightbank.serving.residency.LoadPlan` (the cache runs it once per
load in flight, at most ``max_concurrent_loads`` at a time). In order:

1. **Room.** Under the cache's lock, the tensors already on the device are held
   and the bytes of the missing ones are made room for by evicting idle
   checkpoints (demoted to the host tier when it has room), waiting while
   everything is leased, pinned or loading; past the deadline the load fails
   with a transient :class:`~weightbank.errors.BudgetExceeded`. The missing
   tensors' slots are then reserved, so the budget is never exceeded.
2. **Fill.** Without the lock, tensors resident on the host tier are copied up
   (promoted) and the rest are read from the bank, in one ``load_tensors`` call
   on the load's :class:`~weightbank.Checkpoint` (its :class:`Opener` resolves
   the checkpoint at most once per load, and not at all when nothing is read).
3. **Shared slots.** A tensor another load is filling is waited for, never read
   twice. If that load fails, this one adopts the slot and reads the tensor
   from its own checkpoint: a load fails only for its own reasons.
4. **Build.** The module is built from the pooled tensors.

If any step fails, every slot this load was to fill is failed (handed to the
other loads holding it, which adopt it) and the error is raised.

Example:
    >>> import torch, weightbank as wb
    >>> bank = wb.open("memory://"); cid = bank.save(torch.nn.Linear(2, 2).state_dict()).id
    >>> cache = wb.ModelCache(bank, build=lambda info: torch.nn.Linear(2, 2))
    >>> _ = cache.load(cid); cache.stats().bytes_loaded["bank"]  # its 24 bytes, read by a Loader
    24
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..bank.bank import Bank
from ..bank.checkpoint import Checkpoint
from ..bank.results import CheckpointInfo
from ..bank.trust import Verify
from ..errors import BudgetExceeded
from .modules import build_module
from .pool import Slot, TensorPool
from .residency import Flight, LoadPlan, Residency
from .tiers import to_device

__all__ = ["Factory", "Loader", "Opener"]

Factory = Callable[[CheckpointInfo], nn.Module]
"""``build(info) -> nn.Module``: the empty module of a checkpoint, made from ``info.config``."""


class Opener:
    """One load's checkpoint: its id, and its handle, opened at most once and only when first needed.

    A ref that took the bank to resolve hands its handle in (``checkpoint``), so
    a cold ``lease("prod")`` resolves ``prod`` once; a full id opens on the first
    read (or plan), so a load served from the host tier asks the bank nothing.
    Used by one thread: the load's owner.

    Example:
        >>> import torch, weightbank as wb
        >>> bank = wb.open("memory://"); cid = bank.save({"w": torch.ones(1)}).id
        >>> opener = Opener(bank, cid); opener.opened, opener().id == cid, opener.opened
        (False, True, True)
    """

    def __init__(self, bank: Bank, cid: str, checkpoint: Checkpoint | None = None) -> None:
        self.bank = bank
        self.cid = cid
        self._checkpoint = checkpoint

    @property
    def opened(self) -> bool:
        """Whether the handle exists yet."""
        return self._checkpoint is not None

    def __call__(self) -> Checkpoint:
        """The handle (``bank.checkpoint(cid)`` on first use): CheckpointNotFound if it was deleted."""
        if self._checkpoint is None:
            self._checkpoint = self.bank.checkpoint(self.cid)
        return self._checkpoint


class Loader:
    """Fills load plans into the device pool and builds their modules, sharing the cache's lock and state.

    ``cond`` is the cache's condition (over its lock): every pool and residency
    change happens under it, and it is notified when room may have appeared.
    Reading from the bank, copying between tiers, building the module and
    waiting for another load's slot happen without it.
    """

    def __init__(
        self,
        bank: Bank,
        pools: Mapping[str, TensorPool],
        residency: Residency,
        cond: threading.Condition,
        *,
        device: torch.device,
        build: Factory,
        build_on: str,
        clock: Callable[[], float],
        verify: Verify | None = None,
    ) -> None:
        self.bank = bank
        self.verify = verify
        self.device = device
        self._pools = pools
        self._res = residency
        self._cond = cond
        self._build = build
        self._build_on = build_on
        self._clock = clock
        self.bytes_reused = 0
        """Bytes loads found already on the device instead of reading them (guarded by the cache's lock)."""

    def load(
        self, flight: Flight, plan: LoadPlan, opener: Opener, *, deadline: float
    ) -> tuple[nn.Module, dict[str, int]]:
        """The module of ``plan``'s checkpoint and the bytes read per source tier (``host``, ``bank``).

        Tensors not on the host tier are read from ``opener``'s checkpoint.

        Waits for room until ``deadline`` (on the cache's clock), then raises a
        transient BudgetExceeded. On success the plan's device slots are held by
        ``flight``; on failure the slots it was to fill are failed for their other holders.
        """
        dev, host = self._pools["device"], self._pools["host"]
        held: dict[str, Slot] = {}
        mine: dict[str, int] = {}
        promote: dict[str, torch.Tensor] = {}
        with self._cond:
            while True:
                now = self._clock()
                self._res.check_fits_with_pins(plan)
                missing: dict[str, int] = {}
                for key, n in plan.sizes.items():
                    if key in dev:
                        held[key] = dev.hold(key, flight)
                    else:
                        missing[key] = n
                needed = sum(missing.values())
                victims = self._res.victims("device", needed, now, exclude=flight.cid)
                if victims is not None:
                    break
                if now >= deadline:
                    led = dev.ledger
                    raise BudgetExceeded(
                        "device",
                        needed=needed,
                        used=led.used,
                        budget=led.budget,
                        ref=plan.cid,
                        transient=True,
                        detail="every resident checkpoint is leased, pinned, loading or younger than min_residency",
                    )
                self._cond.wait(timeout=self._res.retry_in(now, deadline))
            for v in victims:
                self._res.evict(v, "pressure", now=now, demote=True)
            for key, n in missing.items():
                held[key] = dev.reserve(key, n, flight, ref=plan.cid)
                mine[key] = n
                src = host.get(key)
                if src is not None and src.tensor is not None:
                    host.hold(key, flight)
                    promote[key] = src.tensor
            self.bytes_reused += plan.nbytes - needed
        source_bytes = {"host": 0, "bank": 0}
        try:
            fresh = {k: to_device(t, self.device) for k, t in promote.items()}
            source_bytes["host"] = sum(mine[k] for k in fresh)
            self._read_into_slots(opener, plan, [k for k in mine if k not in fresh], fresh, source_bytes)
            with self._cond:
                self._res.drop_holder("host", flight, promote)
            self._await_shared(flight, opener, plan, held, source_bytes)
            tensors = {name: held[key].tensor for name, key in plan.names}
            module = build_module(
                lambda: self._build(plan.info),
                {n: t for n, t in tensors.items() if t is not None},
                self.device,
                build_on=self._build_on,
                what=f"checkpoint {plan.cid[:12]}",
            )
        except BaseException as exc:
            with self._cond:
                for k in held:  # the slots this load was to fill: handed to their other waiters
                    dev.fail(k, exc, flight)
            raise
        return module, source_bytes

    def _read_into_slots(
        self,
        opener: Opener,
        plan: LoadPlan,
        keys: list[str],
        fresh: dict[str, torch.Tensor],
        source_bytes: dict[str, int],
    ) -> None:
        """Read ``keys`` (slots this load is the loader of) from the bank, then fill them and ``fresh``'s."""
        if keys:
            names = [plan.source[k] for k in keys]
            ck = opener()
            if self.verify is None:  # the bank's own mode
                loaded = ck.load_tensors(names, device=self.device)
            else:
                loaded = ck.load_tensors(names, device=self.device, verify=self.verify)
            fresh.update((k, loaded[plan.source[k]]) for k in keys)
            source_bytes["bank"] += sum(plan.sizes[k] for k in keys)
        with self._cond:
            for k, t in fresh.items():
                self._pools["device"].fill(k, t)

    def _await_shared(
        self,
        flight: Flight,
        opener: Opener,
        plan: LoadPlan,
        held: dict[str, Slot],
        source_bytes: dict[str, int],
    ) -> None:
        """Wait for the slots other loads fill; adopt and read those whose loader failed.

        Another load's failure is never this one's: a shared tensor it could not
        deliver is read here from this checkpoint (its bytes are still reserved).
        """
        dev = self._pools["device"]
        while True:
            with self._cond:
                adopted = [k for k in held if dev.adopt(k, flight)]
                self.bytes_reused -= sum(plan.sizes[k] for k in adopted)
                waiting = [s for s in held.values() if s.tensor is None and s.loader is not flight]
                dropped = [s for s in waiting if s.loader is None]
            if dropped:  # cannot happen while this load holds the slot; never wait on a dead event
                raise AssertionError(f"slot {dropped[0].key[:12]} held by a load but dropped")
            if adopted:
                self._read_into_slots(opener, plan, adopted, {}, source_bytes)
                continue
            if not waiting:
                return
            waiting[0].ready.wait()
