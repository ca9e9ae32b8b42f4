"""A tiny, fully deterministic training setup shared by the in-process tests and the child process.

The dataset adds noise with torch's generator *inside* ``__getitem__`` (so the
worker seeding matters), the model has dropout (so the training RNG matters),
the optimizer is Adam (state to restore) and the LR follows a StepLR schedule.
``train`` runs the manager loop of the docs; ``nan_at``/``spike_at`` name the
global batch numbers whose loss is poisoned.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

import weightbank as wb

N_SAMPLES = 96
BATCH = 8  # 12 batches per epoch


class NoisyData(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor, int]]):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(N_SAMPLES, 8, generator=g)
        self.y = self.x @ torch.randn(8, 1, generator=g) + 0.1

    def __len__(self) -> int:
        return N_SAMPLES

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return self.x[i] + 0.01 * torch.randn(8), self.y[i], i


def build(workers: int = 0, seed: int = 123) -> tuple[nn.Module, wb.TrainingState, wb.ResumableLoader]:
    wb.deterministic(0, threads=1)
    model = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 1))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.9)
    loader = wb.ResumableLoader(NoisyData(), batch_size=BATCH, shuffle=True, seed=seed, num_workers=workers)
    state = wb.TrainingState(model=model, optimizer=opt, scheduler=sched, data=loader, extra={"note": "t"})
    return model, state, loader


def forever(loader: wb.ResumableLoader) -> Iterator[Any]:
    while True:
        yield from loader


def train(
    mgr: wb.CheckpointManager,
    state: wb.TrainingState,
    model: nn.Module,
    loader: wb.ResumableLoader,
    total: int,
    *,
    nan_at: int = -1,
    spike_at: int = -1,
    on_step: Callable[[int, int, list[int], wb.StepOutcome], None] | None = None,
    start: int | None = None,
) -> int:
    """Train until ``total`` steps are done; return the step count (less if stopped)."""
    opt = state.objects("optimizer")[""]
    sched = state.objects("scheduler")[""]
    step = mgr.restore(state) if start is None else start
    batches = forever(loader)
    while step < total:
        x, y, idx = next(batches)
        batch_no = loader.epoch * len(loader) + loader.index - 1
        loss = nn.functional.mse_loss(model(x), y)
        if batch_no == nan_at:
            loss = loss * math.nan
        if batch_no == spike_at:
            loss = loss * 1000.0
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        out = mgr.step(step, state, metrics={"loss": loss.detach().item()})
        if on_step is not None:
            on_step(step, batch_no, idx.tolist(), out)
        if out.stop:
            return out.step
        step = out.next_step
    return step
