"""``weightbank drill``: restore into a fresh model, verify hashes, time phases, exit non-zero on failure."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

import weightbank as wb
from tests.training.drill_models import build_pair
from weightbank.cli.drill import register

M = "tests.training.drill_models"


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()
    register(app)

    @app.command("noop")
    def _noop() -> None:  # a second command, so typer keeps "drill" as a subcommand name
        pass

    return app


@pytest.fixture
def trained(tmp_path: Path) -> Path:
    bank = wb.open(tmp_path / "bank")
    model, opt = build_pair()
    model(torch.ones(2, 4)).sum().backward()
    opt.step()
    state = wb.TrainingState(model=model, optimizer=opt)
    with wb.CheckpointManager(bank, run="r", signals=()) as mgr:
        mgr.save_now(0, state, tags=["prod"]).wait()
    bank.save(model.state_dict(), run="plain", tags=["plain"])
    return tmp_path / "bank"


def _invoke(app: typer.Typer, bank: Path, *args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["drill", *args, "--bank", str(bank)])
    return result.exit_code, result.output


def test_drill_restores_model_and_optimizer(app: typer.Typer, trained: Path) -> None:
    code, out = _invoke(app, trained, "prod", "--model", f"{M}:build_pair", "--check", f"{M}:check_ok")
    assert code == 0, out
    assert "verify" in out and "ok" in out and "model, optimizer" in out
    assert "read+decode" in out and "copy" in out and "passed" in out


def test_drill_loads_a_bare_state_dict(app: typer.Typer, trained: Path) -> None:
    code, out = _invoke(app, trained, "plain", "--model", f"{M}:build")
    assert code == 0, out
    assert "restored" in out and "model" in out


def test_drill_fails_on_a_failing_check(app: typer.Typer, trained: Path) -> None:
    code, out = _invoke(app, trained, "prod", "--model", f"{M}:build", "--check", f"{M}:check_fail")
    assert code == 1 and "accuracy 0.1" in out


def test_drill_fails_on_a_model_that_does_not_fit(app: typer.Typer, trained: Path) -> None:
    code, out = _invoke(app, trained, "prod", "--model", f"{M}:build_wrong")
    assert code == 2 and "cannot restore model" in out


def test_drill_fails_on_unknown_ref_and_bad_factory(app: typer.Typer, trained: Path) -> None:
    assert _invoke(app, trained, "nope", "--model", f"{M}:build")[0] == 3
    assert _invoke(app, trained, "prod", "--model", "no_such_module:build")[0] == 2
    assert _invoke(app, trained, "prod", "--model", "justamodule")[0] == 2


def test_drill_fails_on_corrupt_data(app: typer.Typer, trained: Path) -> None:
    for pack in (trained / "packs").rglob("*.pack"):
        data = bytearray(pack.read_bytes())
        data[len(data) // 2] ^= 0xFF
        pack.write_bytes(bytes(data))
    code, out = _invoke(app, trained, "prod", "--model", f"{M}:build_pair")
    assert code == 4 and "FAILED" in out
