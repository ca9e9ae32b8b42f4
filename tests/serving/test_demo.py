"""The serving demo runs offline and tells the story it promises."""

from __future__ import annotations

import io

from rich.console import Console

import weightbank as wb
from weightbank.cli.demo_serving import PROD, run


def test_demo_runs_and_leaves_prod_rolled_back() -> None:
    bank = wb.open("memory://")
    out = io.StringIO()
    run(bank, Console(file=out, width=120))
    text = out.getvalue()
    for needle in (
        "5 checkpoints resident",
        "canary →",
        "prod now serves ana",
        "serves base again",
        "hit rate",
    ):
        assert needle in text, needle
    base = bank.resolve("tts-base@0")
    assert bank.resolve(PROD) == base
    assert [e.action for e in bank.tag_history(PROD)] == ["set", "set", "rollback"]
