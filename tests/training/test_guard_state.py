"""The guard checks the state it is about to keep (issue 11, item 9): a NaN written into a parameter or a
BatchNorm buffer at a save step is never saved nor kept as the last good state, and the rollback goes past it
to the newest good checkpoint — from memory, or from the bank, passing over non-finite checkpoints."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import weightbank as wb
from weightbank.training.guard import nonfinite

SAVE_EVERY = 3


def _setup() -> tuple[nn.Sequential, wb.TrainingState]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 1))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    return model, wb.TrainingState(model=model, optimizer=opt, rng=False)


def _train_step(model: nn.Module, state: wb.TrainingState) -> float:
    opt = state.objects("optimizer")[""]
    loss = model(torch.randn(6, 4)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return float(loss.detach())


def _poison(model: nn.Sequential, where: str) -> None:
    with torch.no_grad():
        if where == "buffer":
            model.get_buffer("1.running_var")[0] = (
                math.nan
            )  # train-mode losses stay finite: only the state shows it
        else:
            model.get_parameter("2.weight")[0, 0] = math.inf


def _finite(model: nn.Module) -> bool:
    return not nonfinite(model.state_dict())


@pytest.mark.parametrize("where", ["buffer", "param"])
def test_a_non_finite_state_is_never_saved_and_is_rolled_back(bank: wb.Bank, where: str) -> None:
    model, state = _setup()
    mgr = wb.CheckpointManager(bank, run="r", save=wb.Every(steps=SAVE_EVERY), guard=wb.Guard(), signals=())
    refused = None
    outcomes = []
    step = mgr.restore(state)
    while step < 9:
        loss = _train_step(model, state)
        if step == 5 and refused is None:  # the step whose state is saved at 6 steps done (once)
            _poison(model, where)
            loss = 0.5  # the loss of that step was fine
        out = mgr.step(step, state, {"loss": loss})
        outcomes.append(out)
        if out.saved is not None and out.saved.step == 6 and refused is None:
            refused = out.saved.exception()  # waits for the background check: no race with the next step
        step = out.next_step
    mgr.close()
    assert isinstance(refused, wb.TrainingDiverged) and "not finite" in str(refused)
    (rb,) = [o.rollback for o in outcomes if o.rollback is not None]
    assert rb.restored_step == 3 and rb.source == "memory" and "model state is not finite" in rb.reason
    assert ("running_var" if where == "buffer" else "2.weight") in rb.reason
    assert _finite(model)
    for info in bank.log("r"):
        assert not nonfinite(bank.load(info.id)["model"]), f"checkpoint at step {info.step} is not finite"
    assert [e.kind for e in bank.events("r")] == ["rollback"]


def test_a_rollback_from_the_bank_passes_over_non_finite_checkpoints(bank: wb.Bank) -> None:
    model, state = _setup()
    # An unguarded process saved a good state at 3 and a NaN one at 6.
    with wb.CheckpointManager(bank, run="r", save=wb.Every(steps=SAVE_EVERY), signals=()) as mgr:
        for step in range(6):
            loss = _train_step(model, state)
            if step == 5:
                _poison(model, "buffer")
            mgr.step(step, state, {"loss": loss})
    assert nonfinite(bank.load("r@6")["model"]) == ["1.running_var"]
    good = bank.resolve("r@3")
    model2, state2 = _setup()
    mgr2 = wb.CheckpointManager(bank, run="r", save=wb.Every(steps=SAVE_EVERY), guard=wb.Guard(), signals=())
    with pytest.warns(wb.DataPositionWarning):
        step = mgr2.restore(state2)  # the newest checkpoint, NaN buffer and all
    assert step == 6
    out = mgr2.step(step, state2, {"loss": math.nan})
    mgr2.close()
    assert out.rollback is not None and out.rollback.source == "bank"
    assert out.rollback.restored == good and out.rollback.restored_step == 3
    assert _finite(model2)


def test_without_finite_state_the_guard_keeps_what_it_is_given(bank: wb.Bank) -> None:
    model, state = _setup()
    guard = wb.Guard(finite_state=False)
    with wb.CheckpointManager(bank, run="r", save=wb.Every(steps=1), guard=guard, signals=()) as mgr:
        _train_step(model, state)
        _poison(model, "buffer")
        out = mgr.step(0, state, {"loss": 1.0})
        assert out.saved is not None and out.saved.exception() is None
    assert nonfinite(bank.load("r@1")["model"]) == ["1.running_var"]


def test_close_reports_a_final_state_that_was_refused(bank: wb.Bank) -> None:
    model, state = _setup()
    mgr = wb.CheckpointManager(bank, run="r", save=wb.Every(steps=1), guard=wb.Guard(), signals=())
    mgr.step(0, state, {"loss": _train_step(model, state)})
    _poison(model, "param")
    mgr.step(1, state, {"loss": 1.0})
    with pytest.raises(wb.TrainingDiverged, match="not finite"):
        mgr.close()
    assert [c.step for c in bank.log("r")] == [1]


def test_nonfinite_names_every_bad_tensor_and_skips_integers() -> None:
    tree = {
        "a": torch.tensor([1.0, math.nan]),
        "b": [torch.tensor([math.inf], dtype=torch.bfloat16)],
        "n": torch.tensor([3]),
        "c": torch.tensor([complex(0, math.inf)]),
    }
    assert nonfinite(tree) == ["a", "b.0", "c"]
    assert (
        wb.Guard().state_problem({"model": tree}).startswith("model state is not finite (model.a, model.b.0")
    )
