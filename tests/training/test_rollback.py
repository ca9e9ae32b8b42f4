"""Automatic rollback: a NaN and a loss spike are rolled back, the bad batches skipped, events recorded."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import weightbank as wb
from tests.training.common import build, train

NAN_AT, SPIKE_AT = 10, 21


def _run(bank: wb.Bank, guard: wb.Guard, total: int = 32, nan_at: int = NAN_AT, spike_at: int = SPIKE_AT):
    model, state, loader = build()
    seen: list[tuple[int, int]] = []  # (step index, global batch number)
    mgr = wb.CheckpointManager(bank, run="r", save=wb.Every(steps=4), guard=guard, signals=())

    def on_step(step: int, batch: int, idx: list[int], out: wb.StepOutcome) -> None:
        seen.append((step, batch))

    done = train(mgr, state, model, loader, total, nan_at=nan_at, spike_at=spike_at, on_step=on_step)
    mgr.close()
    return model, mgr, seen, done, state


@pytest.mark.parametrize("where", ["memory", "bank"])
def test_nan_and_spike_are_rolled_back(tmp_path: Path, where: str) -> None:
    bank = wb.open(tmp_path / "bank")
    guard = wb.Guard(spike=20.0, window=20, min_history=5, lr_scale=0.5)
    seen0: list[tuple[int, int]] = []
    if where == "bank":
        # A fresh process (resumed at 8 steps) holds no in-memory snapshot: the rollback reads the bank.
        _, _, seen0, done, _ = _run(bank, guard, total=8)
        assert done == 8
        guard = wb.Guard(spike=20.0, window=20, min_history=5, lr_scale=0.5)
    model, mgr, seen, done, state = _run(bank, guard)
    seen = seen0 + seen
    assert done == 32
    assert all(torch.isfinite(p).all() for p in model.parameters())
    rb1, rb2 = mgr.rollbacks
    assert rb1.source == where and rb2.source == "memory"
    # NaN in batch 10 (step index 10, 11 steps done); last checkpoint at 8 steps.
    assert (rb1.step, rb1.restored_step, rb1.skipped_steps) == (11, 8, 3)
    assert rb1.reason == "loss is nan"
    assert rb1.data_from["index"] == 8 and rb1.data_to["index"] == 11
    # Batches 8, 9, 10 were trained on, thrown away with the state, and never seen again.
    batches = [b for _, b in seen]
    assert batches[:11] == list(range(11))
    after = batches[11:]
    assert after[0] == 11 and not {8, 9, 10} & set(after)
    # The spike: batch 21 was consumed at step index 21 - 3 = 18 (19 done); restored to 16.
    assert rb2.reason.startswith("loss ") and ">" in rb2.reason
    assert (rb2.step, rb2.restored_step) == (19, 16)
    assert batches.count(21) == 1 and 22 in batches
    # Learning rate halved twice (and StepLR still applies its own decay).
    opt = state.objects("optimizer")[""]
    sched = state.objects("scheduler")[""]
    assert sched.base_lrs == [pytest.approx(1e-2 * 0.25)]
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 * 0.25 * 0.9 ** (32 // 5))
    # Both events are in the run's log, with the restored checkpoints.
    events = bank.events("r")
    assert [e.kind for e in events] == ["rollback", "rollback"]
    assert [e.step for e in events] == [11, 19]
    assert events[0].checkpoint == rb1.restored and bank.show(rb1.restored).info.step == 8
    assert events[0].data["skipped_steps"] == 3 and events[0].data["reason"] == "loss is nan"
    # The rolled-back state was saved at once (so a crash resumes from it), linked to what it restored.
    post = [c for c in bank.log("r") if c.message.startswith("rollback")]
    assert len(post) == 2 and {c.parent for c in post} == {rb1.restored, rb2.restored}


def test_too_many_rollbacks_raise_training_diverged(tmp_path: Path) -> None:
    bank = wb.open(tmp_path / "bank")
    _model, state, _loader = build()
    mgr = wb.CheckpointManager(
        bank, run="r", save=wb.Every(steps=2), guard=wb.Guard(max_rollbacks=2, within=100), signals=()
    )
    step = mgr.restore(state)
    rollbacks = 0
    with pytest.raises(wb.TrainingDiverged) as exc:
        while step < 50:
            nan = step >= 3
            out = mgr.step(step, state, {"loss": float("nan") if nan else 1.0})
            rollbacks += out.rollback is not None
            step = out.next_step
    mgr.close()
    assert rollbacks == 2 and exc.value.reason == "loss is nan" and len(exc.value.rollbacks) == 2
    assert isinstance(exc.value, RuntimeError) and "rollback" in str(exc.value)


def test_divergence_before_any_checkpoint_is_an_error(tmp_path: Path) -> None:
    bank = wb.open(tmp_path / "bank")
    _model, state, _loader = build()
    mgr = wb.CheckpointManager(bank, run="r", save=wb.Every(steps=100), guard=wb.Guard(), signals=())
    with pytest.raises(wb.TrainingDiverged, match="no checkpoint to roll back to"):
        mgr.step(0, state, {"loss": float("inf")})
    mgr.close()


def test_guard_watches_grad_norm_and_ignores_missing_metrics() -> None:
    g = wb.Guard(spike=3.0, min_history=2, window=4)
    assert g.check({"accuracy": 0.5}) is None
    assert g.check({"loss": 1.0, "grad_norm": 1.0}) is None
    assert g.check({"loss": 1.0, "grad_norm": 1.2}) is None
    assert g.check({"loss": 1.0, "grad_norm": 50.0}) == "grad_norm 50 > 3×median 1.1"
    assert list(g.history["loss"]) == [1.0, 1.0]  # the bad step's values never join the window
    assert wb.Guard(nan=False).check({"loss": float("nan")}) is None


def test_after_a_rollback_run_at_step_is_the_original(tmp_path: Path) -> None:
    """Issue 11, item 11: the rollback re-saves the restored state at its step; `r@8` stays the original."""
    bank = wb.open(tmp_path / "bank")
    _model, mgr, _seen, _done, _state = _run(bank, wb.Guard(), total=14, spike_at=-1)
    (rb,) = mgr.rollbacks
    assert rb.restored_step == 8
    at_8 = [c for c in bank.log("r") if c.step == 8]
    assert len(at_8) == 2, "the original and the rollback's copy"
    original = bank.resolve("r@8")
    assert original == rb.restored and "loss" in bank.show(original).info.metrics
    copy = next(c for c in at_8 if c.id != original)
    assert copy.meta["resave_of"] == original and copy.parent == original and copy.metrics == {}
