"""The rollback drill: prove a checkpoint can really be restored into a freshly built model.

``drill(bank, ref, build)`` verifies every chunk hash of the checkpoint, loads
it, restores it into what ``build()`` returns — a module, a ``(model,
optimizer)`` pair, or a TrainingState — runs an optional user check on the
model, and times each phase. Training checkpoints (with a ``model`` section)
restore the model and, when both sides have one, the optimizer; a bare
``state_dict`` checkpoint is loaded into the model.

Example:
    >>> import torch, weightbank as wb
    >>> from weightbank.training.drill import drill
    >>> bank = wb.open("memory://"); _ = bank.save(torch.nn.Linear(2, 2).state_dict(), tags=["prod"])
    >>> report = drill(bank, "prod", lambda: torch.nn.Linear(2, 2))
    >>> report.ok, report.restored
    (True, ('model',))
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..bank.bank import Bank
from ..bank.results import CheckpointInfo, VerifyReport
from ..errors import IncompatibleState
from .state import TrainingState

__all__ = ["DrillReport", "drill"]


@dataclass(frozen=True)
class DrillReport:
    """What a drill did and how long each phase took (seconds).

    ``read_seconds`` covers fetching, hash-checking and decoding every tensor
    (``bank.load``); ``copy_seconds`` copying them into the model/optimizer.
    """

    checkpoint: CheckpointInfo
    verify: VerifyReport
    restored: tuple[str, ...]
    verify_seconds: float
    read_seconds: float
    copy_seconds: float
    check_seconds: float = 0.0
    check_error: str | None = None

    @property
    def ok(self) -> bool:
        return self.verify.ok and self.check_error is None

    @property
    def restore_seconds(self) -> float:
        return self.read_seconds + self.copy_seconds


def _as_state(built: Any) -> tuple[TrainingState, torch.nn.Module | None]:
    if isinstance(built, TrainingState):
        models = built.objects("model")
        return built, next(iter(models.values()), None)
    if isinstance(built, torch.nn.Module):
        return TrainingState(model=built, rng=False), built
    if isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], torch.nn.Module):
        return TrainingState(model=built[0], optimizer=built[1], rng=False), built[0]
    raise IncompatibleState(
        f"the factory returned {type(built).__name__}; return a torch.nn.Module, (model, optimizer)"
        " or a weightbank.TrainingState"
    )


def drill(
    bank: Bank,
    ref: str,
    build: Callable[[], Any],
    *,
    device: str | torch.device | None = None,
    check: Callable[[torch.nn.Module], Any] | None = None,
) -> DrillReport:
    """Verify, load and restore ``ref`` into ``build()``; run ``check(model)`` (False or raising fails).

    Raises what the bank raises for a checkpoint that cannot be read, and
    IncompatibleState when it does not fit the built model.

    Example:
        >>> import torch, weightbank as wb
        >>> bank = wb.open("memory://"); cid = bank.save(torch.nn.Linear(1, 1).state_dict()).id
        >>> drill(bank, cid, lambda: torch.nn.Linear(1, 1), check=lambda m: m.weight.shape == (1, 1)).ok
        True
    """
    cid = bank.resolve(ref)
    t0 = time.perf_counter()
    verified = bank.verify(cid, full=True)
    t1 = time.perf_counter()
    info = bank.info(cid, tags=True)
    if not verified.ok:
        return DrillReport(info, verified, (), t1 - t0, 0.0, 0.0)
    built = build()
    state, model = _as_state(built)
    if model is not None and device is not None:
        model.to(device)
    t2 = time.perf_counter()
    tree = bank.load(cid)
    t3 = time.perf_counter()
    sections = set(tree) if isinstance(tree, Mapping) and "model" in tree else set()
    parts = [
        p for p in ("model", "optimizer", "scheduler", "scaler") if p in sections and p in state.sections()
    ]
    if not sections:
        parts = ["model"]
    state.load(tree, parts=parts)
    t4 = time.perf_counter()
    error = None
    if check is not None and model is not None:
        try:
            result = check(model)
            if result is False:
                error = "the check returned False"
        except Exception as e:  # the user's check: any failure is the drill's verdict, not a crash
            error = f"{type(e).__name__}: {e}"
    t5 = time.perf_counter()
    return DrillReport(
        checkpoint=info,
        verify=verified,
        restored=tuple(parts),
        verify_seconds=t1 - t0,
        read_seconds=t3 - t2,
        copy_seconds=t4 - t3,
        check_seconds=t5 - t4 if check is not None else 0.0,
        check_error=error,
    )
