"""Live tags: warm first, then flip; a target that cannot load keeps the old one serving."""

from __future__ import annotations

import functools
import logging
import pathlib
import threading
import time
from collections.abc import Callable

import pytest
import torch

import weightbank as wb
from weightbank.serving import LiveTags, ModelCache, ModelService, TensorHandler

from .family import Family, build, make_family

DEADLINE = 60.0  # seconds; only ever reached when something is broken


def wait_until(what: str, pred: Callable[[], bool], cond: threading.Condition | None = None) -> None:
    """Wait for a condition, never for an amount of time; fail only past a generous deadline."""
    deadline = time.monotonic() + DEADLINE
    while not pred():
        left = deadline - time.monotonic()
        assert left > 0, f"timed out waiting for {what}"
        if cond is None:
            time.sleep(0.005)
        else:
            with cond:
                cond.wait(min(left, 0.5))


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
        wait_until("the poll to flip prod", lambda: live.resolve("prod") == family.ids[3])
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
    cond = threading.Condition()
    errors: list[BaseException] = []

    def client() -> None:
        while not stop.is_set():
            try:
                p = svc.predict(family.x.tolist(), ref="prod")
            except BaseException as e:  # pragma: no cover - asserted empty below
                errors.append(e)
                return
            with cond:
                replies.append((p.checkpoint, p.output))
                cond.notify_all()

    def replies_from(cid: str, since: int) -> int:
        with cond:
            return sum(1 for c, _ in replies[since:] if c == cid) if not errors else 1 << 30

    def enough(cid: str, since: int) -> bool:
        return replies_from(cid, since) >= 3

    threads = [threading.Thread(target=client) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        # after each move, wait for a few replies from the new target: a count, not a time
        for target in [*family.ids[1:], family.ids[0]]:
            since = len(replies)
            svc.set_tag("prod", target)
            wait_until(f"replies from {target[:12]}", functools.partial(enough, target, since), cond)
        since = len(replies)
        event = svc.rollback_tag("prod")
        wait_until("replies after the rollback", lambda: replies_from(str(event.new), since) >= 3, cond)
    finally:
        stop.set()
        for t in threads:
            t.join(DEADLINE)
    assert not any(t.is_alive() for t in threads)
    svc.close()
    assert not errors
    served = {cid for cid, _ in replies}
    assert served == set(family.ids)
    for cid, out in replies:
        assert torch.equal(torch.tensor(out), expected[cid]), cid[:12]
    assert svc.served_tags().get("prod") == family.bank.resolve("prod")
    assert isinstance(svc.cache.stats(), wb.CacheStats)


def _flip_a_byte(path: pathlib.Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_damaged_tag_record_keeps_its_last_good_target_and_is_reported(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    family = make_family(wb.open(str(tmp_path)), n_variants=1)
    handler = TensorHandler(build, input_shape=(None, 32))
    svc = ModelService(family.bank, handler, poll=0.02)
    try:
        assert svc.predict(family.x.tolist(), ref="prod").checkpoint == family.ids[0]
        with caplog.at_level(logging.WARNING, logger="weightbank.serving"):
            _flip_a_byte(tmp_path / "refs" / "tags" / "prod.json")
            assert family.bank.tags()[0].problem  # the bank sees the damage
            wait_until("the watcher to report prod", lambda: "prod" in svc.live.errors)
        assert "CorruptObject" in svc.live.errors["prod"] and family.ids[0] in svc.live.errors["prod"]
        assert svc.served_tags() == {"prod": family.ids[0]}
        p = svc.predict(family.x.tolist(), ref="prod")
        assert p.checkpoint == family.ids[0]
        assert torch.equal(torch.tensor(p.output), family.expected(p.checkpoint))
        assert [r.getMessage() for r in caplog.records if r.name == "weightbank.serving"] == [
            f"tag 'prod': {svc.live.errors['prod']}"
        ]  # logged once, not at every poll
        # repaired (a move rewrites the record): the error goes and the tag follows again
        (tmp_path / "refs" / "tags" / "prod.json").unlink()
        family.bank.tag("prod", family.ids[1])
        wait_until("prod to flip after the repair", lambda: svc.live.resolve("prod") == family.ids[1])
        wait_until("the error to clear", lambda: "prod" not in svc.live.errors)
    finally:
        svc.close()


def test_a_tag_damaged_at_start_up_is_not_served_but_reported(tmp_path: pathlib.Path) -> None:
    family = make_family(wb.open(str(tmp_path)), n_variants=1)
    family.bank.tag("canary", family.ids[1])
    _flip_a_byte(tmp_path / "refs" / "tags" / "prod.json")
    live = LiveTags(family.bank, ModelCache(family.bank, build), poll=0)
    assert live.snapshot() == {"canary": family.ids[1]}
    assert "CorruptObject" in live.errors["prod"] and "not served" in live.errors["prod"]
    with pytest.raises(wb.CorruptObject):
        live.resolve("prod")
    assert live.refresh() == {} and "prod" in live.errors and "prod" not in live.snapshot()


def test_a_move_undone_before_the_poll_clears_its_warm_error(family: Family) -> None:
    live = LiveTags(family.bank, ModelCache(family.bank, build), poll=0)
    bad = family.bank.save({"w": torch.ones(3)}, run="broken").id
    family.bank.tag("prod", bad)
    assert live.refresh() == {} and "prod" in live.errors
    family.bank.tag("prod", family.ids[0])  # back where it is served from
    assert live.refresh() == {} and "prod" not in live.errors
