"""``Bank.abandon_part``: a part that will never be committed stops holding ``gc`` back, and nothing else goes."""

from __future__ import annotations

from pathlib import Path

import torch

import weightbank as wb
from weightbank.bank.layout import LEASES


def leases(bank: wb.Bank) -> list[str]:
    return [info.key for info in bank.storage.list(LEASES)]


def test_an_abandoned_part_no_longer_blocks_gc(tmp_path: Path) -> None:
    bank = wb.open(tmp_path / "bank")
    # raw: step 2 must not be a delta on step 1's chunk, or deleting step 1 would free nothing
    bank.save({"w": torch.arange(5000.0)}, run="r", step=1, codec="raw")
    bank.save({"w": torch.arange(5000.0) + 1}, run="r", step=2, codec="raw")
    part = bank.save_part({"w": torch.arange(5000.0) + 2})  # a failed save: never committed
    bank.delete("r@1")
    # The review's repro: the live lease keeps everything deleted since it began, and the part's pack.
    held = bank.gc(grace=0, dry_run=True)
    assert held.bytes_freed == 0 and held.packs_kept_for_inflight == 1
    assert bank.abandon_part(part) is True
    assert leases(bank) == [] and not any(bank.storage.exists(k) for k in part.own_packs())
    report = bank.gc(grace=0)
    assert report.bytes_freed > 0 and len(report.packs_deleted) == 1 and report.packs_kept_for_inflight == 0
    assert torch.equal(bank.load("r@2")["w"], torch.arange(5000.0) + 1)
    assert bank.verify().ok


def test_abandoning_deletes_only_the_parts_own_packs(tmp_path: Path) -> None:
    bank = wb.open(tmp_path / "bank")
    kept = bank.save({"a": torch.ones(3000)}, run="r", step=1)
    part = bank.save_part({"a": torch.ones(3000), "b": torch.zeros(3000)})  # reuses a's chunk
    assert part.stats.reused_chunks == 1 and len(part.packs) == 2 and len(part.own_packs()) == 1
    assert bank.abandon_part(part.to_json()) is True  # its JSON form works too
    assert [bank.storage.exists(k) for k in part.packs] == [k not in part.own_packs() for k in part.packs]
    assert torch.equal(bank.load(kept.id)["a"], torch.ones(3000)) and bank.verify().ok


def test_a_committed_part_is_never_abandoned(tmp_path: Path) -> None:
    bank = wb.open(tmp_path / "bank")
    part = bank.save_part({"w": torch.arange(100.0)})
    info = bank.commit([part], run="r", step=1)
    assert bank.abandon_part(part) is False
    assert all(bank.storage.exists(k) for k in part.own_packs())
    assert torch.equal(bank.load(info.id)["w"], torch.arange(100.0)) and bank.verify().ok
    # Committed by another process whose manifest this one has not seen yet: the same.
    other = wb.open(tmp_path / "bank")
    late = other.save_part({"v": torch.ones(10)})
    wb.open(tmp_path / "bank").commit([late.to_json()], run="r", step=2)
    assert other.abandon_part(late) is False and bank.load("r@2")["v"].sum() == 10
