"""Fixtures of the crash, concurrency and gc-safety tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .faults import Children


@pytest.fixture
def children() -> Iterator[Children]:
    """Spawns ``_child.py`` processes; kills and reaps whatever is left when the test ends."""
    kids = Children()
    yield kids
    kids.close()
