"""The CheckpointManager in a torch.distributed job (FSDP2 and a replicated module, CPU/gloo):
a run killed on one rank resumes bit-exact; a checkpoint restores at another world size."""

from __future__ import annotations

from pathlib import Path

import pytest

import weightbank as wb

from . import _workers as w
from .launch import expect_ok, run_ranks

pytestmark = [pytest.mark.dist, pytest.mark.slow]

TOTAL = 12


def test_fsdp2_run_killed_on_one_rank_resumes_bit_exact(tmp_path: Path) -> None:
    ref_bank, bank = tmp_path / "ref", tmp_path / "bank"
    wb.open(ref_bank)
    wb.open(bank)
    reference = expect_ok(run_ranks(w.train, 2, tmp_path / "a", str(ref_bank), TOTAL, None, True))
    killed = run_ranks(w.train, 2, tmp_path / "b", str(bank), TOTAL, 7, True, timeout=180)
    assert killed[1].exitcode == -9 and killed[0].exitcode is not None, killed  # rank 0 failed, did not hang
    infos = wb.open(bank, create=False).log("dist")
    assert infos and all(i.step in (3, 6) for i in infos)  # checkpoints of the steps before the kill only
    resumed = expect_ok(run_ranks(w.train, 2, tmp_path / "c", str(bank), TOTAL, None, True))
    assert {r["started"] for r in resumed} == {max(i.step or 0 for i in infos)}
    for ref, got in zip(reference, resumed, strict=True):
        ref = {k: v for k, v in ref.items() if k not in ("started", "notes", "saved", "rollbacks")}
        assert {k: got[k] for k in ref} == ref
    # every checkpoint is one sharded commit with both ranks' state; the run's own were pruned to 2
    done = wb.open(bank, create=False)
    assert [i.step for i in done.log("dist")] == [12, 9]
    latest = done.load("dist@latest")
    assert set(latest["ranks"]) == {"0", "1"} and latest["manager"]["step"] == 12
    assert latest["model"]["0.weight"].shape == (16, 8)  # whole, assembled from both ranks' shards
    assert done.verify().ok


def test_replicated_module_restores_on_another_world_size(tmp_path: Path) -> None:
    bank = tmp_path / "bank"
    wb.open(bank)
    first = expect_ok(run_ranks(w.train, 2, tmp_path / "a", str(bank), 6, None, False, True))
    assert first[0]["saved"] == first[1]["saved"]  # rank 0 decided for both, on its own loss
    saved = wb.open(bank, create=False)
    info = saved.show("dist@latest")
    assert info.info.step == 6 and info.info.meta["dcp"]["world_size"] == 2
    (one,) = expect_ok(run_ranks(w.train, 1, tmp_path / "b", str(bank), 9, None, False))
    assert one["started"] == 6
    assert any("ranks 1..1" in n for n in one["notes"]), one["notes"]
    # world 1 → 2 again: rank 1 has no own state in the world-1 checkpoint and says so
    two = expect_ok(run_ranks(w.train, 2, tmp_path / "c", str(bank), 12, None, False))
    assert all(r["started"] == 9 for r in two)
    assert any("holds no state of this rank" in n for n in two[1]["notes"]), two[1]["notes"]
    assert two[1]["data"]["epoch"] == two[0]["data"]["epoch"]


def test_a_distributed_checkpoint_restores_in_a_plain_process(tmp_path: Path) -> None:
    """No process group at all: the manager reads the sharded checkpoint as the only rank."""
    import torch

    bank = tmp_path / "bank"
    wb.open(bank)
    expect_ok(run_ranks(w.train, 2, tmp_path / "a", str(bank), 3, None, True))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    loader = wb.ResumableLoader(list(range(40)), batch_size=4, shuffle=True, seed=7)
    state = wb.TrainingState(model=model, optimizer=opt, data=loader)
    saved = wb.open(bank, create=False)
    with (
        pytest.warns(UserWarning, match="per-rank state"),
        wb.CheckpointManager(saved, run="dist", signals=()) as mgr,
    ):
        assert mgr.restore(state) == 3
    whole = saved.load("dist@latest")
    for name, p in model.state_dict().items():
        assert torch.equal(p, whole["model"][name]), name
    assert opt.state_dict()["state"][0]["exp_avg"].shape == (16, 8)
    assert loader.state_dict()["index"] == 3 * 2  # rank 0's 3 batches of a 2-rank job = 6 of one rank


def test_rank0s_guard_rolls_every_rank_back(tmp_path: Path) -> None:
    bank = tmp_path / "bank"
    wb.open(bank)
    ranks = expect_ok(run_ranks(w.train, 2, tmp_path / "a", str(bank), 9, None, True, False, 7))
    assert [r["rollbacks"] for r in ranks] == [[[8, 6]], [[8, 6]]]  # decided on rank 0 (rank 1 saw no NaN)
    assert ranks[0]["saved"] == ranks[1]["saved"]
    events = wb.open(bank, create=False).events("dist")
    assert [e.kind for e in events] == ["rollback"]  # recorded once, by rank 0
