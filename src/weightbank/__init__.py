"""weightbank: a content-addressed, crash-safe bank for PyTorch checkpoints.

Example:
    >>> import torch, weightbank as wb
    >>> bank = wb.open("memory://")
    >>> info = bank.save({"w": torch.ones(2)}, run="demo", step=1, tags=["prod"])
    >>> bank.load("prod")["w"].tolist()
    [1.0, 1.0]
"""

from __future__ import annotations

from ._version import __version__
from .bank.bank import AUTO, Bank, CheckpointDetail, open
from .bank.results import (
    CheckpointInfo,
    DiffResult,
    DuReport,
    GcReport,
    LoadResult,
    PruneReport,
    RunEvent,
    SaveStats,
    TagEvent,
    TagInfo,
    TensorDiff,
    TensorInfo,
    VerifyProblem,
    VerifyReport,
)
from .errors import (
    AmbiguousRef,
    CheckpointNotFound,
    ConcurrentUpdate,
    CorruptObject,
    DeviceError,
    ExternalFileError,
    ExternalFileNotFound,
    IncompatibleState,
    InvalidName,
    InvalidRef,
    InvalidState,
    MissingObject,
    NoHistory,
    NotABank,
    StorageError,
    TagNotFound,
    TargetExists,
    UnsupportedFormat,
    WeightbankError,
)

__all__ = [
    "AUTO",
    "AmbiguousRef",
    "Bank",
    "CheckpointDetail",
    "CheckpointInfo",
    "CheckpointNotFound",
    "ConcurrentUpdate",
    "CorruptObject",
    "DeviceError",
    "DiffResult",
    "DuReport",
    "ExternalFileError",
    "ExternalFileNotFound",
    "GcReport",
    "IncompatibleState",
    "InvalidName",
    "InvalidRef",
    "InvalidState",
    "LoadResult",
    "MissingObject",
    "NoHistory",
    "NotABank",
    "PruneReport",
    "RunEvent",
    "SaveStats",
    "StorageError",
    "TagEvent",
    "TagInfo",
    "TagNotFound",
    "TargetExists",
    "TensorDiff",
    "TensorInfo",
    "UnsupportedFormat",
    "VerifyProblem",
    "VerifyReport",
    "WeightbankError",
    "__version__",
    "open",
]
