"""Live tags: warm first, then flip; a target that cannot load keeps the old one serving."""

from __future__ import annotations

import threading

import torch

import weightbank as wb
from weightbank.serving import LiveTags, ModelCache, ModelService, TensorHandler

from .family import Family, build


def test_flip_happens_only_after_the_target_is_resident(family: Family) -> None:
    cache = ModelCache(family.bank, build)
    warmed: list[str] = []
    live = LiveTags(family.bank, cache, poll=0, warmup=lambda m: warmed.append("x"))
    assert live.resolve("prod") == family.ids[0]
    family.bank.tag("prod", family.ids[2])
    assert live.resolve("prod") == family.ids[0]  # not yet polled
    assert live.refresh() == {"prod": family.ids[2]}
    assert live.resolve("prod") == family.ids[2] and warmed == ["x"]
    assert family.ids[2] in {m.checkpoint for m in cache.models()}
    family.bank.rollback("prod")
    assert live.refresh() == {"prod": family.ids[0]} and live.resolve("prod") == family.ids[0]
    family.bank.untag("prod")
    live.refresh()
    assert "prod" not in live.snapshot()


def test_a_target_that_cannot_load_keeps_the_old_one(family: Family) -> None:
    cache = ModelCache(family.bank, build)
    live = LiveTags(family.bank, cache, poll=0)
    bad = family.bank.save({"w": torch.ones(3)}, run="broken").id  # does not fit the module
    family.bank.tag("prod", bad)
    assert live.refresh() == {}
    assert live.resolve("prod") == family.ids[0]
    assert "IncompatibleState" in live.errors["prod"]
    family.bank.tag("prod", family.ids[1])
    assert live.refresh() == {"prod": family.ids[1]} and "prod" not in live.errors


def test_background_poll_flips(family: Family) -> None:
    cache = ModelCache(family.bank, build)
    live = LiveTags(family.bank, cache, poll=0.05)
    try:
        family.bank.tag("prod", family.ids[3])
        for _ in range(100):
            if live.resolve("prod") == family.ids[3]:
                break
            threading.Event().wait(0.02)
        assert live.resolve("prod") == family.ids[3]
    finally:
        live.close()


def test_flip_under_concurrent_requests_never_gives_a_wrong_reply(family: Family) -> None:
    handler = TensorHandler(build, input_shape=(None, 32))
    svc = ModelService(
        family.bank, handler, poll=0, budget={"device": family.full_bytes + 2 * family.head_bytes}
    )
    expected = {cid: family.expected(cid) for cid in family.ids}
    stop = threading.Event()
    replies: list[tuple[str, list[list[float]]]] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def client() -> None:
        while not stop.is_set():
            try:
                p = svc.predict(family.x.tolist(), ref="prod")
            except BaseException as e:  # pragma: no cover - asserted empty below
                errors.append(e)
                return
            with lock:
                replies.append((p.checkpoint, p.output))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    for target in [*family.ids[1:], family.ids[0]]:
        svc.set_tag("prod", target)
        threading.Event().wait(0.05)
    svc.rollback_tag("prod")
    threading.Event().wait(0.05)
    stop.set()
    for t in threads:
        t.join(10)
    svc.close()
    assert not errors
    served = {cid for cid, _ in replies}
    assert len(served) >= 3
    for cid, out in replies:
        assert torch.equal(torch.tensor(out), expected[cid]), cid[:12]
    assert svc.served_tags().get("prod") == family.bank.resolve("prod")
    assert isinstance(svc.cache.stats(), wb.CacheStats)
