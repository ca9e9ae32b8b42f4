"""A DCP save that fails on one rank: nothing is committed, and the ranks that wrote a part give it up
at once (``Writer`` as a context manager, and the distributed CheckpointManager's save), so no lease
holds ``gc`` back and no pack of the failed save is left."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import weightbank as wb

from . import _workers as w
from .launch import expect_ok, run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.slow]


@pytest.mark.parametrize(
    ("victim", "via"),
    [(1, "dcp"), (0, "dcp"), (1, "manager")],
    ids=["follower-fails", "coordinator-fails", "manager-save"],
)
def test_a_failed_save_leaves_no_lease_and_no_pack(tmp_path: Path, victim: int, via: str) -> None:
    bank_dir = tmp_path / "bank"
    bank = wb.open(bank_dir)
    kept = bank.save({"w": torch.arange(5000.0)}, run="old", step=1)
    before = {info.key for info in bank.storage.list("packs/")}
    seen = expect_ok(run_ranks(w.save_with_a_bad_value, 2, tmp_path / "run", str(bank_dir), victim, via))
    assert all("cannot store" in s["error"] for s in seen), seen  # every rank failed, with the cause
    assert all(s["leases"] == [] for s in seen), seen
    assert [c.id for c in bank.log()] == [kept.id]
    # The survivor's part was written (the victim failed on a value it meets first) and then given up.
    assert {info.key for info in bank.storage.list("packs/")} == before
    bank.delete(kept.id)
    report = bank.gc(grace=0)  # nothing in flight holds the deleted checkpoint's data back
    assert report.packs_kept_for_inflight == 0 and set(report.packs_deleted) == before
