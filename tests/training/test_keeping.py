"""The manager's best tags and retention (training/keeping.py): best-tag names follow the bank's tag grammar."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn

import weightbank as wb
from weightbank.bank.layout import check_new_name
from weightbank.training.keeping import Keeper


def _state() -> wb.TrainingState:
    torch.manual_seed(0)
    return wb.TrainingState(model=nn.Linear(2, 2), rng=False)


def test_best_tag_names_follow_the_tag_grammar(tmp_path: Path) -> None:
    """Review: the keeper used its own copy of the name alphabet, so a metric with '..' made an invalid tag."""
    bank = wb.open(tmp_path / "bank")
    state = _state()
    keep: list[wb.KeepPolicy] = [wb.BestN("val..loss", 1), wb.BestN(".ema", 1)]
    with wb.CheckpointManager(bank, run="r", save=wb.Every(steps=1), keep=keep, signals=()) as mgr:
        assert (mgr.best_tag("val..loss"), mgr.best_tag(".ema")) == ("r.best.val._loss", "r.best._ema")
        mgr.step(0, state, {"val..loss": 0.5, ".ema": 0.1})
    assert bank.resolve("r.best.val._loss") == bank.resolve("r.best._ema") == bank.resolve("r@1")


def test_a_best_tag_name_the_bank_would_refuse_is_refused_up_front() -> None:
    bank = wb.open("memory://")
    with pytest.raises(wb.InvalidName, match="longer than 128"):
        wb.CheckpointManager(bank, run="r", keep=[wb.BestN("m" * 130, 1)], signals=())
    assert bank.runs() == []


@given(metric=st.text(min_size=1, max_size=100))
@example(metric=".ema")
@example(metric="val..loss")
@example(metric="a/b c@d")
def test_every_metric_name_makes_a_valid_best_tag(metric: str) -> None:
    keeper = Keeper(wb.open("memory://"), "run.v2-", monitored={metric: "min"})
    assert check_new_name("tag", keeper.tag(metric)) == keeper.tag(metric)
