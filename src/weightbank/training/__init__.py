"""Training: a checkpoint manager with policies, async saves, exact resume and automatic rollback.

Example:
    >>> import weightbank as wb
    >>> wb.CheckpointManager is wb.training.CheckpointManager
    True
"""

from __future__ import annotations

from .data import DataPositionWarning, ResumableLoader
from .determinism import deterministic
from .guard import Guard
from .keeping import DamagedTagWarning
from .manager import CheckpointManager, RekeySkipped
from .policies import (
    BestN,
    EarlyStopping,
    Every,
    EveryN,
    KeepPolicy,
    LastN,
    MaxAge,
    OnImprovement,
    SavePolicy,
)
from .results import Rollback, StepOutcome
from .saver import SaveHandle
from .state import TrainingState

__all__ = [
    "BestN",
    "CheckpointManager",
    "DamagedTagWarning",
    "DataPositionWarning",
    "EarlyStopping",
    "Every",
    "EveryN",
    "Guard",
    "KeepPolicy",
    "LastN",
    "MaxAge",
    "OnImprovement",
    "RekeySkipped",
    "ResumableLoader",
    "Rollback",
    "SaveHandle",
    "SavePolicy",
    "StepOutcome",
    "TrainingState",
    "deterministic",
]
