"""The manager's job protocol and its per-step Decision; user-caused argument errors are InvalidArgument."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import weightbank as wb
from weightbank.training.job import Decision, Job, Solo, choose_job


@given(
    diverged=st.text(max_size=20),
    refused=st.text(max_size=20),
    rollbacks=st.lists(st.integers(0, 10**9), max_size=5),
    stop=st.booleans(),
    save=st.booleans(),
)
def test_a_decision_survives_its_json_form(
    diverged: str, refused: str, rollbacks: list[int], stop: bool, save: bool
) -> None:
    d = Decision(diverged=diverged, refused=refused, rollbacks=tuple(rollbacks), stop=stop, save=save)
    assert Decision.from_json(d.to_json()) == d


def test_a_single_process_is_a_solo_job_that_leads() -> None:
    job: Job = choose_job(None)
    assert isinstance(job, Solo) and job.leader and job.retains
    assert job.agree(lambda: Decision(stop=True), signalled=True) == (Decision(stop=True), True)
    assert job.any_rank(False) is False and job.broadcast(["x"]) == ["x"]


BAD: dict[str, tuple[Callable[[], Any], str]] = {
    "Every(steps=0)": (lambda: wb.Every(steps=0), "steps"),
    "Every()": (lambda: wb.Every(), "steps"),
    "Every(seconds=-1)": (lambda: wb.Every(seconds=-1), "seconds"),
    "LastN(0)": (lambda: wb.LastN(0), "n"),
    "BestN(mode=up)": (lambda: wb.BestN("x", 1, mode="up"), "mode"),
    "EveryN(True)": (lambda: wb.EveryN(True), "steps"),
    "MaxAge()": (lambda: wb.MaxAge(), "seconds"),
    "OnImprovement(min_delta=-1)": (lambda: wb.OnImprovement("x", min_delta=-1), "min_delta"),
    "EarlyStopping(patience=0)": (lambda: wb.EarlyStopping("x", patience=0), "patience"),
    "Guard(window=0)": (lambda: wb.Guard(window=0), "window"),
    "Guard(spike=1)": (lambda: wb.Guard(spike=1.0), "spike"),
    "Guard(lr_scale=0)": (lambda: wb.Guard(lr_scale=0), "lr_scale"),
    "Guard(max_rollbacks=-1)": (lambda: wb.Guard(max_rollbacks=-1), "max_rollbacks"),
    "ResumableLoader(batch_size=0)": (lambda: wb.ResumableLoader([1], batch_size=0), "batch_size"),
    "ResumableLoader(rank=2)": (lambda: wb.ResumableLoader([1], rank=2, world_size=2), "rank"),
    "ResumableLoader(sampler=)": (lambda: wb.ResumableLoader([1], sampler=[0]), "sampler"),
    "load_state_dict({})": (lambda: wb.ResumableLoader([1]).load_state_dict({"epoch": 0}), "state"),
    "load(parts=weights)": (
        lambda: wb.TrainingState(model=torch.nn.Linear(1, 1)).load({}, parts=["w"]),
        "parts",
    ),
    "max_inflight=0": (
        lambda: wb.CheckpointManager(wb.open("memory://"), run="r", max_inflight=0, signals=()),
        "max_inflight",
    ),
}


@pytest.mark.parametrize("call", sorted(BAD))
def test_configuration_errors_are_invalid_argument(call: str) -> None:
    make, name = BAD[call]
    with pytest.raises(wb.InvalidArgument) as exc:
        make()
    assert exc.value.name == name
    assert isinstance(exc.value, ValueError) and isinstance(exc.value, wb.WeightbankError)
