"""CUDA paths: pinned staging with non-blocking copies on a side stream, CUDA RNG capture, GPU resume."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import weightbank as wb
from weightbank.training.rng import capture_rng, restore_rng
from weightbank.training.staging import StagingPool

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_staging_copies_cuda_tensors_into_pinned_buffers_asynchronously() -> None:
    x = torch.randn(1 << 20, device="cuda")
    expected = x.cpu()
    pool = StagingPool(slots=2)
    snap = pool.stage({"x": x, "tied": x, "n": 3})
    x.add_(1.0)  # queued after the copy on the training stream, which waits for it
    snap.ready()
    assert snap.tree["x"].is_pinned() and snap.tree["tied"] is snap.tree["x"]
    assert torch.equal(snap.tree["x"], expected)
    pool.release(snap.slot)
    again = pool.stage({"x": x, "tied": x, "n": 3})
    assert again.tree["x"].data_ptr() in (
        snap.tree["x"].data_ptr(),
        pool._slots[1].tensors["/'x'"].data_ptr(),
    )


def test_cuda_rng_round_trip() -> None:
    torch.cuda.init()
    saved = capture_rng()
    assert len(saved["cuda"]) == torch.cuda.device_count()
    a = torch.rand(4, device="cuda").cpu()
    restore_rng(saved)
    assert torch.equal(torch.rand(4, device="cuda").cpu(), a)


def test_gpu_training_resumes_bit_exact() -> None:
    bank = wb.open("memory://gpu")

    def run(stop: int | None) -> dict[str, torch.Tensor]:
        wb.deterministic(0, threads=None)
        model = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.1), nn.Linear(32, 1)).cuda()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        state = wb.TrainingState(model=model, optimizer=opt)
        with wb.CheckpointManager(bank, run=f"g{stop}", save=wb.Every(steps=3), signals=()) as mgr:
            step = mgr.restore(state)
            while step < (stop or 12):
                loss = model(torch.randn(8, 16, device="cuda")).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                step = mgr.step(step, state, {"loss": loss}).next_step
        return {k: v.cpu() for k, v in model.state_dict().items()}

    full = run(None)
    run(6)  # "crash" after 6 steps (saved at 6), then a fresh process-like restart continues
    bank_run = "g6"
    wb.deterministic(0, threads=None)
    model = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.1), nn.Linear(32, 1)).cuda()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    state = wb.TrainingState(model=model, optimizer=opt)
    with wb.CheckpointManager(bank, run=bank_run, save=wb.Every(steps=3), signals=()) as mgr:
        with pytest.warns(wb.DataPositionWarning):  # the data comes from the (restored) RNG, not a loader
            step = mgr.restore(state)
        assert step == 6
        while step < 12:
            loss = model(torch.randn(8, 16, device="cuda")).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step = mgr.step(step, state, {"loss": loss}).next_step
    assert all(torch.equal(full[k], v.cpu()) for k, v in model.state_dict().items())
