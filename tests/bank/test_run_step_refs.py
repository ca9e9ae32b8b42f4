"""``run@<step>`` when a run holds several checkpoints at one step (issue 11, item 11): the original, never a
re-save of it (a checkpoint whose meta names it as ``resave_of``: what a rollback writes, or an older manager's
rollback copy marked only ``trigger: rollback``); checkpoints saved twice at one step without either mark still
resolve to the newer one."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import weightbank as wb


def test_a_resave_at_the_same_step_does_not_shadow_the_original() -> None:
    bank = wb.open("memory://")
    bank.save({"w": torch.zeros(1)}, run="r", step=20)
    original = bank.save({"w": torch.ones(1)}, run="r", step=30, metrics={"loss": 0.1}).id
    copy = bank.save({"w": torch.ones(1)}, run="r", step=30, meta={"resave_of": original}).id
    assert bank.resolve("r@30") == original
    assert bank.resolve("r@latest") == copy  # still reachable, and still the run's newest


def test_unmarked_or_dangling_marks_resolve_to_the_newest() -> None:
    bank = wb.open("memory://")
    base = bank.save({"w": torch.zeros(1)}, run="r", step=20).id
    bank.save({"w": torch.ones(1)}, run="r", step=30)
    again = bank.save({"w": torch.full((1,), 2.0)}, run="r", step=30, parent=base).id  # re-trained from 20
    assert bank.resolve("r@30") == again
    # a mark naming a checkpoint at another step, or not an id at all, is no re-save of this step
    odd = bank.save({"w": torch.full((1,), 3.0)}, run="r", step=30, meta={"resave_of": base}).id
    assert bank.resolve("r@30") == odd
    junk = bank.save({"w": torch.full((1,), 4.0)}, run="r", step=30, meta={"resave_of": [1, 2]}).id
    assert bank.resolve("r@30") == junk


def test_only_resaves_left_resolve_to_the_newest() -> None:
    bank = wb.open("memory://")
    original = bank.save({"w": torch.ones(1)}, run="r", step=5).id
    copy = bank.save({"w": torch.ones(1)}, run="r", step=5, meta={"resave_of": original}).id
    bank.delete(original)
    assert bank.resolve("r@5") == copy


@settings(max_examples=30, deadline=None)
@given(resaves=st.integers(min_value=1, max_value=4), chain=st.booleans())
def test_the_original_survives_any_number_of_resaves(resaves: int, chain: bool) -> None:
    bank = wb.open("memory://")
    original = bank.save({"w": torch.ones(1)}, run="r", step=7, metrics={"loss": 1.0}).id
    of = original
    for i in range(resaves):
        cid = bank.save({"w": torch.full((1,), float(i))}, run="r", step=7, meta={"resave_of": of}).id
        of = cid if chain else original  # a re-save of a re-save is one too
    assert bank.resolve("r@7") == original


def _old_rollback_copy(bank: wb.Bank, run: str, step: int, done: int) -> str:
    """A rollback copy as the manager before ``resave_of`` wrote it (6a93da7 ``_rollback``/``_save``).

    The restored state again at the restored step, no metrics, meta ``trigger: rollback`` (plus the
    seed the manager recorded), the default parent (the run's newest: the checkpoint just restored).
    """
    return bank.save(
        {"w": torch.ones(1), "manager": {"step": step}},
        run=run,
        step=step,
        metrics={},
        meta={"trigger": "rollback", "torch_seed": 0},
        message=f"rollback at step {done} (loss nan) to step {step}",
    ).id


def test_an_old_rollback_copy_without_the_mark_does_not_shadow_the_original() -> None:
    bank = wb.open("memory://")
    bank.save({"w": torch.zeros(1)}, run="r", step=20, meta={"trigger": "policy"})
    original = bank.save({"w": torch.ones(1)}, run="r", step=30, metrics={"loss": 0.1}).id
    copy = _old_rollback_copy(bank, "r", 30, done=35)
    info = bank.show(copy).info
    assert info.parent == original and "resave_of" not in info.meta and info.meta["trigger"] == "rollback"
    assert bank.resolve("r@30") == original
    again = _old_rollback_copy(bank, "r", 30, done=33)  # a second rollback re-saves the first copy
    assert bank.show(again).info.parent == copy
    assert bank.resolve("r@30") == original
    assert bank.resolve("r@latest") == again


def test_an_old_rollback_mark_counts_only_with_a_parent_at_the_same_step() -> None:
    bank = wb.open("memory://")
    base = bank.save({"w": torch.zeros(1)}, run="r", step=20).id
    bank.save({"w": torch.ones(1)}, run="r", step=30)
    # trigger "rollback" whose parent is at another step: no re-save of step 30
    odd = bank.save(
        {"w": torch.full((1,), 2.0)}, run="r", step=30, parent=base, meta={"trigger": "rollback"}
    ).id
    assert bank.resolve("r@30") == odd
    orphan = bank.save(
        {"w": torch.full((1,), 3.0)}, run="r", step=30, parent=None, meta={"trigger": "rollback"}
    ).id
    assert bank.resolve("r@30") == orphan
