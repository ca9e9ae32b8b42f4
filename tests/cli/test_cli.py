"""The ``weightbank`` command: every subcommand on a small bank, its JSON, and its error lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner, Result

import weightbank as wb
from weightbank.cli.exitcodes import CORRUPT, FAILURE, NOT_FOUND, USAGE
from weightbank.cli.graph import layout
from weightbank.cli.main import app
from weightbank.cli.render import human_bytes, jsonable

runner = CliRunner()


def run(*args: str, bank: Path | str | None = None) -> Result:
    argv = list(args) + (["--bank", str(bank)] if bank is not None else [])
    return runner.invoke(app, argv, catch_exceptions=False)


def ok(*args: str, bank: Path | str | None = None) -> Result:
    result = run(*args, bank=bank)
    assert result.exit_code == 0, (result.exit_code, result.output)
    return result


def as_json(*args: str, bank: Path | str | None = None) -> Any:
    return json.loads(ok(*args, "--json", bank=bank).stdout)


def fails(code: int, *args: str, bank: Path | str | None = None) -> str:
    """Run a command that must fail with ``code`` and one ``error:`` line on stderr; return that line."""
    result = run(*args, bank=bank)
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    return lines[0]


def state(step: int, frozen: float = 1.0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    return {
        "embed.weight": torch.full((64, 16), frozen),
        "layer.weight": torch.randn(16, 16, generator=g),
        "layer.bias": torch.randn(16, generator=g),
    }


@pytest.fixture
def bank_dir(tmp_path: Path) -> Path:
    """Run ``r`` (steps 1-3, only ``layer.*`` changes) and run ``ft`` branching off ``r@2``."""
    path = tmp_path / "bank"
    with wb.open(path) as bank:
        for step in (1, 2, 3):
            bank.save(state(step), run="r", step=step, metrics={"loss": 1.0 / step}, message=f"step {step}")
        bank.save(state(10), run="ft", step=1, parent="r@2", metrics={"loss": 0.2}, tags=["cand"])
    return path


# -- basics -------------------------------------------------------------------------------------
def test_help_lists_commands_and_exit_codes() -> None:
    out = ok("--help").stdout
    for cmd in (
        "init",
        "save",
        "log",
        "show",
        "diff",
        "tag",
        "rollback",
        "verify",
        "gc",
        "prune",
        "du",
        "upgrade",
        "repair-index",
        "compact",
        "repack",
        "copy",
        "demo",
    ):
        assert cmd in out
    assert "Exit codes" in out
    assert ok("--version").stdout.strip() == f"weightbank {wb.__version__}"


def test_init_creates_a_bank_once(tmp_path: Path) -> None:
    path = tmp_path / "new"
    assert "initialized" in ok("init", bank=path).stdout
    assert (path / "weightbank.json").is_file()
    assert "already a bank" in ok("init", bank=path).stdout


def test_init_refuses_a_directory_that_is_not_a_bank(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    line = fails(NOT_FOUND, "init", bank=tmp_path)
    assert "is not a weightbank bank" in line
    assert not (tmp_path / "weightbank.json").exists()


def test_read_commands_never_create_a_bank(tmp_path: Path) -> None:
    missing = tmp_path / "nope"
    for args in (["log"], ["tags"], ["du"], ["verify"], ["gc"], ["show", "x"]):
        line = fails(NOT_FOUND, *args, bank=missing)
        assert "is not a weightbank bank" in line and "weightbank init" in line
    assert not missing.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    fails(NOT_FOUND, "log", bank=empty)
    assert list(empty.iterdir()) == []
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert "it is a file" in fails(NOT_FOUND, "log", bank=a_file)
    assert "it is a file" in fails(NOT_FOUND, "init", bank=a_file)


def test_bank_from_environment(bank_dir: Path) -> None:
    result = runner.invoke(app, ["log", "--json"], env={"WEIGHTBANK_BANK": str(bank_dir)})
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)) == 4


# -- save / import / export ----------------------------------------------------------------------
def test_save_from_safetensors_with_metadata(tmp_path: Path) -> None:
    src = tmp_path / "w.safetensors"
    save_file(state(1), str(src))
    bank = tmp_path / "bank"
    info = as_json(
        "save", str(src), "--run", "r", "--step", "7", "--tag", "a", "--tag", "b", "--message", "hi",
        "--metric", "loss=0.5", "--metric", "note=fine", "--config-json", '{"lr": 0.1}',
        bank=bank,
    )  # fmt: skip
    assert (info["run"], info["step"], info["tags"], info["message"]) == ("r", 7, ["a", "b"], "hi")
    assert info["metrics"] == {"loss": 0.5, "note": "fine"}
    assert info["config"] == {"lr": 0.1}
    assert info["save_stats"]["written_bytes"] > 0
    assert "saved" in ok("save", str(src), "--run", "r", "--step", "8", bank=bank).stdout
    with wb.open(bank) as b:
        assert torch.equal(b.load("r@7")["layer.weight"], state(1)["layer.weight"])
        assert b.log("r")[0].parent == info["id"]


def test_save_config_file_and_parent(tmp_path: Path, bank_dir: Path) -> None:
    src = tmp_path / "w.pt"
    torch.save(state(5), src)
    cfg = tmp_path / "cfg.json"
    cfg.write_text('{"layers": 2}')
    info = as_json("save", str(src), "--run", "new", "--config", str(cfg), "--parent", "r@1", bank=bank_dir)
    with wb.open(bank_dir) as b:
        assert info["parent"] == b.resolve("r@1")
    assert info["config"] == {"layers": 2}


def test_save_bad_inputs(tmp_path: Path) -> None:
    src = tmp_path / "w.pt"
    torch.save(state(1), src)
    assert "no such file" in fails(NOT_FOUND, "save", str(tmp_path / "missing.pt"), bank=tmp_path / "b")
    fails(USAGE, "save", str(src), "--metric", "oops", bank=tmp_path / "b")
    fails(USAGE, "save", str(src), "--config-json", "[1, 2]", bank=tmp_path / "b")
    fails(USAGE, "save", str(src), "--config-json", "{", bank=tmp_path / "b")
    fails(USAGE, "save", str(src), "--tag", "../x", bank=tmp_path / "b")
    fails(USAGE, "save", str(src), "--run", "a b", bank=tmp_path / "b")


def test_import_and_export_round_trip(tmp_path: Path, bank_dir: Path) -> None:
    src = tmp_path / "in.pt"
    torch.save(state(4), src)
    info = as_json("import", str(src), "--run", "imp", "--step", "1", "--tag", "ext", bank=bank_dir)
    assert info["tags"] == ["ext"] and info["run"] == "imp"

    out = tmp_path / "out.safetensors"
    assert "exported" in ok("export", "ext", str(out), bank=bank_dir).stdout
    assert torch.equal(load_file(str(out))["layer.bias"], state(4)["layer.bias"])
    fails(USAGE, "export", "ext", str(out), bank=bank_dir)  # exists: needs --force
    ok("export", "ext", str(out), "--force", "--select", "layer.*", bank=bank_dir)
    assert sorted(load_file(str(out))) == ["layer.bias", "layer.weight"]
    pt = tmp_path / "out.pt"
    ok("export", "r@1", str(pt), bank=bank_dir)
    assert torch.equal(torch.load(pt, weights_only=True)["layer.weight"], state(1)["layer.weight"])
    fails(NOT_FOUND, "export", "nope", str(tmp_path / "x.pt"), bank=bank_dir)


# -- inspection ---------------------------------------------------------------------------------
def test_log_table_json_and_run_filter(bank_dir: Path) -> None:
    rows = as_json("log", bank=bank_dir)
    assert [(r["run"], r["step"]) for r in rows] == [("ft", 1), ("r", 3), ("r", 2), ("r", 1)]
    assert rows[0]["tags"] == ["cand"] and len(rows[0]["short_id"]) == 12
    assert [r["step"] for r in as_json("log", "r", bank=bank_dir)] == [3, 2, 1]
    assert len(as_json("log", "--limit", "2", bank=bank_dir)) == 2
    out = ok("log", bank=bank_dir).stdout
    assert rows[0]["short_id"] in out and "cand" in out and "ft@1" in out
    assert ok("ls", bank=bank_dir).stdout == out
    assert "no run 'zz'" in fails(NOT_FOUND, "log", "zz", bank=bank_dir)


def test_log_limit_is_passed_to_the_library(bank_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    everything, in_run = as_json("log", bank=bank_dir), as_json("log", "r", bank=bank_dir)
    calls: list[tuple[str | None, int | None]] = []
    real = wb.Bank.log

    def spy(self: wb.Bank, run: str | None = None, *, limit: int | None = None) -> list[wb.CheckpointInfo]:
        calls.append((run, limit))
        return real(self, run, limit=limit)

    monkeypatch.setattr(wb.Bank, "log", spy)
    assert as_json("log", "-n", "2", bank=bank_dir) == everything[:2]
    assert as_json("log", "r", "--limit", "1", bank=bank_dir) == in_run[:1]
    out = ok("log", "-n", "3", bank=bank_dir).stdout
    assert all(c["short_id"] in out for c in everything[:3]) and everything[3]["short_id"] not in out
    assert calls == [(None, 2), ("r", 1), (None, 3)]


def test_log_graph_shows_a_branch_across_runs(bank_dir: Path) -> None:
    out = ok("log", "--graph", bank=bank_dir).stdout
    lines = out.splitlines()
    assert len(lines) == 5  # four checkpoints and one join row
    assert any("├─┘" in line for line in lines)
    assert "← from r@2" in out and "(cand)" in out
    # Filtered to one run, the parent in the other run is still named.
    assert "← from " in ok("log", "ft", "--graph", bank=bank_dir).stdout


def test_graph_layout_orders_children_before_parents() -> None:
    # The child's clock says it is older than its parent: it is still drawn above it.
    rows = layout([("p", None, 5.0), ("c", "p", 1.0)])
    assert [cid for _, cid in rows] == ["c", "p"]
    rows = layout([("a", None, 1.0), ("b", "a", 2.0), ("c", "a", 3.0), ("d", "a", 4.0), ("x", None, 2.5)])
    assert rows == [
        ("●", "d"),
        ("│ ●", "c"),
        ("│ │ ●", "x"),
        ("│ │ ●", "b"),
        ("├─┴─┘", None),
        ("●", "a"),
    ]


def test_show(bank_dir: Path) -> None:
    detail = as_json("show", "cand", bank=bank_dir)
    assert detail["info"]["run"] == "ft" and detail["info"]["tags"] == ["cand"]
    assert {t["name"] for t in detail["tensors"]} == {"embed.weight", "layer.weight", "layer.bias"}
    assert all(
        {"dtype", "shape", "nbytes", "stored_bytes", "codecs", "alias_of"} <= set(t)
        for t in detail["tensors"]
    )
    out = ok("show", "cand", bank=bank_dir).stdout
    for word in ("layer.weight", "float32", "16×16", "r@2", "loss", "env"):
        assert word in out
    assert "r@3" in ok("show", "r@latest", bank=bank_dir).stdout
    assert "r@2" in ok("show", "r@best:loss~1", bank=bank_dir).stdout.splitlines()[1]


def test_diff(bank_dir: Path) -> None:
    result = as_json("diff", "r@1", "r@2", bank=bank_dir)
    status = {t["name"]: t["status"] for t in result["tensors"]}
    assert status == {"embed.weight": "same", "layer.weight": "changed", "layer.bias": "changed"}
    changed = next(t for t in result["tensors"] if t["name"] == "layer.weight")
    assert changed["max_abs"] > 0 and changed["rel_l2"] > 0
    assert result["differing_bytes"] == (16 * 16 + 16) * 4
    assert result["metrics"] == {"loss": [1.0, 0.5]}
    out = ok("diff", "r@1", "r@2", bank=bank_dir).stdout
    assert "changed" in out and "embed.weight" not in out and "1 unchanged" in out
    assert "embed.weight" in ok("diff", "r@1", "r@2", "--all", bank=bank_dir).stdout


def test_du(bank_dir: Path) -> None:
    report = as_json("du", bank=bank_dir)
    assert report["checkpoints"] == 4
    assert report["logical_bytes"] > report["unique_bytes"]  # the embedding is stored once
    assert report["dedup_ratio"] > 1
    assert sum(report["per_codec"].values()) == report["stored_bytes"]
    out = ok("du", bank=bank_dir).stdout
    assert "dedup ratio" in out and human_bytes(report["logical_bytes"]) in out


# -- tags ---------------------------------------------------------------------------------------
def test_tag_untag_rollback_and_history(bank_dir: Path) -> None:
    with wb.open(bank_dir) as b:
        r1, r2 = b.resolve("r@1"), b.resolve("r@2")
    event = as_json("tag", "prod", "r@1", "--why", "first", bank=bank_dir)
    assert (event["old"], event["new"], event["why"]) == (None, r1, "first")
    assert "prod" in ok("tag", "prod", "r@2", "--expect", r1[:8], bank=bank_dir).stdout
    fails(FAILURE, "tag", "prod", "r@3", "--expect", r1[:8], bank=bank_dir)  # moved meanwhile
    fails(FAILURE, "tag", "prod", "r@3", "--expect", "none", bank=bank_dir)  # exists already
    ok("tag", "fresh", "r@3", "--expect", "none", bank=bank_dir)

    tags = {t["name"]: t["target"] for t in as_json("tags", bank=bank_dir)}
    assert set(tags) == {"cand", "prod", "fresh"} and tags["prod"] == r2
    assert "prod" in ok("tags", bank=bank_dir).stdout

    assert as_json("rollback", "prod", bank=bank_dir)["new"] == r1
    fails(NOT_FOUND, "rollback", "prod", bank=bank_dir)  # nothing before r@1
    assert as_json("untag", "prod", bank=bank_dir)["new"] is None
    assert "prod" not in {t["name"] for t in as_json("tags", bank=bank_dir)}
    assert "was removed" in fails(NOT_FOUND, "show", "prod", bank=bank_dir)
    assert as_json("rollback", "prod", bank=bank_dir)["new"] == r1  # untag is undone

    history = as_json("tags", "--history", "prod", bank=bank_dir)
    assert [e["action"] for e in history] == ["set", "set", "rollback", "untag", "rollback"]
    assert as_json("tags", "prod", bank=bank_dir) == history
    everything = as_json("tags", "--history", bank=bank_dir)
    assert {e["tag"] for e in everything} == {"cand", "prod", "fresh"}
    assert "rollback" in ok("tags", "--history", bank=bank_dir).stdout
    fails(NOT_FOUND, "tags", "--history", "nope", bank=bank_dir)


def test_tag_at_previous_target_ref(bank_dir: Path) -> None:
    ok("tag", "prod", "r@1", bank=bank_dir)
    ok("tag", "prod", "r@3", bank=bank_dir)
    assert as_json("show", "prod@{1}", bank=bank_dir)["info"]["step"] == 1
    diff = as_json("diff", "prod", "prod@{1}", bank=bank_dir)
    assert diff["b"] == as_json("show", "r@1", bank=bank_dir)["info"]["id"]


# -- maintenance --------------------------------------------------------------------------------
def test_verify_ok_then_corrupt(bank_dir: Path) -> None:
    report = as_json("verify", bank=bank_dir)
    assert report["ok"] is True and report["checkpoints"] == 4
    assert ok("verify", "cand", bank=bank_dir).stdout.startswith("ok")
    pack = next((bank_dir / "packs").rglob("*.pack"))
    data = bytearray(pack.read_bytes())
    data[0] ^= 0xFF
    pack.write_bytes(bytes(data))
    result = run("verify", bank=bank_dir)
    assert result.exit_code == CORRUPT and "FAILED" in result.stdout and "corrupt" in result.stdout
    bad = json.loads(run("verify", "--json", bank=bank_dir).stdout)
    assert bad["ok"] is False and bad["problems"][0]["kind"] == "corrupt"
    assert ok("verify", "--quick", bank=bank_dir).stdout.startswith("ok")  # sizes are still right
    # Reading a damaged checkpoint is one line and exit code 4, not a traceback.
    cid = bad["problems"][0]["checkpoint"]
    assert "corrupt" in fails(CORRUPT, "export", cid, str(bank_dir.parent / "x.pt"), bank=bank_dir)
    assert not (bank_dir.parent / "x.pt").exists()


def test_verify_fix_with_nothing_to_fix(bank_dir: Path) -> None:
    out = ok("verify", "--fix", bank=bank_dir).stdout
    assert out.startswith("ok") and "rebuilt" not in out and "--fix" not in out
    doc = as_json("verify", "--fix", bank=bank_dir)
    assert doc["repair"] is None and doc["before"] == doc["after"] and doc["after"]["ok"] is True
    # A damaged pack is not the index's to repair: --fix says so and the exit code stays 4.
    pack = next((bank_dir / "packs").rglob("*.pack"))
    data = bytearray(pack.read_bytes())
    data[0] ^= 0xFF
    pack.write_bytes(bytes(data))
    result = run("verify", "--fix", bank=bank_dir)
    assert result.exit_code == CORRUPT and "FAILED" in result.stdout
    assert "nothing for --fix to repair" in result.stdout and "rebuilt" not in result.stdout
    bad = json.loads(run("verify", "--fix", "--json", bank=bank_dir).stdout)
    assert bad["repair"] is None and bad["after"]["ok"] is False
    assert [p["kind"] for p in bad["after"]["problems"]] == ["corrupt"]


def test_prune_is_a_dry_run_unless_yes(bank_dir: Path) -> None:
    dry = as_json("prune", "--keep-last", "1", bank=bank_dir)
    assert dry["dry_run"] is True and len(dry["deleted"]) == 2  # r@1 and r@2 (ft@1 is tagged and newest)
    assert dry["bytes_freed"] > 0
    out = ok("prune", "--keep-last", "1", bank=bank_dir).stdout
    assert "would delete 2" in out and "--yes" in out
    assert len(as_json("log", bank=bank_dir)) == 4  # nothing deleted

    done = as_json("prune", "--keep-last", "1", "--yes", bank=bank_dir)
    assert done["dry_run"] is False and sorted(done["deleted"]) == sorted(dry["deleted"])
    assert [(c["run"], c["step"]) for c in as_json("log", bank=bank_dir)] == [("ft", 1), ("r", 3)]
    assert "deleted 0 checkpoint(s)" in ok("prune", "--keep-last", "1", "--yes", bank=bank_dir).stdout

    preview = as_json("gc", "--grace", "0", "--dry-run", bank=bank_dir)
    assert preview["dry_run"] is True and preview["bytes_freed"] > 0
    gc = as_json("gc", "--grace", "0", bank=bank_dir)
    assert gc["bytes_freed"] == preview["bytes_freed"]
    assert "removed" in ok("gc", "--grace", "0s", bank=bank_dir).stdout
    assert as_json("verify", bank=bank_dir)["ok"] is True


def test_prune_rules_and_bad_values(bank_dir: Path) -> None:
    best = as_json("prune", "--keep-best", "loss:1", "--run", "r", bank=bank_dir)
    with wb.open(bank_dir) as b:
        assert b.resolve("r@3") in best["kept"]
    assert len(as_json("prune", "--keep-every", "2", "--run", "r", bank=bank_dir)["kept"]) == 1
    assert as_json("prune", "--older-than", "7d", bank=bank_dir)["deleted"] == []
    assert "at least one rule" in fails(USAGE, "prune", bank=bank_dir)
    assert "--keep-best" in fails(USAGE, "prune", "--keep-best", "loss", bank=bank_dir)
    fails(USAGE, "prune", "--older-than", "soon", bank=bank_dir)
    fails(USAGE, "gc", "--grace", "-1", bank=bank_dir)
    fails(USAGE, "prune", "--keep-last", "-1", bank=bank_dir)
    assert len(as_json("log", bank=bank_dir)) == 4


# -- errors -------------------------------------------------------------------------------------
def test_user_errors_are_one_line_with_their_exit_code(bank_dir: Path) -> None:
    ok("tag", "prod", "r@1", bank=bank_dir)
    line = fails(NOT_FOUND, "show", "prd", bank=bank_dir)
    assert line == "error: no checkpoint matches 'prd'; did you mean 'prod'?"
    assert "has no step 9" in fails(NOT_FOUND, "show", "r@9", bank=bank_dir)
    assert "invalid tag name '../x'" in fails(USAGE, "tag", "../x", "r@1", bank=bank_dir)
    fails(USAGE, "show", "r@", bank=bank_dir)
    assert "at least 6 hex" in fails(USAGE, "show", "abc", bank=bank_dir)
    fails(NOT_FOUND, "rollback", "nope", bank=bank_dir)
    fails(NOT_FOUND, "untag", "nope", bank=bank_dir)
    # Usage mistakes are one line too, with exit code 2.
    assert "--help" in fails(USAGE, "show", bank=bank_dir)
    fails(USAGE, "log", "--nope", bank=bank_dir)
    fails(USAGE, "rollback", "prod", "--steps", "0", bank=bank_dir)
    fails(USAGE, "lgo")


def test_errors_in_a_real_process(bank_dir: Path) -> None:
    cmd = [sys.executable, "-c", "from weightbank.cli.main import main; main()"]
    proc = subprocess.run(
        [*cmd, "show", "nope", "--bank", str(bank_dir)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == NOT_FOUND
    assert proc.stderr.startswith("error: no checkpoint matches 'nope'") and proc.stderr.count("\n") == 1
    assert proc.stdout == ""
    proc = subprocess.run(
        [*cmd, "log", "--json", "--bank", str(bank_dir)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0 and len(json.loads(proc.stdout)) == 4


def test_jsonable_keeps_json_strict() -> None:
    doc = jsonable({"a": (1, float("nan")), "b": float("-inf"), 3: [float("inf")]})
    assert doc == {"a": [1, "nan"], "b": "-inf", "3": ["inf"]}
    json.dumps(doc, allow_nan=False)


# -- demo ---------------------------------------------------------------------------------------
def test_demo_runs_end_to_end(tmp_path: Path) -> None:
    bank = tmp_path / "demo-bank"
    out = ok("demo", bank=bank).stdout
    for header in (
        "1 · ",
        "Pre-training",
        "fine-tune",
        "What the bank stores",
        "Tags",
        "Lineage",
        "Roll back",
    ):
        assert header in out
    assert "ok: 8 checkpoint(s)" in out and "├─┘" in out
    with wb.open(bank, create=False) as b:
        assert [c.run for c in b.log()].count("pretrain") == 6
        assert b.resolve("prod") == b.resolve("pretrain@best:val_loss")
        assert b.du().dedup_ratio > 1.5
    # A second run refuses the now non-empty bank instead of mixing into it.
    assert "--bank" in fails(USAGE, "demo", bank=bank)


def test_lossy_checkpoints_are_marked_and_export_quantizes(tmp_path: Path) -> None:
    bank_dir = tmp_path / "bank"
    b = wb.open(bank_dir)
    g = torch.Generator().manual_seed(0)
    b.save({"w": torch.randn(64, 64, generator=g)}, run="r", step=1, lossy="int8", tags=["q"])
    b.save({"w": torch.randn(64, 64, generator=g)}, run="r", step=2, tags=["full"])
    shown = run("show", "q", bank=bank_dir)
    assert shown.exit_code == 0 and "LOSSY" in shown.output
    assert "LOSSY" not in run("show", "full", bank=bank_dir).output
    out = tmp_path / "q.safetensors"
    done = run("export", "full", str(out), "--quantize", "int8", bank=bank_dir)
    assert done.exit_code == 0, done.output
    assert load_file(out)["w"].dtype == torch.int8
    bad = run("export", "full", str(tmp_path / "x.pt"), "--quantize", "int4", bank=bank_dir)
    assert bad.exit_code == USAGE and not (tmp_path / "x.pt").exists()
