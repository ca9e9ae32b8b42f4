"""The distributed manager's own messages (each step's decision, the checkpoint to restore) travel as
JSON bytes in uint8 tensors: never pickled, and a value that is not JSON-safe fails on every rank."""

from __future__ import annotations

from pathlib import Path

import pytest

from . import _workers as w
from .launch import expect_ok, run_ranks

pytestmark = [pytest.mark.dist]


@pytest.mark.parametrize("world", [2, 3])
def test_agree_and_broadcast_send_json_not_pickles(tmp_path: Path, world: int) -> None:
    seen = expect_ok(run_ranks(w.manager_messages, world, tmp_path / "run"))
    for got in seen:
        assert got["decision"] is True and got["flagged"] is True  # rank 0's long decision, the last rank's flag
        assert got["quiet"] == ["save", True] and got["told"] == ["r@3", None] and got["after"] == 0
        assert len(got["refused"]) == 2 and all("JSON-safe" in r for r in got["refused"]), got["refused"]
