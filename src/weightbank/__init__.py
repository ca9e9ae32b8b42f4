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
from .bank.parts import SavePart, TensorRef, TensorShard
from .bank.results import (
    CheckpointInfo,
    DiffResult,
    DuReport,
    GcReport,
    LoadResult,
    PrefetchReport,
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
    BudgetExceeded,
    CheckpointNotFound,
    ConcurrentUpdate,
    CorruptObject,
    DeviceError,
    ExternalFileError,
    ExternalFileNotFound,
    IncompatibleState,
    InvalidArgument,
    InvalidName,
    InvalidRef,
    InvalidRequest,
    InvalidState,
    MissingDependency,
    MissingObject,
    NoHistory,
    NotABank,
    RouteNotFound,
    StorageError,
    TagNotFound,
    TargetExists,
    TrainingDiverged,
    UnsupportedFormat,
    WeightbankError,
)
from .serving import (
    CacheEvent,
    CacheStats,
    Handler,
    Lease,
    ModelCache,
    ModelService,
    ModelStatus,
    Prediction,
    Prefetch,
    TensorHandler,
)
from .storage.diskcache import DiskCache, DiskCacheStats
from .training import (
    BestN,
    CheckpointManager,
    EarlyStopping,
    Every,
    EveryN,
    Guard,
    KeepPolicy,
    LastN,
    MaxAge,
    OnImprovement,
    ResumableLoader,
    Rollback,
    SaveHandle,
    SavePolicy,
    StepOutcome,
    TrainingState,
    deterministic,
)

__all__ = [
    "AUTO",
    "AmbiguousRef",
    "Bank",
    "BestN",
    "BudgetExceeded",
    "CacheEvent",
    "CacheStats",
    "CheckpointDetail",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFound",
    "ConcurrentUpdate",
    "CorruptObject",
    "DeviceError",
    "DiffResult",
    "DiskCache",
    "DiskCacheStats",
    "DuReport",
    "EarlyStopping",
    "Every",
    "EveryN",
    "ExternalFileError",
    "ExternalFileNotFound",
    "GcReport",
    "Guard",
    "Handler",
    "IncompatibleState",
    "InvalidArgument",
    "InvalidName",
    "InvalidRef",
    "InvalidRequest",
    "InvalidState",
    "KeepPolicy",
    "LastN",
    "Lease",
    "LoadResult",
    "MaxAge",
    "MissingDependency",
    "MissingObject",
    "ModelCache",
    "ModelService",
    "ModelStatus",
    "NoHistory",
    "NotABank",
    "OnImprovement",
    "Prediction",
    "Prefetch",
    "PrefetchReport",
    "PruneReport",
    "ResumableLoader",
    "Rollback",
    "RouteNotFound",
    "RunEvent",
    "SaveHandle",
    "SavePart",
    "SavePolicy",
    "SaveStats",
    "StepOutcome",
    "StorageError",
    "TagEvent",
    "TagInfo",
    "TagNotFound",
    "TargetExists",
    "TensorDiff",
    "TensorHandler",
    "TensorInfo",
    "TensorRef",
    "TensorShard",
    "TrainingDiverged",
    "TrainingState",
    "UnsupportedFormat",
    "VerifyProblem",
    "VerifyReport",
    "WeightbankError",
    "__version__",
    "dcp",
    "deterministic",
    "open",
]


def __getattr__(name: str) -> object:
    # ``weightbank.dcp`` imports torch.distributed.checkpoint (about a second): only on first use.
    if name == "dcp":
        import importlib

        return importlib.import_module(".dcp", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
