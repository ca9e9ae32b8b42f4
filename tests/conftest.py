"""Shared fixtures: a bank on every backend we ship, and real S3 servers on 127.0.0.1."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import weightbank as wb
from tests.s3server import MotoServer, SeaweedServer, s3_environment

S3_BUCKET = "wbtest"


@pytest.fixture(scope="session")
def s3_env() -> Iterator[None]:
    """The test servers' credentials in the environment, for the whole session."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in s3_environment().items():
            mp.setenv(k, v)
        yield


@pytest.fixture(scope="session")
def seaweed(s3_env: None) -> Iterator[SeaweedServer]:
    """A real SeaweedFS S3 server (``weed mini``), started once per session."""
    with SeaweedServer() as srv:
        srv.create_bucket(S3_BUCKET)
        yield srv


@pytest.fixture(scope="session")
def moto_s3(s3_env: None) -> Iterator[MotoServer]:
    """moto's threaded S3 server, for fast checks next to SeaweedFS."""
    with MotoServer() as srv:
        srv.create_bucket(S3_BUCKET)
        yield srv


@pytest.fixture
def s3_url(seaweed: SeaweedServer) -> str:
    """A fresh, empty bank location on the SeaweedFS server."""
    return f"s3://{S3_BUCKET}/{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["local", "memory", pytest.param("s3", marks=pytest.mark.s3)])
def bank(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[wb.Bank]:
    if request.param == "s3":
        srv: SeaweedServer = request.getfixturevalue("seaweed")
        b = wb.open(request.getfixturevalue("s3_url"), storage_options=srv.storage_options())
    else:
        b = wb.open(str(tmp_path / "bank") if request.param == "local" else "memory://")
    yield b
    b.close()


@pytest.fixture
def local_bank(tmp_path: Path) -> wb.Bank:
    return wb.open(tmp_path / "bank")


def seeded(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)


@pytest.fixture(scope="session", autouse=True)
def _disk_cache_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Remote banks' default disk cache never lands in the real ~/.cache during tests."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("WEIGHTBANK_CACHE", str(tmp_path_factory.mktemp("wbcache-session")))
        mp.delenv("WEIGHTBANK_CACHE_SIZE", raising=False)
        yield


@pytest.fixture(autouse=True)
def _disk_cache_per_test(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """…and each test gets its own, so one test's cached chunks never answer another's loads."""
    monkeypatch.setenv("WEIGHTBANK_CACHE", str(tmp_path_factory.mktemp("wbcache")))
