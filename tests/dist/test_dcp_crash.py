"""A rank SIGKILLed in the middle of a DCP save: no checkpoint appears, the others fail (never hang),
and gc frees every pack once the writers' leases are stale (their processes gone)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import weightbank as wb

from . import _workers as w
from .launch import run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.slow]


@pytest.mark.parametrize("victim", [1, 0], ids=["follower-dies", "coordinator-dies"])
def test_killed_rank_means_no_checkpoint(tmp_path: Path, victim: int) -> None:
    bank_dir = tmp_path / "bank"
    wb.open(bank_dir)
    mark = tmp_path / "mark"
    results = run_ranks(w.save_and_die, 2, tmp_path / "run", str(bank_dir), victim, str(mark), timeout=180)
    dead, alive = results[victim], results[1 - victim]
    assert dead.exitcode == -9, dead
    assert mark.read_text(), "the victim died before its part was written"
    # the survivor failed cleanly (an exception out of dcp.save, or the launcher's error path), in time
    assert alive.exitcode is not None, "a surviving rank hung"
    assert alive.value != "saved", alive

    bank = wb.open(bank_dir, create=False)
    assert bank.log() == [] and bank.tags() == []
    packs = list((bank_dir / "packs").rglob("*.pack"))
    leases = list((bank_dir / "leases").glob("*.json"))
    assert packs and leases, "the killed save should have left durable packs and its lease"
    victim_lease = json.loads((bank_dir / "leases" / f"{mark.read_text()}.json").read_text())
    assert victim_lease["pid"] > 0
    report = bank.gc(grace=0)
    assert len(report.packs_deleted) == len(packs) and report.bytes_freed > 0
    assert report.leases_dropped == len(leases)
    assert not list((bank_dir / "packs").rglob("*.pack")) and bank.verify().ok
