"""``Guard(lr_scale=...)`` really scales the learning rate with every scheduler torch ships (issue 11, item 10):
every later rate is the factor times the unscaled run's; a scheduler it cannot scale is refused up front."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.optim import lr_scheduler as lrs

import weightbank as wb

Factory = Callable[[torch.optim.Optimizer], Any]

SCHEDULERS: dict[str, Factory] = {
    "OneCycleLR": lambda o: lrs.OneCycleLR(o, max_lr=1.0, total_steps=60),
    "CosineAnnealingLR": lambda o: lrs.CosineAnnealingLR(o, T_max=7, eta_min=0.01),
    "CosineAnnealingWarmRestarts": lambda o: lrs.CosineAnnealingWarmRestarts(o, T_0=5, eta_min=0.01),
    "StepLR": lambda o: lrs.StepLR(o, step_size=3, gamma=0.5),
    "MultiStepLR": lambda o: lrs.MultiStepLR(o, milestones=[2, 5, 9], gamma=0.5),
    "LambdaLR": lambda o: lrs.LambdaLR(o, lambda e: 1 / (e + 1)),
    "MultiplicativeLR": lambda o: lrs.MultiplicativeLR(o, lambda e: 0.9),
    "ConstantLR": lambda o: lrs.ConstantLR(o, factor=0.5, total_iters=4),
    "LinearLR": lambda o: lrs.LinearLR(o, start_factor=0.2, total_iters=6),
    "ExponentialLR": lambda o: lrs.ExponentialLR(o, gamma=0.9),
    "PolynomialLR": lambda o: lrs.PolynomialLR(o, total_iters=12, power=2.0),
    "CyclicLR": lambda o: lrs.CyclicLR(o, base_lr=0.01, max_lr=0.1, step_size_up=3),
    "ReduceLROnPlateau": lambda o: lrs.ReduceLROnPlateau(o, patience=0, factor=0.5, min_lr=1e-3),
    "SequentialLR": lambda o: lrs.SequentialLR(
        o,
        [lrs.LinearLR(o, 0.1, total_iters=3), lrs.CosineAnnealingLR(o, T_max=10, eta_min=0.01)],
        milestones=[3],
    ),
    "ChainedScheduler": lambda o: lrs.ChainedScheduler([lrs.ExponentialLR(o, 0.9), lrs.StepLR(o, 2, 0.5)]),
}


def _pair(kind: str) -> tuple[torch.optim.Optimizer, Any]:
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    return opt, SCHEDULERS[kind](opt)


def _advance(opt: torch.optim.Optimizer, sched: Any) -> None:
    opt.step()
    if isinstance(sched, lrs.ReduceLROnPlateau):
        sched.step(1.0)  # never improves: the plateau scheduler keeps cutting the rate
    else:
        sched.step()


@settings(max_examples=80, deadline=None)
@given(
    kind=st.sampled_from(sorted(SCHEDULERS)),
    before=st.integers(min_value=0, max_value=12),
    factor=st.sampled_from([0.5, 0.1, 0.25]),
)
def test_every_later_rate_is_the_factor_times_the_unscaled_one(kind: str, before: int, factor: float) -> None:
    plain, plain_sched = _pair(kind)
    scaled, scaled_sched = _pair(kind)
    for _ in range(before):
        _advance(plain, plain_sched)
        _advance(scaled, scaled_sched)
    wb.TrainingState(optimizer=scaled, scheduler=scaled_sched).scale_lr(factor)
    for _ in range(30):
        want, got = plain.param_groups[0]["lr"], scaled.param_groups[0]["lr"]
        assert math.isclose(got, factor * want, rel_tol=1e-6, abs_tol=1e-12), (kind, want, got)
        _advance(plain, plain_sched)
        _advance(scaled, scaled_sched)


class Flat:
    """A scheduler of its own: weightbank cannot know where its rates come from."""

    def __init__(self, opt: torch.optim.Optimizer) -> None:
        self.opt = opt

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class Scalable(Flat):
    def __init__(self, opt: torch.optim.Optimizer) -> None:
        super().__init__(opt)
        self.peak = 1.0

    def scale_lr(self, factor: float) -> None:
        self.peak *= factor


def _state(sched: Callable[[torch.optim.Optimizer], Any]) -> tuple[torch.nn.Module, wb.TrainingState]:
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return model, wb.TrainingState(model=model, optimizer=opt, scheduler=sched(opt), rng=False)


def test_a_scheduler_it_cannot_scale_is_refused_before_training(bank: wb.Bank) -> None:
    _model, state = _state(Flat)
    mgr = wb.CheckpointManager(bank, run="r", guard=wb.Guard(lr_scale=0.5), signals=())
    with pytest.raises(wb.InvalidArgument, match=r"Flat") as exc:
        mgr.restore(state)
    assert exc.value.name == "lr_scale"
    with pytest.raises(wb.InvalidArgument, match="lr_scale"):
        mgr.step(0, state, {"loss": 1.0})
    mgr.close()
    assert bank.runs() == []  # nothing was saved
    # without a factor to apply, any scheduler will do
    with wb.CheckpointManager(bank, run="r", guard=wb.Guard(), save=wb.Every(steps=1), signals=()) as ok:
        ok.step(0, state, {"loss": 1.0})


def test_a_scheduler_with_its_own_scale_lr_is_scaled_on_rollback(bank: wb.Bank) -> None:
    _model, state = _state(Scalable)
    guard = wb.Guard(lr_scale=0.5)
    with wb.CheckpointManager(bank, run="r", guard=guard, save=wb.Every(steps=1), signals=()) as mgr:
        mgr.restore(state)
        mgr.step(0, state, {"loss": 1.0})
        out = mgr.step(1, state, {"loss": math.nan})
    assert out.rollback is not None
    sched = state.objects("scheduler")[""]
    assert sched.peak == 0.5 and state.objects("optimizer")[""].param_groups[0]["lr"] == pytest.approx(0.05)


def test_one_cycle_is_scaled_by_a_rollback(bank: wb.Bank) -> None:
    """The case that did nothing before: OneCycleLR recomputed the rate from its max_lr."""
    model = torch.nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = lrs.OneCycleLR(opt, max_lr=1.0, total_steps=50)
    state = wb.TrainingState(model=model, optimizer=opt, scheduler=sched, rng=False)
    plain_opt = torch.optim.SGD(torch.nn.Linear(2, 1).parameters(), lr=0.1)
    plain = lrs.OneCycleLR(plain_opt, max_lr=1.0, total_steps=50)
    with wb.CheckpointManager(
        bank, run="r", guard=wb.Guard(lr_scale=0.5), save=wb.Every(steps=4), signals=()
    ) as mgr:
        for step in range(6):
            opt.step()
            sched.step()
            mgr.step(step, state, {"loss": 1.0})
        out = mgr.step(6, state, {"loss": math.inf})  # rolls back to 4 steps done
    assert out.rollback is not None and out.rollback.restored_step == 4
    for _ in range(4):
        plain_opt.step()
        plain.step()
    for _ in range(10):
        opt.step()
        sched.step()
        plain_opt.step()
        plain.step()
        assert opt.param_groups[0]["lr"] == pytest.approx(0.5 * plain_opt.param_groups[0]["lr"])
