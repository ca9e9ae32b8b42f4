"""One retention engine (issue 11, item 6): ``run@best``, ``BestN`` and ``prune(keep_best=...)`` rank and break
ties the same way — the newest checkpoint wins — and ``prune``'s keywords are the engine's policy objects."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import weightbank as wb
from weightbank.bank.retention import BestN, best_first, prune_rules

# Values with many ties, and some that never rank (missing, NaN, infinite).
VALUES = st.sampled_from([0.5, 0.5, 1.0, 2.0, None, math.nan, math.inf, -math.inf])


def _run(values: list[float | None]) -> tuple[wb.Bank, list[str]]:
    bank = wb.open("memory://")
    ids = []
    for step, v in enumerate(values):
        metrics = {} if v is None else {"val": v}
        ids.append(bank.save({"w": torch.full((2,), float(step))}, run="r", step=step, metrics=metrics).id)
    return bank, ids


def test_a_three_way_tie_keeps_the_newest_everywhere() -> None:
    bank, ids = _run([0.3, 0.3, 0.3])
    assert bank.resolve("r@best:val") == ids[2]
    assert BestN("val", 1).keep(bank.log("r"), 0.0) == {ids[2]}
    report = bank.prune(keep_best=("val", 1), dry_run=True)
    assert report.kept == (ids[2],), "prune used to keep the oldest of a tie"
    assert bank.prune(keep_best=("val", 2, "max"), dry_run=True).kept == (ids[1], ids[2])


@settings(max_examples=40, deadline=None)
@given(values=st.lists(VALUES, min_size=1, max_size=6), mode=st.sampled_from(["min", "max"]))
def test_best_ref_best_n_and_prune_agree(values: list[float | None], mode: str) -> None:
    bank, ids = _run(values)
    ranked = [v for v in values if v is not None and math.isfinite(v)]
    kept = set(bank.prune(keep_best=("val", 1, mode), dry_run=True).kept)
    chosen = BestN("val", 1, mode).keep(bank.log("r"), 0.0)
    if not ranked:
        with pytest.raises(wb.CheckpointNotFound):
            bank.resolve(f"r@best:val:{mode}")
        assert kept == chosen == set()
        return
    best = min(ranked) if mode == "min" else max(ranked)
    newest_best = max(i for i, v in enumerate(values) if v == best)
    assert bank.resolve(f"r@best:val:{mode}") == ids[newest_best]
    assert kept == chosen == {ids[newest_best]}


@settings(max_examples=60, deadline=None)
@given(values=st.lists(st.one_of(st.none(), st.sampled_from([0.0, 1.0, 2.0])), max_size=8))
def test_best_first_orders_by_value_then_newest(values: list[float | None]) -> None:
    order = best_first(values, "min")
    assert sorted(order) == [i for i, v in enumerate(values) if v is not None]
    pairs = [(values[i], i) for i in order]
    assert pairs == sorted(pairs)  # index 0 is the newest: lower index first on a tie


def test_prune_keywords_are_policy_objects() -> None:
    rules = prune_rules(keep_last=2, keep_best=("val", 1, "max"), keep_every=5, older_than=60)
    assert [repr(r) for r in rules] == [
        "LastN(2)",
        "BestN('val', 1, mode='max')",
        "EveryN(5)",
        "MaxAge(seconds=60.0)",
    ]
    assert prune_rules(keep_last=0, older_than=0) == []  # rules that keep nothing: every checkpoint may go


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({}, "rules"),  # no rule at all: not one rule's fault
        ({"keep_last": -1}, "keep_last"),
        ({"keep_best": ("val",)}, "keep_best"),
        ({"keep_best": ("val", 0)}, "keep_best"),
        ({"keep_best": ("val", 1, "mean")}, "keep_best"),
        ({"keep_every": 0}, "keep_every"),
        ({"older_than": -5.0}, "older_than"),
        ({"older_than": math.nan}, "older_than"),
    ],
)
def test_bad_prune_arguments_are_invalid_argument(kwargs: dict[str, object], name: str) -> None:
    bank, _ = _run([1.0, 2.0])
    with pytest.raises(wb.InvalidArgument) as exc:
        bank.prune(**kwargs)  # type: ignore[arg-type]
    assert exc.value.name == name
    assert len(bank.log("r")) == 2


def test_bad_rollback_steps_are_invalid_argument() -> None:
    bank = wb.open("memory://")
    with pytest.raises(wb.InvalidArgument) as exc:
        bank.rollback("prod", steps=0)
    assert exc.value.name == "steps"
