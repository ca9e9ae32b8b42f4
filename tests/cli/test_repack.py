"""``weightbank repack``: its text, its JSON, ``--dry-run``, ``--min-dead`` and its error lines."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import weightbank as wb
from weightbank.bank.marker import bank_version
from weightbank.cli.exitcodes import NOT_FOUND, USAGE

from .test_cli import as_json, fails, ok, run

DATA = Path(__file__).resolve().parents[1] / "data"
PAIRS = 3
ELEMENTS = 16384  # 64 KiB of float32: one raw chunk


def noise(seed: int) -> torch.Tensor:
    return torch.randn(ELEMENTS, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def bank_dir(tmp_path: Path) -> Path:
    """Run ``slim`` (steps 0-2) whose every pack is half dead: the ``train`` run that wrote them
    (each ``keep`` next to a ``drop``) is deleted and collected; ``prod`` tags slim@2."""
    path = tmp_path / "bank"
    with wb.open(path) as bank:
        for s in range(PAIRS):
            bank.save({"keep": noise(s), "drop": noise(100 + s)}, run="train", step=s, codec="raw")
            bank.save({"keep": noise(s)}, run="slim", step=s, codec="raw")
        bank.tag("prod", "slim@2")
        for info in bank.log("train"):
            bank.delete(info.id)
        bank.gc(grace=0)
    return path


@pytest.fixture
def legacy(tmp_path: Path) -> Path:
    """A copy of the format-1 bank weightbank 0.1 wrote (tests/data/make_legacy_bank.py)."""
    return Path(shutil.copytree(DATA / "legacy_v1_bank", tmp_path / "legacy"))


def files(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            st = Path(dirpath, name).stat()
            out[str(Path(dirpath, name).relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


def pack_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path / "packs").rglob("*.pack"))


def flat(text: str) -> str:
    """Output with rich's line wrapping undone."""
    return " ".join(text.split())


def loads_all(path: Path) -> None:
    with wb.open(path, create=False) as bank:
        for s in range(PAIRS):
            assert torch.equal(bank.load(f"slim@{s}")["keep"], noise(s))


REPORT_KEYS = {
    "packs_rewritten",
    "bytes_before",
    "bytes_copied",
    "packs_written",
    "manifests_rewritten",
    "packs_pinned",
    "dry_run",
    "seconds",
    "recoded",
    "recode_written",
}


def test_repack_dry_run_writes_nothing(bank_dir: Path) -> None:
    before = files(bank_dir)
    result = ok("repack", "--dry-run", bank=bank_dir)
    assert result.stderr == ""
    assert files(bank_dir) == before
    report = as_json("repack", "--dry-run", bank=bank_dir)
    assert set(report) == REPORT_KEYS
    assert report["dry_run"] is True and report["packs_written"] == [] and report["manifests_rewritten"] == 0
    assert report["bytes_before"] == 2 * report["bytes_copied"] == 2 * PAIRS * ELEMENTS * 4
    assert files(bank_dir) == before


def test_repack_dry_run_says_what_it_would_rewrite(bank_dir: Path) -> None:
    out = flat(ok("repack", "--dry-run", bank=bank_dir).stdout)
    assert out.startswith(f"would rewrite {PAIRS} pack(s) (384.0 KiB), keeping 192.0 KiB of live chunks"), out
    assert len(as_json("repack", "--dry-run", bank=bank_dir)["packs_rewritten"]) == PAIRS


def test_repack_then_gc_frees_the_dead_half(bank_dir: Path) -> None:
    log_before = as_json("log", bank=bank_dir)
    size_before = pack_bytes(bank_dir)
    out = flat(ok("repack", bank=bank_dir).stdout)
    assert out.startswith(
        f"rewrote {PAIRS} pack(s) (384.0 KiB) into 1 new pack(s) (192.0 KiB of live chunks)"
        f" and moved {PAIRS} manifest(s); ids unchanged"
    ), out
    assert "the next `weightbank gc` frees 192.0 KiB once the old packs are past the grace period" in out
    assert pack_bytes(bank_dir) == size_before + size_before // 2  # old packs kept until gc
    assert as_json("log", bank=bank_dir) == log_before
    ok("gc", "--grace", "0", bank=bank_dir)
    assert pack_bytes(bank_dir) == size_before // 2
    assert as_json("log", bank=bank_dir) == log_before
    assert as_json("verify", bank=bank_dir)["ok"] is True
    loads_all(bank_dir)
    assert flat(ok("repack", bank=bank_dir).stdout) == "nothing to repack: no pack is dead enough"


def test_repack_json(bank_dir: Path) -> None:
    report = as_json("repack", bank=bank_dir)
    assert set(report) == REPORT_KEYS
    assert report["dry_run"] is False
    assert len(report["packs_rewritten"]) == PAIRS and len(report["packs_written"]) == 1
    assert all(p.startswith("packs/") and p.endswith(".pack") for p in report["packs_rewritten"])
    assert report["bytes_before"] == 2 * report["bytes_copied"] == 2 * PAIRS * ELEMENTS * 4
    assert report["manifests_rewritten"] == PAIRS and report["packs_pinned"] == 0
    assert isinstance(report["seconds"], float) and report["seconds"] >= 0
    again = as_json("repack", bank=bank_dir)
    assert again["packs_rewritten"] == [] and again["manifests_rewritten"] == 0
    loads_all(bank_dir)


def test_repack_min_dead(bank_dir: Path) -> None:
    assert as_json("repack", "--min-dead", "0.6", bank=bank_dir)["packs_rewritten"] == []
    assert len(as_json("repack", "--min-dead", "0.5", bank=bank_dir)["packs_rewritten"]) == PAIRS


@pytest.mark.parametrize("share", ["0", "-1", "1.5", "-0.2", "nan", "inf"])
def test_repack_refuses_a_min_dead_out_of_range(bank_dir: Path, share: str) -> None:
    before = files(bank_dir)
    for extra in ([], ["--dry-run"]):
        line = fails(USAGE, "repack", *extra, "--min-dead", share, bank=bank_dir)
        assert "min_dead" in line and "(0, 1]" in line, line
    assert files(bank_dir) == before


def test_repack_refuses_a_min_dead_that_is_not_a_number(bank_dir: Path) -> None:
    result = run("repack", "--min-dead", "half", bank=bank_dir)
    assert result.exit_code == USAGE
    assert "Traceback" not in result.output


def test_repack_never_creates_a_bank(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    line = fails(NOT_FOUND, "repack", bank=missing)
    assert "is not a weightbank bank" in line
    assert not missing.exists()


def test_repack_a_legacy_bank_pins_its_packs(legacy: Path) -> None:
    before = files(legacy)
    out = flat(ok("repack", "--dry-run", "--min-dead", "0.005", bank=legacy).stdout)
    assert "are used by format-1/2 manifests and stay" in out, out
    assert files(legacy) == before
    with wb.open(legacy, create=False) as bank:
        assert bank_version(bank.storage) == 1, "a dry run does not upgrade the bank"
    report = as_json("repack", "--min-dead", "0.005", bank=legacy)
    assert report["packs_rewritten"] == [] and report["packs_pinned"] >= 1
    assert as_json("verify", bank=legacy)["ok"] is True


def test_repack_in_a_real_process(bank_dir: Path) -> None:
    cmd = [sys.executable, "-c", "from weightbank.cli.main import main; main()"]
    proc = subprocess.run(
        [*cmd, "repack", "--json", "--bank", str(bank_dir)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["manifests_rewritten"] == PAIRS
    bad = subprocess.run(
        [*cmd, "repack", "--min-dead", "0", "--bank", str(bank_dir)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == USAGE
    lines = bad.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "min_dead" in lines[0], bad.stderr
    loads_all(bank_dir)


def _chain_bank(path: Path) -> list[torch.Tensor]:
    """Run ``r``: three saves of a 1 MiB tensor changing in a few values, coded as a delta chain."""
    states = [torch.randn(1 << 18, generator=torch.Generator().manual_seed(5))]
    for _ in range(2):
        states.append(states[-1].clone())
        states[-1][:100] += 1
    with wb.open(path) as bank:
        for s, w in enumerate(states):
            bank.save({"w": w}, run="r", step=s)
    return states


def test_repack_keyframe_turns_the_chain_around(tmp_path: Path) -> None:
    states = _chain_bank(tmp_path / "bank")
    ids = [i.id for i in wb.open(tmp_path / "bank", create=False).log("r")]
    dry = flat(ok("repack", "--dry-run", "--keyframe", "r@latest", bank=tmp_path / "bank").stdout)
    assert "would re-code up to 3 checkpoint(s)" in dry, dry
    report = as_json("repack", "-k", "r@latest", bank=tmp_path / "bank")
    assert report["recoded"] == 3 and report["recode_written"] > 0
    with wb.open(tmp_path / "bank", create=False) as bank:
        assert [i.id for i in bank.log("r")] == ids
        assert [c.codec for c in bank.checkpoint("r@latest").manifest.chunks] == ["planes"]
        for s, w in enumerate(states):
            assert torch.equal(bank.load(f"r@{s}")["w"], w)
    again = flat(ok("repack", "--keyframe", "r@latest", bank=tmp_path / "bank").stdout)
    assert again == "nothing to repack: no pack is dead enough", again


def test_repack_keyframe_of_an_unknown_ref_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    _chain_bank(tmp_path / "bank")
    before = files(tmp_path / "bank")
    line = fails(NOT_FOUND, "repack", "--keyframe", "nope", bank=tmp_path / "bank")
    assert "nope" in line, line
    assert files(tmp_path / "bank") == before


def test_rekey_makes_the_newest_a_keyframe_and_gc_frees_what_it_replaced(tmp_path: Path) -> None:
    states = _chain_bank(tmp_path / "bank")
    before = pack_bytes(tmp_path / "bank")
    out = flat(ok("rekey", "r@latest", bank=tmp_path / "bank").stdout)
    assert "now loads with no delta chain; re-coded 3 checkpoint(s)" in out, out
    with wb.open(tmp_path / "bank", create=False) as bank:
        assert [c.codec for c in bank.checkpoint("r@latest").manifest.chunks] == ["planes"]
        for s, w in enumerate(states):
            assert torch.equal(bank.load(f"r@{s}")["w"], w)
    again = as_json("rekey", "r@latest", bank=tmp_path / "bank")
    assert again["chunks_written"] == 0 and again["window"][0] == again["keyframe"]
    ok("gc", "--grace", "0", bank=tmp_path / "bank")
    assert pack_bytes(tmp_path / "bank") <= before * 1.05
    with wb.open(tmp_path / "bank", create=False) as bank:
        assert all(torch.equal(bank.load(f"r@{s}")["w"], w) for s, w in enumerate(states))
        assert bank.verify().problems == ()


def test_rekey_of_an_unknown_ref_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    _chain_bank(tmp_path / "bank")
    before = files(tmp_path / "bank")
    line = fails(NOT_FOUND, "rekey", "nope", bank=tmp_path / "bank")
    assert "nope" in line, line
    assert files(tmp_path / "bank") == before
