"""Names that could be read as checkpoint ids (issue 11, item 1): a tag can never shadow an id."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import weightbank as wb
from weightbank.bank.layout import check_new_name, tag_key
from weightbank.format.sealed import seal

from .craft import sample_bank


def test_a_tag_named_like_another_checkpoints_id_is_refused(tmp_path: Path) -> None:
    sample = sample_bank(tmp_path / "bank")
    with pytest.raises(wb.InvalidName, match="id prefix"):
        sample.bank.tag(sample.first, sample.second)
    with pytest.raises(wb.InvalidName):
        sample.bank.tag(sample.first[:8], sample.second)
    assert torch.equal(sample.bank.load(sample.first)["w"], torch.arange(64.0).reshape(8, 8))


@pytest.mark.parametrize("name", ["deadbeef", "cafe01", "0123456789", "a" * 64])
def test_id_like_tag_and_run_names_are_refused_everywhere(tmp_path: Path, name: str) -> None:
    bank = wb.open(str(tmp_path / "bank"))
    cid = bank.save({"w": torch.ones(1)}).id
    with pytest.raises(wb.InvalidName):
        bank.save({"w": torch.ones(1)}, run=name)
    with pytest.raises(wb.InvalidName):
        bank.save({"w": torch.ones(1)}, tags=[name])
    with pytest.raises(wb.InvalidName):
        bank.tag(name, cid)
    with pytest.raises(wb.InvalidName):
        bank.commit([bank.save_part({"w": torch.ones(1)}).to_json()], run=name)
    assert [c.id for c in bank.log()] == [cid]


@pytest.mark.parametrize("name", ["prod", "v-cafe01", "CAFE01", "cafe0", "deadbeefx", "run_1"])
def test_names_that_cannot_be_ids_are_fine(name: str) -> None:
    assert check_new_name("tag", name) == name


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="0123456789abcdef", min_size=6, max_size=64))
def test_no_hex_name_of_six_or_more_characters_is_accepted(name: str) -> None:
    with pytest.raises(wb.InvalidName):
        check_new_name("tag", name)


def _plant_legacy_tag(root: Path, name: str, target: str) -> None:
    """A tag record as a bank made before id-like names were refused could hold it."""
    path = root / tag_key(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    history = [{"action": "set", "old": None, "new": target, "at": 1.0, "by": "x", "why": ""}]
    path.write_bytes(seal({"name": name, "target": target, "stack": [target], "history": history}))


def test_a_full_id_resolves_before_a_legacy_tag_of_that_name(tmp_path: Path) -> None:
    sample = sample_bank(tmp_path / "bank")
    _plant_legacy_tag(sample.root, sample.first, sample.second)
    assert sample.bank.resolve(sample.first) == sample.first
    assert torch.equal(sample.bank.load(sample.first)["w"], torch.arange(64.0).reshape(8, 8))


def test_a_legacy_tag_that_is_also_an_id_prefix_is_ambiguous(tmp_path: Path) -> None:
    sample = sample_bank(tmp_path / "bank")
    prefix = sample.first[:8]
    _plant_legacy_tag(sample.root, prefix, sample.second)
    with pytest.raises(wb.AmbiguousRef):
        sample.bank.resolve(prefix)
    # It can still be removed, and then the prefix names the checkpoint again.
    sample.bank.untag(prefix)
    assert sample.bank.resolve(prefix) == sample.first
    with pytest.raises(wb.InvalidName):
        sample.bank.tag(prefix, sample.second)  # and never re-pointed under that name


def test_a_legacy_hex_tag_matching_no_id_still_resolves(tmp_path: Path) -> None:
    sample = sample_bank(tmp_path / "bank")
    name = "ffffff" if not sample.first.startswith("ffffff") else "eeeeee"
    _plant_legacy_tag(sample.root, name, sample.second)
    assert sample.bank.resolve(name) == sample.second
    assert json.loads((sample.root / tag_key(name)).read_bytes())["target"] == sample.second
