"""Bit-exact resume: a training process SIGKILLed at a random step and resumed from the bank ends
bitwise identical (weights, optimizer, scheduler, RNGs, data position) to an uninterrupted run.

The setup covers shuffle=True, num_workers=2 with random augmentation in the
workers, dropout, Adam, a StepLR schedule, kills mid-epoch, and a kill after
an automatic rollback (a NaN injected at a fixed batch) so the resumed run
continues from the rolled-back state.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import weightbank as wb

CHILD = Path(__file__).with_name("_train_child.py")
TOTAL = 30
NAN_AT = 13  # global batch whose loss is NaN: rollback at step 14 to the step-12 checkpoint
WORKERS = 2


def _committed(bank: Path, rollback: bool) -> bool:
    """Whether the child has committed a checkpoint (one written after a rollback, if asked)."""
    try:
        infos = wb.open(bank, create=False).log("run")
    except (wb.NotABank, wb.CheckpointNotFound):
        return False
    return any(c.message.startswith("rollback") for c in infos) if rollback else bool(infos)


def _run(bank: Path, kill_after: int | None = None, after_rollback: bool = False) -> list[str]:
    """Run the child; with ``kill_after``, SIGKILL it right after it reports that step (or the first
    later one by which a checkpoint — after the rollback, if asked — is committed). Returns its lines."""
    args = [sys.executable, str(CHILD), str(bank), "run", str(TOTAL), str(WORKERS), str(NAN_AT), "-1"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            lines.append(line.strip())
            if (
                kill_after is not None
                and line.startswith("step ")
                and int(line.split()[1]) >= kill_after
                and _committed(bank, after_rollback)
            ):
                os.kill(proc.pid, signal.SIGKILL)
                break
        rc = proc.wait(timeout=120)
    finally:
        proc.stdout.close()
        err = proc.stderr.read() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
    if kill_after is None:
        assert rc == 0, err
        assert lines[-1] == "done", (lines[-5:], err)
    else:
        assert rc == -signal.SIGKILL, (rc, err)
    return lines


def _same(a: Any, b: Any, path: str = "") -> list[str]:
    """Paths where two state trees differ, comparing tensors and arrays bit for bit."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        ok = a.dtype == b.dtype and a.shape == b.shape
        ok = ok and bool((a.reshape(-1).view(torch.uint8) == b.reshape(-1).view(torch.uint8)).all())
        return [] if ok else [path]
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        return [] if a.dtype == b.dtype and a.tobytes() == b.tobytes() else [path]
    if isinstance(a, dict) and isinstance(b, dict):
        if set(a) != set(b):
            return [f"{path} keys"]
        return [p for k in a for p in _same(a[k], b[k], f"{path}.{k}")]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        if type(a) is not type(b) or len(a) != len(b):
            return [f"{path} len"]
        return [p for i, (x, y) in enumerate(zip(a, b, strict=True)) for p in _same(x, y, f"{path}.{i}")]
    if isinstance(a, float) and isinstance(b, float) and a != a and b != b:
        return []
    return [] if a == b and type(a) is type(b) else [path]


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, list[str]]:
    bank_dir = tmp_path_factory.mktemp("baseline") / "bank"
    lines = _run(bank_dir)
    assert any(line.startswith("rollback 14 12") for line in lines), lines
    final = wb.open(bank_dir).load("run-final")
    return final, lines


@pytest.mark.parametrize("phase", ["before-rollback", "after-rollback"])
def test_sigkill_and_resume_is_bit_exact(phase: str, baseline: tuple[Any, list[str]], tmp_path: Path) -> None:
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    # Kill points are random but never on a save step, so the resumed run really restarts mid-way.
    choices = [k for k in (range(5, 11) if phase == "before-rollback" else range(18, 27)) if (k + 1) % 4]
    kill_after = rng.choice(choices)
    bank_dir = tmp_path / "bank"
    first = _run(bank_dir, kill_after=kill_after, after_rollback=phase == "after-rollback")
    assert not any(line == "done" for line in first)
    second = _run(bank_dir)
    resumed = second[0].split()
    resumed_step, epoch, index = int(resumed[1]), int(resumed[2]), int(resumed[3])
    killed_at = int([line for line in first if line.startswith("step ")][-1].split()[1])
    assert 0 < resumed_step <= killed_at + 1, (seed, kill_after, resumed)
    assert index not in (0, 12) or resumed_step % 12 == 0, "expected a mid-epoch position"
    if phase == "after-rollback":
        assert resumed_step >= 12 and not any(line.startswith("rollback") for line in second), second
    expected, base_lines = baseline
    got = wb.open(bank_dir).load("run-final")
    diff = _same(expected, got)
    assert not diff, f"kill after step {kill_after} (seed {seed}): differs at {diff[:10]}"
    assert any(p.startswith("model") for p in _flat_names(got))
    # The resumed run sees exactly the batches the uninterrupted run saw from that step on.
    tail = [line for line in second if line.startswith("step ")]
    base_steps = [line for line in base_lines if line.startswith("step ")]
    assert tail == base_steps[len(base_steps) - len(tail) :]
    assert (epoch, index) == (resumed_step // 12, resumed_step % 12) or phase == "after-rollback"


def _flat_names(tree: Any, path: str = "") -> list[str]:
    if isinstance(tree, dict):
        return [n for k, v in tree.items() for n in _flat_names(v, f"{path}.{k}" if path else str(k))]
    return [path]
