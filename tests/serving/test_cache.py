"""ModelCache: leases, content sharing, swap by difference, eviction, pins, TTL, tiers, single flight."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import weightbank as wb
from weightbank.serving import ModelCache

from .conftest import FakeClock
from .family import MLP, Family, build, counting, make_family, patch_load_tensors

DEADLINE = 60.0  # seconds; only ever reached when something is broken


def cache_for(family: Family, **kw: object) -> ModelCache:
    return ModelCache(family.bank, build, **kw)  # type: ignore[arg-type]


def wait_until(what: str, pred: Callable[[], bool]) -> None:
    """Wait for a condition (polling), never for an amount of time; fail only past a generous deadline."""
    deadline = time.monotonic() + DEADLINE
    while not pred():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def join(*threads: threading.Thread) -> None:
    for t in threads:
        t.join(DEADLINE)
        assert not t.is_alive(), f"{t.name} did not finish"


def check_output(family: Family, cid: str, model: torch.nn.Module) -> None:
    with torch.no_grad():
        assert torch.equal(model(family.x), family.expected(cid))


def test_lease_serves_the_right_checkpoint_and_counts_hits(family: Family) -> None:
    cache = cache_for(family)
    for cid in family.ids:
        lease = cache.lease(cid)
        with lease as model:
            assert lease.checkpoint == cid
            check_output(family, cid, model)
            assert not model.training
            assert all(not p.requires_grad for p in model.parameters())
    with cache.lease("prod") as model:
        check_output(family, family.ids[0], model)
    s = cache.stats()
    assert s.hits["device"] == 1 and s.misses["device"] == len(family.ids) and s.loads == len(family.ids)
    assert s.leases == 0 and s.hit_rate == pytest.approx(1 / (len(family.ids) + 1))


def test_shared_tensors_are_held_once(family: Family) -> None:
    cache = cache_for(family)
    for cid in family.ids:
        cache.load(cid)
    used = cache.stats().tiers["device"].used
    assert used == family.full_bytes + (len(family.ids) - 1) * family.head_bytes
    with cache.lease(family.ids[1]) as a, cache.lease(family.ids[2]) as b:
        assert isinstance(a, MLP) and isinstance(b, MLP)
        first_a, first_b = a.layers[0], b.layers[0]
        assert isinstance(first_a, torch.nn.Linear) and isinstance(first_b, torch.nn.Linear)
        assert first_a.weight.data_ptr() == first_b.weight.data_ptr()
        assert a.head.weight.data_ptr() != b.head.weight.data_ptr()
    status = {m.checkpoint: m for m in cache.models()}
    assert status[family.ids[1]].unique_bytes == family.head_bytes
    assert status[family.ids[1]].nbytes == family.full_bytes


def test_swap_reads_only_the_tensors_that_differ(family: Family) -> None:
    calls = counting(family.bank)
    cache = cache_for(family)
    cache.load(family.ids[0])
    cache.load(family.ids[1])
    assert calls()[0][0] == family.ids[0] and len(calls()[0][1]) == 8
    assert calls()[1] == (family.ids[1], ("head.weight", "head.bias"))
    s = cache.stats()
    assert s.bytes_loaded["bank"] == family.full_bytes + family.head_bytes
    assert s.bytes_reused == family.full_bytes - family.head_bytes


def test_lru_eviction_keeps_the_budget(family: Family) -> None:
    budget = family.full_bytes + 2 * family.head_bytes
    cache = cache_for(family, budget={"device": budget})
    for cid in family.ids:
        cache.load(cid)
        assert cache.stats().tiers["device"].used <= budget
    resident = [m.checkpoint for m in cache.models()]
    assert resident == [family.ids[4], family.ids[3], family.ids[2]]
    s = cache.stats()
    assert s.tiers["device"].peak <= budget and s.evictions["pressure"] == 2


def test_eviction_never_takes_a_leased_checkpoint(family: Family) -> None:
    budget = family.full_bytes + family.head_bytes
    cache = cache_for(family, budget={"device": budget}, wait_timeout=0)
    with cache.lease(family.ids[1]) as m1:
        cache.load(family.ids[2])  # fits beside 1: they share the body
        assert {m.checkpoint for m in cache.models()} == {family.ids[1], family.ids[2]}
        with cache.lease(family.ids[2]) as m2, pytest.raises(wb.BudgetExceeded) as err:
            cache.load(family.ids[3])
        assert err.value.transient and err.value.tier == "device"
        check_output(family, family.ids[1], m1)
        check_output(family, family.ids[2], m2)
    assert cache.stats().tiers["device"].peak <= budget


def test_a_waiting_load_proceeds_when_the_lease_ends(family: Family) -> None:
    budget = family.full_bytes
    cache = cache_for(family, budget={"device": budget}, wait_timeout=10)
    done = threading.Event()
    errors: list[BaseException] = []

    def other() -> None:
        try:
            with cache.lease(family.ids[2]) as m:
                check_output(family, family.ids[2], m)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)
        done.set()

    with cache.lease(family.ids[1]) as m1:
        t = threading.Thread(target=other)
        t.start()
        wait_until("the other load to start", lambda: cache.stats().loads_in_flight == 1)
        assert not done.is_set()  # it waits: the budget holds only one variant and 1 is leased
        check_output(family, family.ids[1], m1)
    join(t)
    assert done.is_set() and not errors
    assert cache.stats().tiers["device"].peak <= budget


def test_single_flight_under_a_burst(family: Family) -> None:
    cache = cache_for(family)
    calls: list[str] = []
    real = family.bank.load_tensors

    def held(ref: str, names: list[str], *, device: object = None) -> dict[str, torch.Tensor]:
        calls.append(ref)
        # the one load reads only once all 16 requests have missed and joined it
        wait_until("16 requests", lambda: cache.stats().misses["device"] == 16)
        return real(ref, names, device=device)  # type: ignore[arg-type]

    patch_load_tensors(family.bank, held)
    barrier = threading.Barrier(16)
    seen: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        lease = cache.lease(family.ids[3])
        with lease as model:
            check_output(family, family.ids[3], model)
            with lock:
                seen.append(str(lease.checkpoint))

    threads = [threading.Thread(target=worker) for _ in range(16)]
    for t in threads:
        t.start()
    join(*threads)
    assert len(seen) == 16 and set(seen) == {family.ids[3]}
    assert calls == [family.ids[3]]
    s = cache.stats()
    assert s.loads == 1 and s.leases == 0 and s.hits["device"] == 0


def test_resident_checkpoints_keep_serving_while_another_loads(family: Family) -> None:
    cache = cache_for(family)
    cache.load(family.ids[0])
    reading, release = threading.Event(), threading.Event()
    real = family.bank.load_tensors

    def stuck(ref: str, names: list[str], *, device: object = None) -> dict[str, torch.Tensor]:
        reading.set()
        assert release.wait(DEADLINE)  # the load of 1 stays in flight until the lease below is done
        return real(ref, names, device=device)  # type: ignore[arg-type]

    patch_load_tensors(family.bank, stuck)
    t = threading.Thread(target=cache.load, args=(family.ids[1],))
    t.start()
    try:
        assert reading.wait(DEADLINE)
        with cache.lease(family.ids[0]) as m:  # would wait forever if it queued behind the load
            check_output(family, family.ids[0], m)
        assert cache.stats().loads_in_flight == 1 and not release.is_set()
    finally:
        release.set()
    join(t)
    assert {m.checkpoint for m in cache.models()} == {family.ids[0], family.ids[1]}


def test_concurrent_load_cap(family: Family) -> None:
    active = calls = peak = 0
    lock = threading.Lock()
    release = threading.Event()
    real = family.bank.load_tensors

    def held(ref: str, names: list[str], *, device: object = None) -> dict[str, torch.Tensor]:
        nonlocal active, calls, peak
        with lock:
            active += 1
            calls += 1
            first_two = calls <= 2
            peak = max(peak, active)
        if first_two:  # the first two loads stay in flight until every other one is queued
            assert release.wait(DEADLINE)
        try:
            return real(ref, names, device=device)  # type: ignore[arg-type]
        finally:
            with lock:
                active -= 1

    patch_load_tensors(family.bank, held)
    cache = cache_for(family, max_concurrent_loads=2)
    threads = [threading.Thread(target=cache.load, args=(cid,)) for cid in family.ids]
    for t in threads:
        t.start()
    try:
        wait_until("two loads reading", lambda: active == 2)
        wait_until("every load in flight", lambda: cache.stats().loads_in_flight == len(family.ids))
        assert active == 2, "the other loads wait for a load slot"
    finally:
        release.set()
    join(*threads)
    assert peak == 2 and cache.stats().resident["device"] == len(family.ids)


def test_pinned_checkpoint_is_never_evicted(family: Family) -> None:
    budget = family.full_bytes + family.head_bytes
    cache = cache_for(family, budget={"device": budget}, wait_timeout=0)
    cache.pin(family.ids[1])
    for cid in family.ids[2:]:
        cache.load(cid)
        assert family.ids[1] in {m.checkpoint for m in cache.models()}
    assert cache.unpin(family.ids[1]) and not cache.unpin(family.ids[1])
    cache.load(family.ids[0])
    cache.load(family.ids[2])
    assert family.ids[1] not in {m.checkpoint for m in cache.models()}


def test_pinning_beyond_the_budget_is_refused(family: Family) -> None:
    budget = family.full_bytes + family.head_bytes
    cache = cache_for(family, budget={"device": budget})
    cache.pin(family.ids[1])
    cache.pin(family.ids[2])  # shares its body with 1: both fit
    with pytest.raises(wb.BudgetExceeded) as err:
        cache.pin(family.ids[3])
    assert not err.value.transient
    assert cache.stats().pinned == 2
    assert cache.stats().tiers["device"].peak <= budget


def test_a_checkpoint_bigger_than_the_budget_is_refused(family: Family) -> None:
    cache = cache_for(family, budget={"device": family.full_bytes - 1})
    with pytest.raises(wb.BudgetExceeded) as err:
        cache.load(family.ids[0])
    assert not err.value.transient and isinstance(err.value, MemoryError)
    assert cache.stats().tiers["device"].used == 0 and cache.models() == []


def test_unload_while_leased_waits_for_the_lease(family: Family) -> None:
    cache = cache_for(family)
    with cache.lease(family.ids[1]) as m:
        assert cache.unload(family.ids[1])
        check_output(family, family.ids[1], m)
        assert cache.models()[0].leases == 1
    assert cache.models() == [] and cache.stats().tiers["device"].used == 0
    assert not cache.unload(family.ids[1])


def test_ttl_and_min_residency(family: Family, clock: FakeClock) -> None:
    cache = cache_for(family, ttl=60, min_residency=5, clock=clock, sweep_interval=0, wait_timeout=0)
    cache.load(family.ids[1])
    clock.advance(30)
    assert cache.sweep() == 0
    clock.advance(31)
    assert cache.sweep() == 1 and cache.models() == []
    assert cache.stats().evictions == {"ttl": 1}
    small = cache_for(
        family, budget={"device": family.full_bytes}, min_residency=5, clock=clock, wait_timeout=0
    )
    small.load(family.ids[1])
    with pytest.raises(wb.BudgetExceeded):
        small.load(family.ids[2])  # 1 is younger than min_residency
    clock.advance(5)
    small.load(family.ids[2])
    assert [m.checkpoint for m in small.models()] == [family.ids[2]]


def test_demotion_to_host_and_promotion_by_copy(family: Family) -> None:
    calls = counting(family.bank)
    budget = {"device": family.full_bytes, "host": family.full_bytes + family.head_bytes}
    cache = cache_for(family, budget=budget)
    cache.load(family.ids[1])
    cache.load(family.ids[2])  # 1 is demoted (its head goes to host, body shared... on the host too)
    tiers = {m.checkpoint: m.tier for m in cache.models()}
    assert tiers == {family.ids[1]: "host", family.ids[2]: "device"}
    n_reads = len(calls())
    with cache.lease(family.ids[1]) as m:
        check_output(family, family.ids[1], m)
    assert len(calls()) == n_reads  # promoted from the host: no bank read
    s = cache.stats()
    assert s.hits["host"] == 1 and s.bytes_loaded["host"] == family.head_bytes
    assert s.evictions.get("demote", 0) >= 1
    for tier, t in s.tiers.items():
        assert t.peak <= t.budget, tier


def test_prefetch_handle(family: Family) -> None:
    cache = cache_for(family)
    handle = cache.prefetch(family.ids[2])
    status = handle.wait(DEADLINE)
    assert handle.done() and handle.exception() is None
    assert status.checkpoint == family.ids[2] and status.tier == "device"
    bad = cache.prefetch("no-such-tag")
    with pytest.raises(wb.CheckpointNotFound):
        bad.wait(DEADLINE)
    assert isinstance(bad.exception(), wb.CheckpointNotFound)
    cache.close()


def test_a_checkpoint_that_does_not_fit_the_module_leaves_nothing_behind(family: Family) -> None:
    cache = ModelCache(family.bank, lambda info: torch.nn.Linear(3, 3))
    with pytest.raises(wb.IncompatibleState, match="does not fit"):
        cache.load(family.ids[0])
    s = cache.stats()
    assert s.tiers["device"].used == 0 and s.loads_in_flight == 0 and cache.models() == []


def test_a_failed_read_leaves_nothing_behind(family: Family) -> None:
    def broken(ref: str, names: list[str], *, device: object = None) -> dict[str, torch.Tensor]:
        raise wb.CorruptObject("packs/x", detail="injected")

    patch_load_tensors(family.bank, broken)
    cache = cache_for(family)
    with pytest.raises(wb.CorruptObject):
        cache.load(family.ids[0])
    assert cache.stats().tiers["device"].used == 0 and cache.models() == []


def _flip_middle_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_a_good_load_never_fails_with_a_corrupt_siblings_error(tmp_path: Path) -> None:
    """Nothing resident; a load of a corrupt checkpoint, then one of a good sibling sharing its body.

    The corrupt load reserves the shared body first and its read is held back until the good
    load waits on those slots; the corrupt read then fails. The good load must read the body
    itself and succeed; only the corrupt one fails, with its own error.
    """
    family = make_family(wb.open(tmp_path / "bank"))
    bad, good = family.ids[1], family.ids[2]
    [own_pack] = set(family.bank.show(bad).packs) - set(family.bank.show(family.ids[0]).packs)
    _flip_middle_byte(tmp_path / "bank" / own_pack)  # bad's head is damaged; the body is fine
    bad_reading, good_reading, release_bad = threading.Event(), threading.Event(), threading.Event()
    calls: list[tuple[str, tuple[str, ...]]] = []
    real = family.bank.load_tensors

    def gated(ref: str, names: list[str], *, device: object = None) -> dict[str, torch.Tensor]:
        calls.append((ref, tuple(names)))
        if ref == bad:
            bad_reading.set()
            assert release_bad.wait(DEADLINE)
        elif ref == good:
            good_reading.set()  # good holds the pending body slots and reads its own head now
        return real(ref, names, device=device)  # type: ignore[arg-type]

    patch_load_tensors(family.bank, gated)
    cache = cache_for(family)
    outcome: dict[str, BaseException | wb.ModelStatus] = {}

    def load(cid: str) -> None:
        try:
            outcome[cid] = cache.load(cid)
        except BaseException as e:
            outcome[cid] = e

    first = threading.Thread(target=load, args=(bad,))
    first.start()
    assert bad_reading.wait(DEADLINE)
    second = threading.Thread(target=load, args=(good,))
    second.start()
    assert good_reading.wait(DEADLINE)
    release_bad.set()
    join(first, second)
    assert isinstance(outcome[bad], wb.CorruptObject), outcome[bad]
    assert isinstance(outcome[good], wb.ModelStatus), outcome[good]
    with cache.lease(good) as model:
        check_output(family, good, model)
    body = tuple(n for n in family.states[good] if not n.startswith("head."))
    assert (good, body) in calls, "the good load reads the shared body itself once the corrupt one failed"
    s = cache.stats()
    assert [m.checkpoint for m in cache.models()] == [good]
    assert s.tiers["device"].used == family.full_bytes and s.loads_in_flight == 0
    assert cache._pools["device"].resident_bytes() == s.tiers["device"].used


def test_prefix_selects_the_model_in_a_training_checkpoint() -> None:
    bank = wb.open("memory://")
    lin = torch.nn.Linear(2, 2)
    state = {"model": lin.state_dict(), "optim": {"m": torch.zeros(4, 4)}}
    cid = bank.save(state).id
    cache = ModelCache(bank, lambda info: torch.nn.Linear(2, 2), prefix="model.")
    with cache.lease(cid) as m:
        assert isinstance(m, torch.nn.Linear) and torch.equal(m.weight, lin.weight)
    assert cache.stats().tiers["device"].used == 24


def test_unknown_ref_and_bad_device() -> None:
    bank = wb.open("memory://")
    cache = ModelCache(bank, lambda info: torch.nn.Linear(1, 1))
    with pytest.raises(wb.CheckpointNotFound):
        cache.load("nope")
    with pytest.raises(wb.DeviceError):
        ModelCache(bank, lambda info: torch.nn.Linear(1, 1), device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(wb.DeviceError):
            ModelCache(bank, lambda info: torch.nn.Linear(1, 1), device="cuda")


def test_listeners_see_every_event(family: Family) -> None:
    events: list[wb.CacheEvent] = []
    cache = cache_for(family, budget={"device": family.full_bytes})
    cache.subscribe(events.append)
    cache.load(family.ids[1])
    cache.load(family.ids[1])
    cache.load(family.ids[2])
    kinds = [e.kind for e in events]
    assert kinds.count("load") == 2 and kinds.count("hit") == 1 and "evict" in kinds
    evict = next(e for e in events if e.kind == "evict")
    assert evict.reason == "pressure" and evict.checkpoint == family.ids[1]
