"""Every weightbank error survives a pickle round trip: torch.distributed.checkpoint gathers a failed
rank's exception to the coordinator that way, and one that cannot be rebuilt there hangs the job."""

from __future__ import annotations

import pickle  # only to check what DCP's collectives do with our errors; nothing of ours pickles

import pytest

from weightbank import errors

SAMPLES: dict[str, errors.WeightbankError] = {
    "AlreadyClosed": errors.AlreadyClosed("checkpoint manager"),
    "AmbiguousRef": errors.AmbiguousRef("ab", ["abc", "abd"]),
    "BudgetExceeded": errors.BudgetExceeded("device", needed=1, used=2, budget=3, transient=True),
    "CheckpointNotFound": errors.CheckpointNotFound("r@1", ["r@2"], detail="gone"),
    "ConcurrentUpdate": errors.ConcurrentUpdate("refs/tags/x"),
    "CorruptObject": errors.CorruptObject("packs/x", expected="aa", actual="bb", tensor="w"),
    "DeviceError": errors.DeviceError("cuda:3 is not available"),
    "ExternalFileError": errors.ExternalFileError("/x", "unreadable", ["w"]),
    "ExternalFileNotFound": errors.ExternalFileNotFound("/x", "no such file"),
    "IndexDamaged": errors.IndexDamaged("index/roots/000000000003.json", "does not match its digest"),
    "HandlerError": errors.HandlerError("predict", "KeyError", "'x'", checkpoint="ab" * 32, transient=True),
    "IncompatibleState": errors.IncompatibleState("shape mismatch", ["w"]),
    "InvalidArgument": errors.InvalidArgument("steps", 0, "must be >= 1"),
    "InvalidName": errors.InvalidName("tag", "a/b", "no slashes"),
    "InvalidRef": errors.InvalidRef("r@", "no step"),
    "InvalidRequest": errors.InvalidRequest("bad input", "input"),
    "InvalidState": errors.InvalidState("optim.fn", "a function"),
    "MissingDependency": errors.MissingDependency("s3://", "s3fs", "s3"),
    "MissingObject": errors.MissingObject("packs/y"),
    "NoHistory": errors.NoHistory("t", 2, 1),
    "NonFiniteOutput": errors.NonFiniteOutput(3, "cd" * 32),
    "NotABank": errors.NotABank("/tmp/x"),
    "NotMovable": errors.NotMovable("ab" * 32, "prod"),
    "RouteNotFound": errors.RouteNotFound("r", ["a"]),
    "StorageError": errors.StorageError("disk full"),
    "TagNotFound": errors.TagNotFound("t", ["u"]),
    "TargetExists": errors.TargetExists("/x", "exists"),
    "TrainingDiverged": errors.TrainingDiverged(3, "loss is nan", [1]),
    "UnsupportedFormat": errors.UnsupportedFormat("/b", 9, 2),
    "WeightbankError": errors.WeightbankError("plain"),
}


def test_every_error_has_a_sample() -> None:
    assert sorted(SAMPLES) == sorted(errors.__all__)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_errors_survive_pickling(name: str) -> None:
    error = SAMPLES[name]
    back = pickle.loads(pickle.dumps(error))
    assert type(back) is type(error) and str(back) == str(error) and back.args == error.args
    assert vars(back) == vars(error)
