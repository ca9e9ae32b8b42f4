"""Crafted and damaged mutable records: tags (history, undo stack), run event logs, trash entries, leases.

Issue 11, items 3 and 4: every record read back is checked whole and carries
its own digest, so a flipped byte or a crafted entry is a typed error for
that record only — every other tag, run and checkpoint keeps working — and
``verify`` reports it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

import weightbank as wb
from weightbank.bank.layout import lease_key, tag_key, trash_key
from weightbank.format.sealed import seal

from .craft import sample_bank, still_usable


def _tag_path(root: Path, name: str) -> Path:
    return root / tag_key(name)


def _events_path(root: Path, run: str) -> Path:
    return root / "refs" / "events" / f"{run}.json"


def _resealed(path: Path, change: Any) -> None:
    """Rewrite a sealed record with ``change`` applied and a *valid* digest: a crafted record."""
    obj = json.loads(path.read_bytes())
    obj.pop("digest")
    change(obj)
    path.write_bytes(seal(obj))


def _extra_tag(sample: Any) -> Path:
    sample.bank.tag("canary", sample.first)
    return _tag_path(sample.root, "canary")


TAG_ATTACKS = {
    "a history entry that is not an object": lambda o: o["history"].append(7),
    "a history entry with a non-numeric time": lambda o: o["history"][0].__setitem__("at", "yesterday"),
    "a history entry with an unknown action": lambda o: o["history"][0].__setitem__("action", "teleport"),
    "a stack entry that is no id": lambda o: o["stack"].append("../../etc/passwd"),
    "a target that is not the top of the stack": lambda o: o.__setitem__("target", "a" * 64),
    "a record naming another tag": lambda o: o.__setitem__("name", "prod"),
    "history that is a dict": lambda o: o.__setitem__("history", {}),
}


@pytest.mark.parametrize("name", sorted(TAG_ATTACKS))
def test_crafted_tag_record_breaks_only_that_tag(tmp_path: Path, name: str) -> None:
    sample = sample_bank(tmp_path / "bank")
    path = _extra_tag(sample)
    _resealed(path, TAG_ATTACKS[name])
    with pytest.raises(wb.CorruptObject):
        sample.bank.resolve("canary")
    with pytest.raises(wb.CorruptObject):
        sample.bank.tag_history("canary")
    listed = {t.name: t for t in sample.bank.tags()}
    assert listed["prod"].target == sample.second and listed["canary"].problem
    report = sample.bank.verify()
    assert [(p.kind, p.key) for p in report.problems] == [("tag", tag_key("canary"))]
    still_usable(sample)


def _undetected_flips(path: Path, read: Any) -> list[int]:
    """Offsets where flipping one bit of ``path`` changes what ``read()`` returns without CorruptObject."""
    good = path.read_bytes()
    expected = read()
    missed = []
    for offset in range(len(good)):
        flipped = bytearray(good)
        flipped[offset] ^= 0x01
        path.write_bytes(bytes(flipped))
        try:
            if read() != expected:
                missed.append(offset)
        except wb.CorruptObject:
            continue
    path.write_bytes(good)
    return missed


def test_every_byte_flip_of_a_tag_record_is_detected(tmp_path: Path) -> None:
    """Item 4: a tag's history, undo stack and target are covered by the record's digest."""
    sample = sample_bank(tmp_path / "bank")
    sample.bank.tag("canary", sample.first, why="first pick")
    sample.bank.tag("canary", sample.second, why="second pick")
    path = _tag_path(sample.root, "canary")
    assert _undetected_flips(path, lambda: sample.bank.tag_history("canary")) == []
    assert sample.bank.verify().ok


def test_every_byte_flip_of_an_event_log_is_detected(tmp_path: Path) -> None:
    sample = sample_bank(tmp_path / "bank")
    sample.bank.record_event("r", "rollback", step=2, checkpoint=sample.first, data={"reason": "nan"})
    sample.bank.record_event("r", "preempted", step=3)
    path = _events_path(sample.root, "r")
    assert _undetected_flips(path, lambda: sample.bank.events("r")) == []


EVENT_ATTACKS = {
    "an event that is a string": lambda o: o["events"].append("junk"),
    "an event without a kind": lambda o: o["events"][0].pop("kind"),
    "an event with a non-numeric time": lambda o: o["events"][0].__setitem__("at", [1]),
    "an event naming no id": lambda o: o["events"][0].__setitem__("checkpoint", "zz"),
    "event data with a bad encoded float": lambda o: o["events"][0].__setitem__("data", {"x": {"$f": "zzz"}}),
    "events that are an object": lambda o: o.__setitem__("events", {}),
}


@pytest.mark.parametrize("name", sorted(EVENT_ATTACKS))
def test_crafted_event_log_breaks_only_that_run(tmp_path: Path, name: str) -> None:
    sample = sample_bank(tmp_path / "bank")
    sample.bank.save({"w": torch.ones(2)}, run="other", step=1)
    sample.bank.record_event("other", "rollback", step=1, data={"reason": "nan"})
    sample.bank.record_event("r", "preempted", step=2)
    _resealed(_events_path(sample.root, "other"), EVENT_ATTACKS[name])
    with pytest.raises(wb.CorruptObject):
        sample.bank.events("other")
    assert [e.kind for e in sample.bank.events("r")] == ["preempted"]
    report = sample.bank.verify()
    assert [p.kind for p in report.problems] == ["events"]
    still_usable(sample)


def test_damaged_event_log_does_not_break_cli_log(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from weightbank.cli.main import app

    sample = sample_bank(tmp_path / "bank")
    sample.bank.record_event("r", "preempted", step=2)
    _events_path(sample.root, "r").write_bytes(b"{junk")
    result = CliRunner().invoke(app, ["log", "--bank", str(sample.root)])
    assert result.exit_code == 0, result.output
    assert sample.second[:12] in result.output and "damaged" in result.output


def test_tag_at_n_of_a_deleted_checkpoint_is_not_found(tmp_path: Path) -> None:
    """Item 4: ``tag@{N}`` checks that its stored id still exists."""
    sample = sample_bank(tmp_path / "bank")
    sample.bank.tag("prod", sample.first)  # prod: second -> first; prod@{1} is second
    sample.bank.tag("prod", sample.second)
    assert sample.bank.resolve("prod@{1}") == sample.first
    extra = sample.bank.save({"w": torch.full((3,), 7.0)}, run="x", step=1).id
    sample.bank.tag("prod", extra)
    sample.bank.tag("prod", sample.second)
    sample.bank.delete(extra)
    with pytest.raises(wb.CheckpointNotFound, match="deleted"):
        sample.bank.resolve("prod@{1}")
    with pytest.raises(wb.CheckpointNotFound):
        sample.bank.tag("canary", "prod@{1}")


def test_a_tag_pointing_at_a_deleted_checkpoint_is_not_found(tmp_path: Path) -> None:
    sample = sample_bank(tmp_path / "bank")
    sample.bank.tag("old", sample.first)
    sample.bank.delete(sample.first, force=True)
    with pytest.raises(wb.CheckpointNotFound, match="deleted"):
        sample.bank.resolve("old")
    assert [p.kind for p in sample.bank.verify().problems] == ["tag"]


def test_a_tag_file_that_is_a_directory(tmp_path: Path) -> None:
    """Item 3: a directory where a tag record should be is a typed error for that tag only."""
    sample = sample_bank(tmp_path / "bank")
    _tag_path(sample.root, "weird").mkdir()
    with pytest.raises(wb.WeightbankError):
        sample.bank.resolve("weird")
    assert [t.name for t in sample.bank.tags()] == ["prod"]
    still_usable(sample)


def test_a_legacy_unsealed_tag_record_still_reads_and_is_sealed_on_its_next_move(tmp_path: Path) -> None:
    sample = sample_bank(tmp_path / "bank")
    path = _tag_path(sample.root, "prod")
    obj = json.loads(path.read_bytes())
    obj.pop("digest")
    path.write_bytes(json.dumps(obj).encode())  # as weightbank wrote it before records were sealed
    assert sample.bank.resolve("prod") == sample.second
    sample.bank.tag("prod", sample.first)
    assert "digest" in json.loads(path.read_bytes())
    # A damaged record cannot pass for a legacy one: any other key set without a digest is refused.
    obj["digesu"] = "x"
    path.write_bytes(json.dumps(obj).encode())
    with pytest.raises(wb.CorruptObject):
        sample.bank.resolve("prod")


def test_damaged_trash_entry_makes_gc_refuse_and_verify_report(tmp_path: Path) -> None:
    sample = sample_bank(tmp_path / "bank")
    sample.bank.delete(sample.first)
    path = sample.root / trash_key(sample.first)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    packs = set((sample.root / "packs").rglob("*.pack"))
    with pytest.raises(wb.CorruptObject, match="gc refuses"):
        sample.bank.gc(grace=3600)
    assert set((sample.root / "packs").rglob("*.pack")) == packs
    assert [p.kind for p in sample.bank.verify().problems] == ["trash"]


def test_damaged_lease_still_protects_its_saves_packs(tmp_path: Path) -> None:
    sample = sample_bank(tmp_path / "bank")
    save_id = "feedface00"
    pack = sample.root / "packs" / save_id[:2] / f"{save_id}-0.pack"
    pack.parent.mkdir(parents=True, exist_ok=True)
    pack.write_bytes(b"x" * 100)
    (sample.root / lease_key(save_id)).write_bytes(b'{"save": "feedface00", "host": "elsewh')  # torn
    report = sample.bank.gc(grace=0)
    assert pack.exists() and report.packs_kept_for_inflight == 1
    assert [p.kind for p in sample.bank.verify().problems] == ["lease", "orphan"]
