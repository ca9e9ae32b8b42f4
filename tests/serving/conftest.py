from __future__ import annotations

import pytest

import weightbank as wb

from .family import Family, make_family


@pytest.fixture
def family() -> Family:
    return make_family(wb.open("memory://"), n_variants=4)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()
