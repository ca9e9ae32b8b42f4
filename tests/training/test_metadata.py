"""``config=``/``meta=`` are checked when given, and metrics when reported (issue 11, item 13): a value JSON
cannot hold is an InvalidState naming its key at once, not a traceback from the background save. Integer keys
(a Hugging Face ``id2label``) are stored as strings, as ``json.dumps`` writes them: not a lossless round trip."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import weightbank as wb
from weightbank.training.metadata import json_metadata

ID2LABEL = {0: "negative", 1: "positive"}


def _state() -> wb.TrainingState:
    return wb.TrainingState(model=torch.nn.Linear(1, 1), rng=False)


def test_an_hf_config_with_integer_keys_is_stored_with_string_keys(bank: wb.Bank) -> None:
    config = {"model_type": "bert", "id2label": ID2LABEL, "label2id": {"negative": 0, "positive": 1}}
    with wb.CheckpointManager(bank, run="r", config=config, save=wb.Every(steps=1), signals=()) as mgr:
        info = mgr.step(0, _state(), {"loss": 1.0}).saved
        assert info is not None
        stored = info.wait().config
    assert stored["id2label"] == {"0": "negative", "1": "positive"}  # what json.dumps would write
    assert stored["label2id"] == config["label2id"]
    assert config["id2label"] is ID2LABEL and 0 in ID2LABEL, "the caller's dict is left alone"


@pytest.mark.parametrize(
    ("config", "where"),
    [
        ({"act": torch.nn.GELU()}, r"config\.act"),
        ({"nested": {"fn": print}}, r"config\.nested\.fn"),
        ({"w": torch.ones(2)}, r"config\.w"),
        ({"map": {1.5: "x"}}, r"config\.map\.1\.5"),
        ({"map": {(1, 2): "x"}}, r"config\.map\.\(1, 2\)"),
        ({"map": {1: "a", "1": "b"}}, r"config\.map\.1"),
    ],
)
def test_a_config_json_cannot_hold_is_refused_by_the_constructor(
    bank: wb.Bank, config: dict[str, Any], where: str
) -> None:
    with pytest.raises(wb.InvalidState, match=where):
        wb.CheckpointManager(bank, run="r", config=config, signals=())


def test_meta_and_metrics_are_checked_when_given(bank: wb.Bank) -> None:
    with pytest.raises(wb.InvalidState, match=r"meta\.cb"):
        wb.CheckpointManager(bank, run="r", meta={"cb": lambda: 1}, signals=())
    with wb.CheckpointManager(bank, run="r", save=wb.Every(steps=1), signals=()) as mgr:
        with pytest.raises(wb.InvalidState, match=r"metrics\.hist"):
            mgr.step(0, _state(), {"hist": [torch.ones(3)]})
        assert mgr.step(1, _state(), {"loss": torch.tensor(0.5)}).saved is not None
    assert [c.metrics for c in bank.log("r")] == [{"loss": 0.5}]


KEYS = st.one_of(st.integers(-1000, 1000), st.text(alphabet="abc012", min_size=1, max_size=3))
LEAVES = st.one_of(st.none(), st.booleans(), st.integers(-5, 5), st.text(max_size=3))
TREES = st.recursive(
    LEAVES,
    lambda kids: st.one_of(st.lists(kids, max_size=3), st.dictionaries(KEYS, kids, max_size=3)),
    max_leaves=12,
)


def _collides(value: Any) -> bool:
    """Whether two keys of a mapping somewhere in ``value`` read the same once written as JSON."""
    if isinstance(value, dict):
        return len({str(k) for k in value}) < len(value) or any(_collides(v) for v in value.values())
    if isinstance(value, list):
        return any(_collides(v) for v in value)
    return False


@settings(max_examples=150, deadline=None)
@given(tree=st.dictionaries(KEYS, TREES, max_size=4))
def test_stored_keys_are_what_json_dumps_writes(tree: dict[Any, Any]) -> None:
    if _collides(tree):
        with pytest.raises(wb.InvalidState, match="two keys read"):  # 1 and "1": refused, never merged
            json_metadata(tree, "config")
        return
    assert json_metadata(tree, "config") == json.loads(json.dumps(tree))
