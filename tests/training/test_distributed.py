"""The distributed manager's messages: JSON-safe values only (refused with InvalidState, never pickled)."""

from __future__ import annotations

import math

import pytest

import weightbank as wb
from weightbank.training.distributed import Distributed


def test_messages_are_json_and_the_rest_is_refused() -> None:
    ctx = Distributed.alone()
    decision, flag = ctx.agree(lambda: (None, True, False, [3, 4]), flag=True)
    assert decision == [None, True, False, [3, 4]] and flag is True  # tuples arrive as lists
    assert math.isinf(ctx.broadcast({"best": -math.inf})["best"])
    with pytest.raises(wb.InvalidState, match=r"JSON-safe"):
        ctx.broadcast(object())
    with pytest.raises(wb.InvalidState, match=r"decision\.k\.1"):
        ctx.agree(lambda: {"k": [1, {2}]}, flag=False)
    with pytest.raises(wb.InvalidState, match="keys must be strings"):
        ctx.broadcast({1: "a"})
