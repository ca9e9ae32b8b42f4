"""Bad input gets a clear typed error and writes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import weightbank as wb
from weightbank.bank.layout import FORMAT_KEY


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


class Opaque:
    pass


@pytest.mark.parametrize(
    ("state", "path"),
    [
        ({"model": {"w": torch.ones(2)}, "cb": Opaque()}, "cb"),
        ({"w": torch.ones(2), "f": lambda: 0}, "f"),
        ({"w": torch.ones(2), "arr": np.array(["a", None], dtype=object)}, "arr"),
        (
            {"opt": {"state": {0: {"m": torch.ones(1)}}, "param_groups": [{"betas": {0.9}}]}},
            "opt.param_groups.0.betas",
        ),
    ],
)
def test_unstorable_state_writes_nothing(local_bank: wb.Bank, state: object, path: str) -> None:
    root = Path(local_bank.url)
    before = files_under(root)
    with pytest.raises(wb.InvalidState) as e:
        local_bank.save(state, run="r", step=1, tags=["t"])
    assert e.value.path == path and path in str(e.value)
    assert files_under(root) == before
    assert local_bank.log() == [] and local_bank.tags() == []


@pytest.mark.parametrize(
    "kwargs",
    [
        {"metrics": {"loss": torch.tensor(1.0)}},
        {"config": {"opt": object()}},
        {"meta": {1: "int key"}},
        {"step": -1},
        {"step": 1.5},
        {"step": True},
        {"message": 5},
        {"codec": "nope"},
        {"parent": "does-not-exist"},
        {"chunk_size": -5},
        {"chunk_size": 100},
        {"chunk_size": 32},
        {"chunk_size": True},
        {"chunk_size": 4096.0},
    ],
)
def test_bad_save_arguments_write_nothing(local_bank: wb.Bank, kwargs: dict[str, object]) -> None:
    root = Path(local_bank.url)
    before = files_under(root)
    with pytest.raises(wb.WeightbankError):
        local_bank.save({"w": torch.ones(2)}, **kwargs)  # type: ignore[arg-type]
    assert files_under(root) == before


def test_directory_that_is_not_a_bank(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(wb.NotABank, match="not empty"):
        wb.open(tmp_path)
    assert files_under(tmp_path) == {"notes.txt"}
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(wb.NotABank, match="file"):
        wb.open(f)
    with pytest.raises(wb.NotABank):
        wb.open(tmp_path / "missing", create=False)
    assert not (tmp_path / "missing").exists()
    with pytest.raises(OSError):  # NotABank is an OSError too
        wb.open(tmp_path)


def test_bank_of_a_newer_format_is_refused(tmp_path: Path) -> None:
    wb.open(tmp_path / "b")
    marker = tmp_path / "b" / FORMAT_KEY
    obj = json.loads(marker.read_text())
    obj["version"] = 99
    marker.write_text(json.dumps(obj))
    with pytest.raises(wb.UnsupportedFormat, match="upgrade"):
        wb.open(tmp_path / "b")
    marker.write_text("{not json")
    with pytest.raises(wb.NotABank, match="unreadable"):
        wb.open(tmp_path / "b")


def test_truncated_manifest(local_bank: wb.Bank) -> None:
    good = local_bank.save({"w": torch.ones(3)}, run="r", step=1)
    bad = local_bank.save({"w": torch.zeros(3)}, run="r", step=2)
    path = Path(local_bank.url) / "manifests" / bad.id[:2] / f"{bad.id}.json"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    fresh = wb.open(local_bank.url)
    with pytest.raises(wb.CorruptObject) as e:
        fresh.load(bad.id)
    assert bad.id[:12] in str(e.value)
    assert torch.equal(fresh.load(good.id)["w"], torch.ones(3))
    report = fresh.verify()
    assert not report.ok and [p.kind for p in report.problems] == ["manifest"]


def test_unknown_ref_on_every_verb(bank: wb.Bank) -> None:
    bank.save({"w": torch.ones(1)}, tags=["prod"])
    for call in (
        lambda: bank.load("nope"),
        lambda: bank.show("nope"),
        lambda: bank.diff("prod", "nope"),
        lambda: bank.tag("x", "nope"),
        lambda: bank.verify("nope"),
        lambda: bank.delete("nope"),
    ):
        with pytest.raises(wb.CheckpointNotFound):
            call()
    assert [t.name for t in bank.tags()] == ["prod"]


def test_prune_needs_a_rule(bank: wb.Bank) -> None:
    bank.save({"w": torch.ones(1)})
    with pytest.raises(ValueError, match="rule"):
        bank.prune()
    with pytest.raises(ValueError):
        bank.rollback("x", steps=0)
