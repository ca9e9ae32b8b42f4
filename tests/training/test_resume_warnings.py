"""Resuming without a data position warns once, naming ResumableLoader (issue 11, item 12)."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import weightbank as wb


def _run(bank: wb.Bank, data: wb.ResumableLoader | None, total: int) -> wb.CheckpointManager:
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    state = wb.TrainingState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), data=data)
    mgr = wb.CheckpointManager(bank, run="r", save=wb.Every(steps=2), signals=())
    for step in range(mgr.restore(state), total):
        mgr.step(step, state, {"loss": 1.0})
    mgr.close()
    return mgr


def test_a_mid_run_resume_without_data_warns_once_naming_the_loader(bank: wb.Bank) -> None:
    _run(bank, None, 3)  # saved at 2 steps: in the middle of whatever the loop iterates
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    state = wb.TrainingState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    mgr = wb.CheckpointManager(bank, run="r", signals=())
    with pytest.warns(wb.DataPositionWarning) as caught:
        assert mgr.restore(state) == 2
        assert mgr.restore(state) == 2  # once per manager
    mgr.close()
    assert len(caught) == 1
    message = str(caught[0].message)
    assert (
        "ResumableLoader" in message and "state_dict()/load_state_dict()" in message and "step 2" in message
    )


def test_no_warning_with_a_data_position_or_for_a_fresh_run(bank: wb.Bank) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _run(bank, wb.ResumableLoader(list(range(8)), batch_size=2), 3)
        _run(bank, wb.ResumableLoader(list(range(8)), batch_size=2), 5)  # resumes at 2: has a position
        other = wb.open("memory://")
        _run(other, None, 1)  # a fresh run: nothing to resume, nothing to warn about
