"""The weightbank.http package as a whole: each module owns one thing and stays under the house size."""

from __future__ import annotations

from pathlib import Path

import weightbank.http

MAX_LINES = 600  # STYLE.md: modules under ~600 lines; a longer one is two owners in one room


def test_every_module_stays_under_the_house_size() -> None:
    root = Path(weightbank.http.__file__).parent
    sizes = {p.relative_to(root).as_posix(): len(p.read_text().splitlines()) for p in root.rglob("*.py")}
    assert sizes  # the walk found the package's modules
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}
