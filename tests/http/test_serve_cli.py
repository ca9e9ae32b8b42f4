"""``weightbank serve`` registered on a Typer app: refuses unsafe starts, builds and serves the app."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import typer
import uvicorn
from fastapi.testclient import TestClient
from typer.testing import CliRunner

import weightbank as wb
from weightbank.cli import serve as serve_mod

from ..serving.family import make_family

FACTORY = "tests.serving.family:build"


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()
    serve_mod.register(app)

    @app.callback()
    def main() -> None:
        """Test group (so `serve` is a subcommand)."""

    return app


@pytest.fixture
def bank_dir(tmp_path: Path) -> str:
    path = tmp_path / "bank"
    make_family(wb.open(path), n_variants=2)
    return str(path)


def test_refuses_management_without_a_token(
    app: typer.Typer, bank_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("WEIGHTBANK_TOKEN", raising=False)
    ran: list[uvicorn.Config] = []
    monkeypatch.setattr(serve_mod, "run_server", ran.append)
    r = CliRunner().invoke(app, ["serve", bank_dir, "--model", FACTORY])
    assert r.exit_code != 0 and "token" in r.output and not ran
    r = CliRunner().invoke(
        app, ["serve", bank_dir, "--model", FACTORY, "--insecure-local", "--host", "0.0.0.0"]
    )
    assert r.exit_code != 0 and "127.0.0.1" in r.output and not ran


def test_serves_with_a_token_file(
    app: typer.Typer, bank_dir: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    token = tmp_path / "token"
    token.write_text("from-a-file\n")
    captured: list[uvicorn.Config] = []

    def fake_run(config: uvicorn.Config) -> None:
        captured.append(config)
        with TestClient(config.app) as c:  # type: ignore[arg-type]
            r = c.post("/v1/predict", json={"ref": "prod", "input": [[0.0] * 32]})
            assert r.status_code == 200, r.text
            assert c.get("/v1/models").status_code == 401
            models = c.get("/v1/models", headers={"Authorization": "Bearer from-a-file"}).json()["models"]
            assert len(models) == 1  # --preload
            assert c.get("/v1/routes/ab", headers={"Authorization": "Bearer from-a-file"}).json()["arms"] == {
                "prod": 90.0,
                "spk1@0": 10.0,
            }

    monkeypatch.setattr(serve_mod, "run_server", fake_run)
    args = ["serve", bank_dir, "--model", FACTORY, "--input-shape", "*,32", "--token-file", str(token)]
    args += ["--budget", "device=1MiB,host=2MiB", "--port", "0", "--poll", "0"]
    args += ["--route", "ab=prod:90,spk1@0:10", "--preload", "prod"]
    r = CliRunner().invoke(app, args, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    assert captured and captured[0].host == "127.0.0.1"
    log_config = captured[0].log_config
    assert isinstance(log_config, dict) and log_config["loggers"]["weightbank"]["level"] == "INFO"


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--handler", "no_such_pkg:H"], "no_such_pkg"),
        (["--handler", "tensor"], "--model"),
        (["--model", FACTORY, "--budget", "device=lots"], "size"),
        (["--model", FACTORY, "--route", "ab"], "NAME=ARM:WEIGHT"),
        (["--model", FACTORY, "--input-shape", "a,b"], "sizes"),
    ],
)
def test_bad_options(
    app: typer.Typer, bank_dir: str, monkeypatch: pytest.MonkeyPatch, extra: list[str], needle: str
) -> None:
    monkeypatch.setenv("WEIGHTBANK_TOKEN", "t")
    monkeypatch.setattr(serve_mod, "run_server", lambda config: None)
    args = ["serve", bank_dir, *extra]
    if extra[:2] == ["--handler", "tensor"]:
        args = ["serve", bank_dir, "--handler", "tensor"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code != 0
    message = r.output + (str(r.exception) if r.exception else "")
    assert needle in message, message


def test_not_a_bank(app: typer.Typer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEIGHTBANK_TOKEN", "t")
    r = CliRunner().invoke(app, ["serve", str(tmp_path / "missing"), "--model", FACTORY])
    assert r.exit_code != 0 and isinstance(r.exception, wb.NotABank)


def test_verify_mode_reaches_the_bank(
    app: typer.Typer, bank_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("WEIGHTBANK_TOKEN", "t")
    served: list[str] = []

    def fake_run(config: uvicorn.Config) -> None:
        with TestClient(config.app) as c:  # type: ignore[arg-type]
            r = c.post("/v1/predict", json={"ref": "prod", "input": [[0.0] * 32]})
            assert r.status_code == 200, r.text
        served.append("ok")

    monkeypatch.setattr(serve_mod, "run_server", fake_run)
    opened: list[str] = []

    def spy(path: str, **kw: Any) -> wb.Bank:
        bank = wb.open(path, **kw)
        opened.append(bank.read_verify)
        return bank

    monkeypatch.setattr(serve_mod, "open_bank", spy)
    r = CliRunner().invoke(app, ["serve", bank_dir, "--model", FACTORY, "--verify", "once", "--poll", "0"])
    assert r.exit_code == 0, r.output
    assert opened == ["once"] and served == ["ok"]
    r = CliRunner().invoke(app, ["serve", bank_dir, "--model", FACTORY, "--verify", "sometimes"])
    assert r.exit_code != 0 and "--verify" in r.output and len(opened) == 1
