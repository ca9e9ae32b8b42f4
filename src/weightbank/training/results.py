"""Frozen results of the training layer: what a step did and what a rollback restored.

Example:
    >>> from weightbank.training.results import StepOutcome
    >>> StepOutcome(step=10, next_step=10).stop
    False
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from .saver import SaveHandle

__all__ = ["Rollback", "StepOutcome"]


@dataclass(frozen=True)
class Rollback:
    """An automatic rollback: why, to which checkpoint, and which data was skipped.

    ``step`` is the step count at which the divergence was seen,
    ``restored_step`` the step count training continues from, and
    ``data_from``/``data_to`` the data positions of the restored checkpoint and
    of the divergence: the batches in between are skipped.
    """

    step: int
    reason: str
    restored: str
    restored_step: int
    source: Literal["memory", "bank"]
    data_from: Any = None
    data_to: Any = None
    lr_scale: float = 1.0

    @property
    def skipped_steps(self) -> int:
        """Steps whose batches were thrown away."""
        return self.step - self.restored_step


@dataclass(frozen=True)
class StepOutcome:
    """What ``CheckpointManager.step`` did.

    ``step`` is the number of steps done (the step a checkpoint of this state
    records); ``next_step`` is the loop index to run next — ``step`` normally,
    earlier after a rollback. ``stop`` says the loop should end (early stopping
    or a preemption signal); ``reason`` says why.
    """

    step: int
    next_step: int
    saved: SaveHandle[Any] | None = None
    rollback: Rollback | None = None
    stop: bool = False
    reason: str = ""
