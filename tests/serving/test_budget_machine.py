"""Property: under any sequence of loads, leases, pins, unloads and time passing, no tier ever exceeds its budget."""

from __future__ import annotations

import contextlib

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import weightbank as wb
from weightbank.serving import Lease, ModelCache

from .conftest import FakeClock
from .family import build, make_family

FAMILY = make_family(wb.open("memory://"), n_variants=5)
N = len(FAMILY.ids)
FULL, HEAD = FAMILY.full_bytes, FAMILY.head_bytes


class CacheMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.leases: list[Lease] = []
        self.cache: ModelCache | None = None

    @initialize(
        device=st.sampled_from([FULL - 1, FULL, FULL + HEAD, FULL + 3 * HEAD, 2 * FULL, 3 * FULL]),
        host=st.sampled_from([0, FULL, FULL + 2 * HEAD, 3 * FULL]),
        min_residency=st.sampled_from([0.0, 5.0]),
    )
    def start(self, device: int, host: int, min_residency: float) -> None:
        self.cache = ModelCache(
            FAMILY.bank,
            build,
            budget={"device": device, "host": host},
            ttl=30.0,
            min_residency=min_residency,
            wait_timeout=0,
            clock=self.clock,
            sweep_interval=0,
        )

    @property
    def c(self) -> ModelCache:
        assert self.cache is not None
        return self.cache

    @rule(i=st.integers(0, N - 1))
    def load(self, i: int) -> None:
        with contextlib.suppress(wb.BudgetExceeded):
            self.c.load(FAMILY.ids[i])

    @rule(i=st.integers(0, N - 1))
    def open_lease(self, i: int) -> None:
        lease = self.c.lease(FAMILY.ids[i])
        try:
            model = lease.__enter__()
        except wb.BudgetExceeded:
            return
        with torch.no_grad():
            assert torch.equal(model(FAMILY.x), FAMILY.expected(FAMILY.ids[i]))
        self.leases.append(lease)

    @precondition(lambda self: bool(self.leases))
    @rule(data=st.data())
    def close_lease(self, data: st.DataObject) -> None:
        lease = self.leases.pop(data.draw(st.integers(0, len(self.leases) - 1)))
        lease.__exit__(None, None, None)

    @rule(i=st.integers(0, N - 1))
    def pin(self, i: int) -> None:
        with contextlib.suppress(wb.BudgetExceeded):
            self.c.pin(FAMILY.ids[i])

    @rule(i=st.integers(0, N - 1))
    def unpin(self, i: int) -> None:
        self.c.unpin(FAMILY.ids[i])

    @rule(i=st.integers(0, N - 1))
    def unload(self, i: int) -> None:
        self.c.unload(FAMILY.ids[i])

    @rule(seconds=st.sampled_from([1.0, 6.0, 31.0]))
    def time_passes(self, seconds: float) -> None:
        self.clock.advance(seconds)
        self.c.sweep()

    @invariant()
    def budget_never_exceeded(self) -> None:
        if self.cache is None:
            return
        stats = self.c.stats()
        for tier, t in stats.tiers.items():
            assert t.used <= t.budget and t.peak <= t.budget, tier
            assert t.used == self.c._pools[tier].resident_bytes(), tier

    @invariant()
    def counted_bytes_are_exactly_the_resident_checkpoints(self) -> None:
        if self.cache is None:
            return
        for tier in ("device", "host"):
            keys: dict[str, int] = {}
            for e in self.c._entries.values():
                if e.tier == tier:
                    keys.update(e.keys)
            assert sum(keys.values()) == self.c.stats().tiers[tier].used, tier

    @invariant()
    def leased_and_pinned_stay_on_the_device(self) -> None:
        if self.cache is None:
            return
        tiers = {m.checkpoint: m for m in self.c.models()}
        for lease in self.leases:
            assert lease.checkpoint is not None
            assert tiers[lease.checkpoint].tier == "device" and tiers[lease.checkpoint].leases >= 1
        for cid in self.c._pins:
            if cid in tiers:
                assert tiers[cid].tier == "device"

    def teardown(self) -> None:
        for lease in self.leases:
            lease.__exit__(None, None, None)
        if self.cache is not None:
            self.c.close()
            assert all(t.used == 0 for t in self.c.stats().tiers.values())


CacheMachine.TestCase.settings = settings(
    max_examples=50, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestBudgetNeverExceeded = CacheMachine.TestCase


def test_a_sweep_whose_demotion_evicts_another_expired_entry_evicts_it_once() -> None:
    """Found by the machine above: the pinned entry's demotion to the host made room by evicting an
    entry the same sweep had found expired, which the sweep then evicted again (KeyError)."""
    m = CacheMachine()
    m.start(device=FULL + HEAD, host=FULL, min_residency=0.0)
    m.pin(4)
    m.load(0)
    m.load(1)
    m.unpin(4)
    m.time_passes(31.0)
    m.budget_never_exceeded()
    m.counted_bytes_are_exactly_the_resident_checkpoints()
    m.teardown()
