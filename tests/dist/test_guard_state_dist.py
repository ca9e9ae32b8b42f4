"""The guard's check of the staged state in a distributed job (issue 11, item 9): one rank's NaN shard makes
every rank refuse that save together, and every rank rolls back past it to the newest good checkpoint."""

from __future__ import annotations

from pathlib import Path

import pytest

import weightbank as wb

from . import _workers as w
from .launch import expect_ok, run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.slow]


def test_a_nan_shard_on_one_rank_is_refused_by_every_rank(tmp_path: Path) -> None:
    bank = tmp_path / "bank"
    wb.open(bank)
    ranks = expect_ok(run_ranks(w.poisoned, 2, tmp_path / "run", str(bank)))
    assert all("TrainingDiverged" in r["refused"] and "not finite" in r["refused"] for r in ranks), ranks
    assert "another rank" in ranks[0]["refused"] and "model.0.weight" in ranks[1]["refused"]
    assert [r["rollbacks"] for r in ranks] == [[[5, 2, "bank"]], [[5, 2, "bank"]]]
    assert all(r["finite"] for r in ranks)
    done = wb.open(bank, create=False)
    assert [e.kind for e in done.events("dist")] == ["rollback"]
    for info in done.log("dist"):
        model = done.load(info.id, select="model.*")["model"]
        assert all(bool(t.isfinite().all()) for t in model.values()), info.step
