"""Serving many checkpoints from one process: a content-shared tensor pool under a byte budget.

Example:
    >>> import torch, weightbank as wb
    >>> bank = wb.open("memory://"); _ = bank.save(torch.nn.Linear(2, 2).state_dict(), tags=["prod"])
    >>> cache = wb.ModelCache(bank, build=lambda info: torch.nn.Linear(2, 2), budget="device=1MiB")
    >>> with cache.lease("prod") as model:
    ...     tuple(model(torch.ones(1, 2)).shape)
    (1, 2)
"""

from __future__ import annotations

from .budget import TierStats, parse_budget, parse_bytes
from .cache import ModelCache
from .handler import Handler, TensorHandler, load_handler
from .lease import Lease, Prefetch
from .live import LiveTags
from .results import CacheEvent, CacheStats, ModelStatus, Prediction
from .router import Pick, Route, Router
from .service import ModelService

__all__ = [
    "CacheEvent",
    "CacheStats",
    "Handler",
    "Lease",
    "LiveTags",
    "ModelCache",
    "ModelService",
    "ModelStatus",
    "Pick",
    "Prediction",
    "Prefetch",
    "Route",
    "Router",
    "TensorHandler",
    "TierStats",
    "load_handler",
    "parse_budget",
    "parse_bytes",
]
