"""``weightbank copy``: to another directory and to a real S3 server, ids and tags kept; its error lines."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import weightbank as wb
from weightbank.cli.exitcodes import NOT_FOUND, USAGE

from ..s3server import SeaweedServer
from .test_cli import as_json, fails, ok


def noise(seed: int) -> torch.Tensor:
    return torch.randn(4096, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def src(tmp_path: Path) -> Path:
    path = tmp_path / "src"
    with wb.open(path) as bank:
        for s in range(3):
            bank.save({"w": noise(s), "b": torch.ones(8)}, run="r", step=s, tags=["prod"] if s == 2 else ())
    return path


def test_copy_to_a_directory_keeps_ids_and_tags(src: Path, tmp_path: Path) -> None:
    out = " ".join(ok("copy", "prod", "--ancestors", "--to", str(tmp_path / "dst"), bank=src).stdout.split())
    assert "copied 3 checkpoint(s)" in out and "ids unchanged" in out and "set tag(s) prod" in out, out
    with wb.open(src, create=False) as a, wb.open(tmp_path / "dst", create=False) as b:
        assert [c.id for c in a.log()] == [c.id for c in b.log()]
        assert b.resolve("prod") == a.resolve("prod")
        assert torch.equal(b.load("prod~2")["w"], noise(0))
    again = as_json("copy", "--to", str(tmp_path / "dst"), bank=src)
    assert again["copied"] == [] and len(again["skipped"]) == 3 and again["bytes_copied"] == 0


@pytest.mark.s3
def test_copy_to_s3(src: Path, seaweed: SeaweedServer, s3_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEIGHTBANK_STORAGE_OPTIONS", json.dumps(seaweed.storage_options()))
    report = as_json("copy", "--to", s3_url, bank=src)
    assert len(report["copied"]) == 3 and report["tags"] == ["prod"]
    with wb.open(s3_url, create=False, storage_options=seaweed.storage_options()) as b:
        assert torch.equal(b.load("prod")["w"], noise(2))
        assert b.verify().problems == ()
    assert os.environ["WEIGHTBANK_STORAGE_OPTIONS"]


def test_copy_needs_a_destination_and_known_refs(src: Path, tmp_path: Path) -> None:
    line = fails(USAGE, "copy", "prod", bank=src)
    assert "--to" in line, line
    line = fails(NOT_FOUND, "copy", "nope", "--to", str(tmp_path / "dst"), bank=src)
    assert "nope" in line, line
    line = fails(USAGE, "copy", "prod", "--to", str(src), bank=src)
    assert "dest" in line, line


def test_a_tag_the_destination_has_elsewhere_moves_only_with_move_tags(src: Path, tmp_path: Path) -> None:
    with wb.open(tmp_path / "dst") as dst:
        mine = dst.save({"w": noise(9)}, run="serving", step=0, tags=["prod"]).id
    out = " ".join(ok("copy", "r@0", "--to", str(tmp_path / "dst"), bank=src).stdout.split())
    assert "left tag(s)" not in out  # prod is not on r@0
    ok("copy", "r@latest", "--to", str(tmp_path / "dst"), bank=src)
    with wb.open(tmp_path / "dst", create=False) as dst:
        assert dst.resolve("prod") == mine
    report = as_json("copy", "prod", "--to", str(tmp_path / "dst"), bank=src)
    assert report["tags_left"] == ["prod"] and report["tags"] == []
    report = as_json("copy", "prod", "--move-tags", "--to", str(tmp_path / "dst"), bank=src)
    assert report["tags"] == ["prod"]
    with wb.open(src, create=False) as a, wb.open(tmp_path / "dst", create=False) as b:
        assert b.resolve("prod") == a.resolve("prod")
