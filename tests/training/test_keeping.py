"""The manager's best tags and retention (training/keeping.py): a damaged tag record never makes retention delete
what it protects, nor stops training (review of issue 11); best-tag names follow the bank's tag grammar."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch import nn

import weightbank as wb
from weightbank.bank.layout import check_new_name, tag_key
from weightbank.training import DamagedTagWarning
from weightbank.training.keeping import Keeper


def _state() -> wb.TrainingState:
    torch.manual_seed(0)
    return wb.TrainingState(model=nn.Linear(2, 2), rng=False)


def _damage(root: Path, tag: str) -> bytes:
    """Flip one byte in the middle of ``tag``'s record (its digest no longer matches); the damaged bytes."""
    path = root / tag_key(tag)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    return bytes(data)


def _steps(bank: wb.Bank) -> list[int]:
    return sorted(c.step or 0 for c in bank.log("r"))


def test_a_damaged_tag_record_stops_pruning_with_one_warning(tmp_path: Path) -> None:
    """``prod`` protects step 1; once its record is damaged retention would no longer see it: prune nothing."""
    root = tmp_path / "bank"
    bank = wb.open(root)
    state = _state()
    keep: list[wb.KeepPolicy] = [wb.LastN(1)]
    mgr = wb.CheckpointManager(bank, run="r", save=wb.Every(steps=1), keep=keep, signals=())
    first = mgr.step(0, state).saved
    assert first is not None
    bank.tag("prod", first.wait().id)
    damaged = _damage(root, "prod")
    assert [t.name for t in bank.tags() if t.problem] == ["prod"]
    with pytest.warns(DamagedTagWarning) as caught:
        for step in range(1, 4):
            mgr.step(step, state)
        mgr.close()
    assert _steps(bank) == [1, 2, 3, 4], "a checkpoint was deleted while a tag record was damaged"
    assert len(caught) == 1, "warned once, not at every commit"
    message = str(caught[0].message)
    assert "'prod'" in message and "prunes nothing" in message and "weightbank untag --force prod" in message
    assert "Training goes on" in message
    assert (root / tag_key("prod")).read_bytes() == damaged, "the damaged record was left as it was"


def test_a_damaged_best_tag_is_left_unmoved_then_ranked_again_once_replaced(tmp_path: Path) -> None:
    root = tmp_path / "bank"
    bank = wb.open(root)
    state = _state()
    keep: list[wb.KeepPolicy] = [wb.LastN(1), wb.BestN("val", 1)]
    mgr = wb.CheckpointManager(bank, run="r", save=wb.Every(steps=1), keep=keep, signals=())
    assert mgr.best_tag("val") == "r.best.val"
    mgr.step(0, state, {"val": 1.0})
    mgr.wait()
    assert bank.resolve("r.best.val") == bank.resolve("r@1")
    damaged = _damage(root, "r.best.val")
    with pytest.warns(DamagedTagWarning) as caught:
        mgr.step(1, state, {"val": 0.5})  # the best: its tag cannot move (the bank would raise CorruptObject)
        mgr.step(2, state, {"val": 0.8})
        mgr.wait()
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "'r.best.val'" in message and "not moved" in message and "prunes nothing" in message
    assert "weightbank untag --force r.best.val" in message and "r@best:val:min" in message
    assert (root / tag_key("r.best.val")).read_bytes() == damaged
    assert _steps(bank) == [1, 2, 3]

    bank.untag("r.best.val", force=True)  # the repair the warning names
    mgr.step(3, state, {"val": 0.9})
    mgr.close()
    # ranked again over the run, not moved to the next checkpoint with the metric (step 4, val 0.9)
    assert bank.resolve("r.best.val") == bank.resolve("r@2")
    assert _steps(bank) == [2, 4], "pruning resumed: the best and the newest are kept"


def test_early_stopping_leaves_a_damaged_best_tag_and_training_goes_on(tmp_path: Path) -> None:
    root = tmp_path / "bank"
    bank = wb.open(root)
    state = _state()
    es = wb.EarlyStopping("val", patience=1)
    mgr = wb.CheckpointManager(bank, run="r", save=wb.Every(steps=1), early_stopping=es, signals=())
    mgr.step(0, state, {"val": 1.0})
    mgr.wait()
    _damage(root, "r.best.val")
    with pytest.warns(DamagedTagWarning, match="r.best.val"):
        out = mgr.step(1, state, {"val": 2.0})  # no improvement: stops, and would point the tag at r@1
        mgr.close()
    assert out.stop
    assert _steps(bank) == [1, 2]


def test_keeper_tag_best_warns_instead_of_raising(tmp_path: Path) -> None:
    root = tmp_path / "bank"
    bank = wb.open(root)
    a = bank.save({"w": torch.ones(1)}, run="r", step=1, metrics={"val": 0.5}).id
    bank.save({"w": torch.zeros(1)}, run="r", step=2, metrics={"val": 0.7})
    keeper = Keeper(bank, "r", monitored={"val": "min"})
    bank.tag("r.best.val", "r@2")
    _damage(root, "r.best.val")
    keeper.tag_best("val", "min", why="test")
    with pytest.warns(DamagedTagWarning, match="not moved"):
        keeper.warn_pending()
    keeper.warn_pending()  # nothing more: warned once
    bank.untag("r.best.val", force=True)
    keeper.tag_best("val", "min", why="test")
    assert bank.resolve("r.best.val") == a


def test_damage_elsewhere_is_not_hidden(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a damaged tag record is downgraded to a warning: other damage met while moving a tag still raises."""
    bank = wb.open("memory://")
    keeper = Keeper(bank, "r", monitored={"val": "min"})
    info = bank.save({"w": torch.ones(1)}, run="r", step=1, metrics={"val": 0.5})

    def damaged_manifest(*args: object, **kwargs: object) -> None:
        raise wb.CorruptObject("manifests/ab/ab.json", detail="a manifest, not the tag record")

    monkeypatch.setattr(bank, "tag", damaged_manifest)
    with pytest.raises(wb.CorruptObject, match="not the tag record"):
        keeper.after_commit(info)


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
