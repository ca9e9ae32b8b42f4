"""Staging memory is reused: host memory does not grow over 1000 async saves of a small state."""

from __future__ import annotations

import gc
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
from torch import nn

import weightbank as wb

WARMUP, SAVES = 100, 1000
BOUND = 8 << 20  # bytes of RSS growth allowed after warm-up (allocator noise, not per-save leaks)


@pytest.fixture
def fast_dir(tmp_path: Path) -> Iterator[Path]:
    """A directory on tmpfs when there is one: this test is about memory, not about fsync latency."""
    shm = Path("/dev/shm")
    if not shm.is_dir():
        yield tmp_path
        return
    d = Path(tempfile.mkdtemp(dir=shm, prefix="wb-test-"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.slow
def test_rss_flat_over_1000_saves(fast_dir: Path) -> None:
    # One intra-op thread: on a 2-core machine OpenMP threads spinning beside the background
    # writer slow tiny steps tenfold, and this test is about memory, not speed.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run_saves(fast_dir)
    finally:
        torch.set_num_threads(threads)


def _run_saves(fast_dir: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    loader = wb.ResumableLoader(list(range(64)), batch_size=8, shuffle=True, seed=0)
    state = wb.TrainingState(model=model, optimizer=opt, data=loader)
    bank = wb.open(fast_dir / "bank")
    proc = psutil.Process()
    batches: Iterator[Any] = iter(())
    with wb.CheckpointManager(
        bank, run="r", save=wb.Every(steps=1), keep=[wb.LastN(2)], guard=wb.Guard(), signals=()
    ) as mgr:
        for step in range(WARMUP + SAVES):
            if step == WARMUP:
                mgr.wait()
                gc.collect()
                start = proc.memory_info().rss
            batch: Any = next(batches, None)
            if batch is None:
                batches = iter(loader)
                batch = next(batches)
            loss = model(torch.randn(8, 64)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            out = mgr.step(step, state, {"loss": loss.detach().item()})
            assert out.saved is not None
        mgr.wait()
        gc.collect()
        growth = proc.memory_info().rss - start
        staged = mgr._saves.staged_bytes
    assert len(bank.log("r")) == 2
    assert staged < 2 * 3 * 4 * (64 * 64 + 64 + 64 * 8 + 8) + (1 << 16)  # two slots of model + Adam state
    assert growth < BOUND, f"RSS grew by {growth / 2**20:.1f} MiB over {SAVES} saves"
