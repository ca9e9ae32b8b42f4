"""Shared fixtures: a bank on every backend we ship."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import weightbank as wb


@pytest.fixture(params=["local", "memory"])
def bank(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[wb.Bank]:
    url = str(tmp_path / "bank") if request.param == "local" else "memory://"
    b = wb.open(url)
    yield b
    b.close()


@pytest.fixture
def local_bank(tmp_path: Path) -> wb.Bank:
    return wb.open(tmp_path / "bank")


def seeded(shape: tuple[int, ...], seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g).to(dtype)
