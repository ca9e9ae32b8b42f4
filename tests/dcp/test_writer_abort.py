"""``Writer.abort`` / ``with Writer(...)``: a failed save gives up this rank's part, never a committed one."""

from __future__ import annotations

import traceback
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

import weightbank as wb
from weightbank.bank.layout import LEASES

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def leases(bank: wb.Bank) -> list[str]:
    return [info.key for info in bank.storage.list(LEASES)]


def packs(bank: wb.Bank) -> set[str]:
    return {info.key for info in bank.storage.list("packs/")}


class FailsBeforeCommit(wb.dcp.Writer):
    def finish(self, metadata: Any, results: Any) -> None:
        raise OSError("the coordinator lost its connection to the bank")


class FailsAfterCommit(wb.dcp.Writer):
    """The manifest is written, then something fails (a tag move, the reply): the commit stands."""

    def finish(self, metadata: Any, results: Any) -> None:
        super().finish(metadata, results)
        raise OSError("failed after the commit")


def test_a_save_that_fails_before_the_commit_leaves_nothing() -> None:
    bank = wb.open("memory://")
    with (
        pytest.raises(CheckpointException, match="lost its connection"),
        FailsBeforeCommit(bank, run="r", step=1) as writer,
    ):
        dcp.save({"w": torch.arange(1000.0)}, storage_writer=writer)
    assert writer.part is None and leases(bank) == [] and packs(bank) == set() and bank.log() == []


def test_a_save_that_fails_after_the_commit_keeps_the_checkpoint() -> None:
    bank = wb.open("memory://")
    with (
        pytest.raises(CheckpointException, match="after the commit"),
        FailsAfterCommit(bank, run="r", step=1) as writer,
    ):
        dcp.save({"w": torch.arange(1000.0)}, storage_writer=writer)
    [info] = bank.log()
    assert torch.equal(bank.load(info.id)["w"], torch.arange(1000.0)) and bank.verify().ok
    assert leases(bank) == [] and packs(bank)


def test_a_rank_that_never_heard_the_coordinator_keeps_its_part() -> None:
    """Not the coordinator, and the error is not DCP's verdict (a timeout): rank 0 may still be committing."""
    bank = wb.open("memory://")
    writer = wb.dcp.Writer(bank, run="r", step=1)
    writer.set_up_storage_writer(False, rank=1)
    writer.part = part = bank.save_part({"w": torch.ones(1000)})
    assert writer.abort(RuntimeError("gloo: timed out waiting for rank 0")) is False
    assert writer.part is part and len(leases(bank)) == 1 and packs(bank) == set(part.own_packs())
    # The verdict came (DCP's CheckpointException: nothing was committed): the part goes.
    assert (
        writer.abort(CheckpointException("write", {0: (ValueError("no"), traceback.StackSummary())})) is True
    )
    assert writer.part is None and leases(bank) == [] and packs(bank) == set()
    assert writer.abort() is False  # nothing left to give up


def test_a_successful_save_is_left_alone() -> None:
    bank = wb.open("memory://")
    with wb.dcp.Writer(bank, run="r", step=1) as writer:
        md = dcp.save({"w": torch.ones(3)}, storage_writer=writer)
    assert writer.abort() is False  # called anyway: the part is in a checkpoint
    assert bank.load(wb.dcp.saved_id(md))["w"].tolist() == [1.0, 1.0, 1.0] and bank.verify().ok
