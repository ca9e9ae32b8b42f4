"""Budgets and the tensor pool's accounting."""

from __future__ import annotations

import pytest
import torch

import weightbank as wb
from weightbank.serving.budget import TierLedger, format_bytes, parse_budget, parse_bytes
from weightbank.serving.pool import TensorPool


@pytest.mark.parametrize(
    ("text", "n"),
    [("20GiB", 20 << 30), ("512MB", 512_000_000), ("1.5KiB", 1536), ("7", 7), (7, 7), (" 3 mib ", 3 << 20)],
)
def test_parse_bytes(text: str | int, n: int) -> None:
    assert parse_bytes(text) == n


@pytest.mark.parametrize("text", ["", "GiB", "-1", "1 parsec", "1e9", True, -5])
def test_parse_bytes_refuses(text: str | int) -> None:
    with pytest.raises(wb.InvalidName):
        parse_bytes(text)


def test_parse_budget() -> None:
    assert parse_budget("device=20GiB,host=64GiB") == {"device": 20 << 30, "host": 64 << 30}
    assert parse_budget({"cuda": "1KiB", "cpu": 5}) == {"device": 1024, "host": 5}
    assert parse_budget("8MiB") == {"device": 8 << 20, "host": 0}
    assert parse_budget(None) == {"device": 0, "host": 0}
    assert parse_budget("device=1KiB,disk=2GiB") == {"device": 1024, "host": 0, "disk": 2 << 30}
    with pytest.raises(wb.InvalidName, match="tier"):
        parse_budget("tape=1GiB")
    assert format_bytes(512) == "512 B" and format_bytes(3 << 30) == "3.0 GiB"


def test_ledger_refuses_instead_of_exceeding() -> None:
    led = TierLedger("device", 100)
    led.reserve(60)
    with pytest.raises(wb.BudgetExceeded) as err:
        led.reserve(41, ref="a" * 64)
    assert (err.value.needed, err.value.used, err.value.budget) == (41, 60, 100)
    assert led.used == 60 and led.peak == 60
    led.release(60)
    assert led.free == 100


def test_pool_counts_shared_tensors_once() -> None:
    pool = TensorPool(TierLedger("device", 100))
    pool.reserve("k1", 40, "a")
    pool.fill("k1", torch.zeros(10))
    pool.hold("k1", "b")
    pool.reserve("k2", 40, "b")
    assert pool.ledger.used == 80 and pool.resident_bytes() == 80
    assert pool.freed_if_dropped([("a", ["k1"])]) == 0
    assert pool.freed_if_dropped([("a", ["k1"]), ("b", ["k1", "k2"])]) == 80
    assert pool.drop("k1", "a") == 0 and pool.drop("k1", "b") == 40
    assert pool.drop("k1", "b") == 0  # idempotent
    pool.fail("k2", ValueError("x"), "b")
    assert pool.ledger.used == 0 and len(pool) == 0
    with pytest.raises(wb.BudgetExceeded):
        pool.reserve("k3", 101, "c")
    assert "k3" not in pool


def test_a_failed_loader_hands_its_slot_to_the_other_holders() -> None:
    pool = TensorPool(TierLedger("device", 100))
    slot = pool.reserve("k", 40, "a")
    pool.hold("k", "b")
    first = slot.ready
    assert not pool.adopt("k", "b")  # "a" is still loading it
    pool.fail("k", ValueError("a's own damage"), "c")  # not its loader: nothing happens
    assert slot.loader == "a" and not first.is_set()
    pool.fail("k", ValueError("a's own damage"), "a")
    assert first.is_set() and slot.loader is None and "k" in pool and pool.ledger.used == 40
    assert not pool.adopt("k", "c")  # only a holder adopts
    assert pool.adopt("k", "b") and slot.loader == "b" and not slot.ready.is_set()
    assert not pool.adopt("k", "b")
    pool.drop("k", "a")
    pool.fill("k", torch.zeros(10))
    assert slot.ready.is_set() and pool.tensor("k").numel() == 10 and pool.ledger.used == 40
