"""Damage that must not cost data or block writers: destructive calls refuse while a tag record is
damaged, a damaged record can be replaced, and the limits a reader checks never refuse what a save
(of this release or the last) wrote."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

import weightbank as wb
from weightbank.bank.layout import QUARANTINE, tag_key
from weightbank.format.hashing import digest

from .craft import good_manifest, plant_manifest, sample_bank, still_usable


def _damage(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 3] ^= 0x01
    path.write_bytes(bytes(data))


def test_a_damaged_tag_stops_prune_and_delete_until_it_is_replaced(tmp_path: Path) -> None:
    sample = sample_bank(tmp_path / "bank")
    sample.bank.tag("release", sample.first)
    _damage(sample.root / tag_key("release"))
    with pytest.raises(wb.CorruptObject, match="untag --force release"):
        sample.bank.prune(keep_last=1)
    with pytest.raises(wb.CorruptObject):
        sample.bank.delete(sample.first)
    assert {c.id for c in sample.bank.log()} == {sample.first, sample.second}
    # Replacing the damaged record keeps its bytes aside and says so in the new history.
    event = sample.bank.untag("release", force=True)
    assert event.action == "untag" and "damaged" in event.why
    kept = list((sample.root / QUARANTINE).rglob("*"))
    assert [p for p in kept if p.is_file()]
    assert sample.bank.verify().ok
    assert sample.bank.prune(keep_last=1).deleted == (sample.first,)
    with pytest.raises(wb.TagNotFound):
        sample.bank.resolve("release")


def test_untag_force_of_a_sound_tag_is_a_plain_untag(tmp_path: Path) -> None:
    sample = sample_bank(tmp_path / "bank")
    event = sample.bank.untag("prod", force=True)
    assert event.old == sample.second and not (sample.root / QUARANTINE).exists()
    assert sample.bank.rollback("prod").new == sample.second


def test_a_damaged_event_log_is_reset_by_the_next_append(tmp_path: Path) -> None:
    sample = sample_bank(tmp_path / "bank")
    sample.bank.record_event("r", "preempted", step=2)
    _damage(sample.root / "refs" / "events" / "r.json")
    with pytest.raises(wb.CorruptObject):
        sample.bank.events("r")
    sample.bank.record_event("r", "rollback", step=2, data={"reason": "nan"})
    kinds = [e.kind for e in sample.bank.events("r")]
    assert kinds == ["log-reset", "rollback"]
    reset = sample.bank.events("r")[0]
    assert (sample.root / reset.data["quarantined"]).is_file() and reset.data["problem"]
    still_usable(sample)


def test_chunk_size_over_a_gib_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    bank = wb.open(str(tmp_path / "bank"))
    with pytest.raises(wb.InvalidState, match="chunk_size"):
        bank.save({"w": torch.ones(4)}, chunk_size=2 << 30)
    assert bank.log() == [] and not list((tmp_path / "bank" / "packs").rglob("*.pack"))


def test_a_manifest_with_a_two_gib_chunk_size_from_an_older_release_loads(tmp_path: Path) -> None:
    sample = sample_bank(tmp_path / "bank")
    obj = copy.deepcopy(good_manifest(sample))
    obj["chunk_size"] = 2 << 30  # the last release allowed any multiple of 64
    cid = plant_manifest(sample.root, obj)
    assert torch.equal(sample.bank.load(cid)["w"], sample.state["w"])
    # Planted behind the bank's back, it has no catalog entry: verify says so, repair-index adds it.
    assert [p.kind for p in sample.bank.verify().problems] == ["index"]
    sample.bank.repair_index()
    assert sample.bank.verify().ok and sample.bank.resolve(cid[:12]) == cid


def test_a_run_named_like_an_id_before_the_rule_can_go_on(tmp_path: Path) -> None:
    sample = sample_bank(tmp_path / "bank")
    obj = copy.deepcopy(good_manifest(sample))
    obj["run"], obj["parent"] = "20240501", None
    old = plant_manifest(sample.root, obj)
    sample.bank.repair_index()  # as the upgrade of a bank an older release wrote would
    info = sample.bank.save({"w": torch.ones(2)}, run="20240501", step=3)
    assert info.parent == old
    with wb.CheckpointManager(sample.bank, run="20240501", signals=()) as mgr:
        assert mgr.run == "20240501"
    with pytest.raises(wb.InvalidName):
        sample.bank.save({"w": torch.ones(2)}, run="20240502")


def test_verify_checks_a_chunk_each_way_a_manifest_reads_it(tmp_path: Path) -> None:
    """A second manifest recording a known chunk with another coding is checked on its own."""
    sample = sample_bank(tmp_path / "bank")
    obj = copy.deepcopy(good_manifest(sample))
    obj["chunks"][0][2] = "zstd"  # same hash, pack and bytes; decoding them as zstd cannot work
    obj["message"] = "recoded"
    bad = plant_manifest(sample.root, obj)
    with pytest.raises(wb.CorruptObject):
        sample.bank.load(bad)
    report = sample.bank.verify()
    assert not report.ok and {p.checkpoint for p in report.problems} == {bad}


def test_a_manifest_claiming_a_huge_tensor_is_a_typed_error(tmp_path: Path) -> None:
    sample = sample_bank(tmp_path / "bank")
    obj = copy.deepcopy(good_manifest(sample))
    gib = 1 << 30
    row = obj["chunks"][0]
    obj["chunk_size"] = gib
    obj["chunks"] = [[digest(str(i).encode()), gib, "zstd", 0, row[4], row[5]] for i in range(1 << 12)]
    obj["tensors"] = [{"name": "w", "dtype": "uint8", "shape": [1 << 42], "chunks": list(range(1 << 12))}]
    obj["tree"] = {"d": [["w", {"T": 0}]]}
    obj["run"] = "huge"
    huge = plant_manifest(sample.root, json.dumps(obj).encode())
    with pytest.raises(wb.BudgetExceeded) as e:
        sample.bank.load(huge)
    assert not e.value.transient
    still_usable(sample)


def test_deeply_nested_config_saves_and_reads_back(tmp_path: Path) -> None:
    bank = wb.open(str(tmp_path / "bank"))
    config: dict[str, object] = {"leaf": 1}
    for _ in range(100):
        config = {"next": config}
    info = bank.save({"w": torch.ones(1)}, config=config)
    assert wb.open(str(tmp_path / "bank")).show(info.id).info.config == config
