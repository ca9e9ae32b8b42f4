"""Factories and checks for the drill tests (imported by ``--model tests.training.drill_models:...``)."""

from __future__ import annotations

import torch
from torch import nn


def build() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def build_pair() -> tuple[nn.Module, torch.optim.Optimizer]:
    model = build()
    return model, torch.optim.Adam(model.parameters(), lr=1e-3)


def build_wrong() -> nn.Module:
    return nn.Linear(3, 3)


def check_ok(model: nn.Module) -> bool:
    return bool(torch.isfinite(model(torch.ones(1, 4))).all())


def check_fail(model: nn.Module) -> bool:
    raise ValueError("accuracy 0.1 < 0.9")
