"""DCP with weightbank as storage across world sizes 1, 2 and 4 (CPU, gloo): save with N, load with M, bit-exact.

Four launches share one bank: world 4 saves; world 2 loads it (4→2) and
saves; world 1 loads both (4→1, 2→1) and saves; world 4 loads the others
(2→4, 1→4) and re-saves its unchanged state. Every load reshards into other
placements than the save used. The test process itself then reads the
sharded checkpoints without torch.distributed.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

import weightbank as wb

from . import _workers as w
from .launch import expect_ok, run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.slow]

FULL_BYTES = sum(t.numel() * t.element_size() for t in w.full_tensors().values())


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("dist")
    bank_dir = str(root / "bank")
    wb.open(bank_dir)
    out: dict[str, Any] = {"bank": bank_dir}
    out["save4"] = expect_ok(run_ranks(w.save, 4, root / "a", bank_dir, "w4", 1, "raw"))
    out["load2"] = expect_ok(run_ranks(w.load, 2, root / "b", bank_dir, ["w4@1"]))
    out["save2"] = expect_ok(run_ranks(w.save, 2, root / "c", bank_dir, "w2", 1, "auto"))
    out["load1"] = expect_ok(run_ranks(w.load, 1, root / "d", bank_dir, ["w4@1", "w2@1"]))
    out["save1"] = expect_ok(run_ranks(w.save, 1, root / "e", bank_dir, "w1", 1, "raw"))
    out["load4"] = expect_ok(run_ranks(w.load, 4, root / "f", bank_dir, ["w2@1", "w1@1"]))
    out["resave4"] = expect_ok(run_ranks(w.save, 4, root / "g", bank_dir, "w4", 2, "raw"))
    return out


@pytest.mark.parametrize(
    ("launch", "ref"),
    [("load2", "w4@1"), ("load1", "w4@1"), ("load1", "w2@1"), ("load4", "w2@1"), ("load4", "w1@1")],
    ids=["4to2", "4to1", "2to1", "2to4", "1to4"],
)
def test_reshard_load_is_bit_exact(runs: dict[str, Any], launch: str, ref: str) -> None:
    per_rank = runs[launch]
    assert all(r[ref] == [] for r in per_rank), per_rank


def test_every_rank_learns_the_one_committed_id(runs: dict[str, Any]) -> None:
    for launch in ("save4", "save2", "save1", "resave4"):
        ids = {r["id"] for r in runs[launch]}
        committed = [r["committed"] for r in runs[launch] if r["committed"]]
        assert len(ids) == 1 and committed == [next(iter(ids))], runs[launch]


def test_replicated_tensors_are_written_once(runs: dict[str, Any]) -> None:
    written = [r["written"] for r in runs["save4"]]
    # Every byte of every tensor exactly once: the replicated DTensor, the plain tensor and the
    # 0-d step went to one rank each, and the shards of the others add up to the whole.
    assert sum(written) == FULL_BYTES, written
    assert sum(1 for x in written if x > 0) == 4


def test_unchanged_resave_writes_nothing(runs: dict[str, Any]) -> None:
    written = [r["written"] for r in runs["resave4"]]
    reused = [r["reused"] for r in runs["resave4"]]
    assert sum(written) == 0 and sum(reused) == FULL_BYTES, (written, reused)
    bank = wb.open(runs["bank"], create=False)
    info = bank.show("w4@2").info
    assert info.parent == bank.resolve("w4@1")
    # the commit's own stats (the sum over every rank's part), as the coordinator's Writer reported them
    assert [r["committed_written"] for r in runs["resave4"] if r["committed"]] == [0], runs["resave4"]


def test_bank_load_assembles_sharded_tensors_without_torch_distributed(runs: dict[str, Any]) -> None:
    bank = wb.open(runs["bank"], create=False)
    for ref in ("w4@1", "w2@1", "w1@1"):
        state = bank.load(ref)
        flat = w._flat(state)
        for fqn, want in w.full_tensors().items():
            assert torch.equal(flat[fqn].reshape(-1).view(torch.uint8), want.reshape(-1).view(torch.uint8)), (
                ref,
                fqn,
            )
        assert state["optim"]["param_groups"] == w.values()["param_groups"]
        assert state["step"] == 7 and math.isnan(state["nan"])
    # names are DCP's fqns; a partial load and load_tensors see whole tensors too
    rows = bank.load_tensors("w4@1", ["model.rows"])["model.rows"]
    assert torch.equal(rows, w.full_tensors()["model.rows"])
    sel = bank.load("w4@1", select="model.c*")
    assert set(sel["model"]) == {"cols"}


def test_bank_tools_work_on_sharded_checkpoints(runs: dict[str, Any]) -> None:
    bank = wb.open(runs["bank"], create=False)
    detail = bank.show("w4@1")
    assert detail.info.meta["dcp"]["world_size"] == 4
    assert {t.name for t in detail.tensors} == set(w.full_tensors())
    # the same values saved at world sizes 4 and 1 are "same" for diff, whatever the layout
    d = bank.diff("w4@1", "w1@1")
    assert {t.status for t in d.tensors} == {"same"} and d.differing_bytes == 0
    assert bank.verify().ok
    assert bank.tags() and bank.resolve("w4-tag") == bank.resolve("w4@2")
    assert bank.rollback("w4-tag").new == bank.resolve("w4@1")
    du = bank.du()
    assert du.orphan_bytes == 0
    report = bank.gc(grace=0)
    assert report.packs_deleted == () and report.leases_dropped == 0
    assert not list(Path(runs["bank"], "leases").glob("*.json"))


def test_stock_default_load_planner_needs_no_pickle(runs: dict[str, Any], tmp_path: Path) -> None:
    (bad,) = expect_ok(run_ranks(w.load_default_planner, 1, tmp_path, runs["bank"], "w2@1"))
    assert bad == []
