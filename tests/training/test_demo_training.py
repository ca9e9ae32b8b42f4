"""The training section of ``weightbank demo`` runs end to end and shows what it promises."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from rich.console import Console

import weightbank as wb
from weightbank.cli.demo_training import run


@pytest.mark.slow
def test_demo_training_runs(tmp_path: Path) -> None:
    out = io.StringIO()
    run(wb.open(tmp_path / "bank"), Console(file=out, width=160, color_system=None))
    text = out.getvalue()
    assert "bitwise identical" in text and "DIFFERENT" not in text
    assert "rollback (loss is nan)" in text and "weights finite: True" in text
    assert "← from train@" in text  # the fine-tune's parent crosses runs in the graph
