"""``weightbank upgrade``, ``repair-index``, ``compact`` and ``verify --fix``, and a damaged catalog index at the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

import weightbank as wb
from weightbank.bank.index.gc import PAGE_GRACE
from weightbank.cli.exitcodes import CORRUPT

from .test_cli import as_json, fails, ok, run, state

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.fixture
def bank_dir(tmp_path: Path) -> Path:
    """Run ``r``, steps 1-4, tagged ``best`` at step 2; nothing compacted yet."""
    path = tmp_path / "bank"
    with wb.open(path) as bank:
        for step in (1, 2, 3, 4):
            bank.save(state(step), run="r", step=step, metrics={"loss": 1.0 / step})
        bank.tag("best", "r@2")
    return path


@pytest.fixture
def legacy(tmp_path: Path) -> Path:
    """A copy of the format-1 bank weightbank 0.1 wrote (tests/data/make_legacy_bank.py)."""
    return Path(shutil.copytree(DATA / "legacy_v1_bank", tmp_path / "legacy"))


def damage_newest_root(bank: Path) -> Path:
    root = sorted((bank / "index" / "roots").iterdir())[-1]
    data = bytearray(root.read_bytes())
    data[len(data) // 2] ^= 0xFF
    root.write_bytes(bytes(data))
    return root


def flat(text: str) -> str:
    """Output with rich's line wrapping undone (a long temporary path wraps at 120 columns)."""
    return " ".join(text.split())


def one_warning(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


# -- upgrade ------------------------------------------------------------------------------------
def test_upgrade_a_legacy_bank(legacy: Path) -> None:
    expected = json.loads((DATA / "legacy_v1_expected.json").read_text())
    before = run("log", "--json", bank=legacy)
    assert before.exit_code == 0 and before.stderr == ""  # a format-1 bank is read by listing, no warning
    assert json.loads((legacy / "weightbank.json").read_text())["version"] == 1

    out = flat(ok("upgrade", bank=legacy).stdout)
    assert out.startswith(f"upgraded {legacy} to bank format 3") and "older weightbank releases refuse" in out
    assert json.loads((legacy / "weightbank.json").read_text())["version"] == 3
    assert list((legacy / "index" / "roots").iterdir())

    assert as_json("upgrade", bank=legacy) == {"url": str(legacy), "upgraded": False, "format": 3}
    assert flat(ok("upgrade", bank=legacy).stdout).endswith("nothing to upgrade")
    after = run("log", "--json", bank=legacy)
    assert after.stderr == "" and json.loads(after.stdout) == json.loads(before.stdout)
    assert as_json("show", "prod", bank=legacy)["info"]["id"] == expected["prod"]
    assert as_json("verify", bank=legacy)["ok"] is True


def test_upgrade_json_on_a_legacy_bank(legacy: Path) -> None:
    assert as_json("upgrade", bank=legacy) == {"url": str(legacy), "upgraded": True, "format": 3}


def test_upgrade_needs_a_bank(tmp_path: Path) -> None:
    assert "is not a weightbank bank" in fails(3, "upgrade", bank=tmp_path / "nope")
    assert not (tmp_path / "nope").exists()


# -- compact and repair-index -------------------------------------------------------------------
def test_compact_folds_pending_entries_once(bank_dir: Path) -> None:
    assert as_json("compact", bank=bank_dir) == {"gen": 1, "folded": 4, "held": 0, "dropped": 0}
    assert ok("compact", bank=bank_dir).stdout.startswith("nothing to compact")
    assert as_json("compact", bank=bank_dir)["gen"] == 0
    with wb.open(bank_dir, create=False) as b:
        b.save(state(5), run="r", step=5)
    out = flat(ok("compact", bank=bank_dir).stdout)
    assert out == "folded 1 pending catalog entry into index snapshot 2"
    assert [c["step"] for c in as_json("log", bank=bank_dir)] == [5, 4, 3, 2, 1]


def test_repair_index_rebuilds_from_the_manifests(bank_dir: Path) -> None:
    done = as_json("repair-index", bank=bank_dir)
    assert done == {"gen": 1, "folded": 4, "held": 0, "dropped": 0}
    out = flat(ok("repair-index", bank=bank_dir).stdout)
    assert out == "rebuilt the catalog index from the manifests: 4 checkpoint(s) in index snapshot 2"
    rows = as_json("log", bank=bank_dir)
    assert [c["step"] for c in rows] == [4, 3, 2, 1] and rows[2]["tags"] == ["best"]


def test_gc_reports_index_pages_it_removed(bank_dir: Path) -> None:
    with wb.open(bank_dir, create=False) as b:
        for step in (5, 6, 7, 8):
            b.save(state(step), run="r", step=step)
            b.compact()
    # Pages younger than PAGE_GRACE stay whatever gc's grace (a compaction may not have published yet).
    old = time.time() - 2 * PAGE_GRACE
    for page in (bank_dir / "index" / "pages").rglob("*.zst"):
        os.utime(page, (old, old))
    assert "catalog index page(s)" in ok("gc", "--grace", "0", bank=bank_dir).stdout
    assert as_json("gc", "--grace", "0", bank=bank_dir)["index_pages_deleted"] == 0  # nothing left to remove


# -- a damaged index ----------------------------------------------------------------------------
def test_a_damaged_index_is_one_warning_line_and_still_answers(bank_dir: Path) -> None:
    ok("compact", bank=bank_dir)
    rows = as_json("log", bank=bank_dir)
    root = damage_newest_root(bank_dir)

    result = run("log", "--json", bank=bank_dir)
    assert result.exit_code == 0 and json.loads(result.stdout) == rows
    line = one_warning(result.stderr)
    assert root.name in line and "repair-index" in line
    result = run("log", "-n", "2", bank=bank_dir)
    assert result.exit_code == 0 and rows[0]["short_id"] in result.stdout
    one_warning(result.stderr)
    result = run("show", "best", "--json", bank=bank_dir)
    assert result.exit_code == 0 and json.loads(result.stdout)["info"]["step"] == 2

    report = json.loads(run("verify", "--json", bank=bank_dir).stdout)
    assert report["ok"] is False and [p["kind"] for p in report["problems"]] == ["index"]
    assert report["problems"][0]["key"] == f"index/roots/{root.name}"
    assert run("verify", bank=bank_dir).exit_code == CORRUPT
    # compact folds into the newest root, which it cannot read: one error line, exit code 4.
    assert root.name in fails(CORRUPT, "compact", bank=bank_dir)

    result = run("verify", "--fix", bank=bank_dir)
    assert result.exit_code == 0, result.output
    first, rebuilt, second = flat(result.stdout).partition("rebuilt the catalog index")
    assert first.startswith("FAILED") and "index" in first and rebuilt
    assert "4 checkpoint(s) in index snapshot" in second and " ok: 4 checkpoint(s)" in second
    one_warning(result.stderr)
    clean = run("log", "--json", bank=bank_dir)
    assert clean.stderr == "" and json.loads(clean.stdout) == rows


def test_verify_fix_json_on_a_damaged_index(bank_dir: Path) -> None:
    ok("compact", bank=bank_dir)
    damage_newest_root(bank_dir)
    result = run("verify", "--fix", "--json", bank=bank_dir)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["before"]["ok"] is False and doc["before"]["problems"][0]["kind"] == "index"
    assert doc["repair"]["gen"] > 0 and doc["repair"]["folded"] == 4
    assert doc["after"]["ok"] is True and doc["after"]["problems"] == []
    one_warning(result.stderr)


def test_repair_index_json_on_a_damaged_index(bank_dir: Path) -> None:
    ok("compact", bank=bank_dir)
    damage_newest_root(bank_dir)
    result = run("repair-index", "--json", bank=bank_dir)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["folded"] == 4
    assert as_json("verify", bank=bank_dir)["ok"] is True


def test_a_damaged_index_in_a_real_process(bank_dir: Path) -> None:
    ok("compact", bank=bank_dir)
    damage_newest_root(bank_dir)
    cmd = [sys.executable, "-c", "from weightbank.cli.main import main; main()"]
    proc = subprocess.run(
        [*cmd, "log", "--json", "--bank", str(bank_dir)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0 and len(json.loads(proc.stdout)) == 4
    assert "IndexFallbackWarning" not in proc.stderr
    assert "repair-index" in one_warning(proc.stderr)


def test_verify_fix_rebuilds_past_a_damaged_manifest_and_still_reports_it(bank_dir: Path) -> None:
    ok("compact", bank=bank_dir)
    damage_newest_root(bank_dir)
    manifest = sorted((bank_dir / "manifests").rglob("*.json"))[0]
    data = bytearray(manifest.read_bytes())
    data[len(data) // 2] ^= 0xFF
    manifest.write_bytes(bytes(data))
    result = run("verify", "--fix", bank=bank_dir)
    # The index is rebuilt without the unreadable manifest; verify goes on naming that manifest.
    assert result.exit_code == CORRUPT and flat(result.stdout).startswith("FAILED")
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("warning: ") and len(lines) == 1, result.stderr
    again = run("verify", bank=bank_dir)
    assert again.exit_code == CORRUPT and "warning" not in again.stderr
    assert "Traceback" not in result.output
