"""The manager's save pipeline: stage in the training thread; check, write and follow up in the background.

``submit`` copies a captured state into a staging slot (the only part the
training loop waits for) and queues the job; the background thread then, in
order, waits for the copy to land, lets the guard check the staged state
(:meth:`weightbank.training.guard.Guard.state_problem`, agreed by every
process of the job), writes it through the :class:`~weightbank.training.job.Job`
and — once it is committed — runs the ``after_commit`` work (best tags,
pruning) on the leader.

A state the guard refuses is never written and never retained: the save's
handle raises TrainingDiverged, :attr:`SavePipeline.rejected` says why, and
the last good state stays the retained one (a single process keeps it in a
staging slot for in-memory rollbacks). Failures of other kinds are re-raised
by :meth:`raise_failures` exactly once.

Example:
    >>> import torch, weightbank as wb
    >>> from weightbank.training.job import Solo
    >>> from weightbank.training.pipeline import SavePipeline
    >>> saves = SavePipeline(wb.open("memory://"), Solo(), None, max_inflight=1)
    >>> saves.submit({"w": torch.ones(1)}, 1, {"run": "r", "step": 1}).wait().step
    1
    >>> saves.close()
"""

from __future__ import annotations

import time
from collections.abc import Callable
from functools import partial
from typing import Any

from ..bank.bank import Bank
from ..bank.results import CheckpointInfo
from ..errors import TrainingDiverged
from .guard import Guard
from .job import Job
from .saver import AsyncSaver, SaveHandle
from .staging import Snapshot, StagingPool

__all__ = ["SavePipeline"]


def _rejected_save(error: BaseException) -> bool:
    """A save the guard refused: the manager rolls back instead of raising it (only save jobs get here)."""
    return isinstance(error, TrainingDiverged)


class SavePipeline:
    """Guarded asynchronous saves of one run (see the module docstring)."""

    def __init__(
        self,
        bank: Bank,
        job: Job,
        guard: Guard | None,
        max_inflight: int,
        after_commit: Callable[[CheckpointInfo], None] | None = None,
    ) -> None:
        self.bank = bank
        self.job = job
        self.guard = guard
        self.after_commit = after_commit
        self._saver = AsyncSaver(max_inflight)
        # One slot per save in flight, plus the retained last good state when a guard may roll back.
        self._pool = StagingPool(max_inflight + (1 if guard is not None else 0))
        self.retained: Snapshot | None = None
        #: (steps done, why) of the last staged state the guard refused; set by the background thread.
        self.rejected: tuple[int, str] | None = None

    @property
    def staged_bytes(self) -> int:
        """Host bytes the staging slots hold (flat however many saves are made)."""
        return self._pool.nbytes

    def pending(self) -> list[SaveHandle[Any]]:
        """Saves not finished yet, oldest first."""
        return self._saver.pending()

    def make_room(self) -> None:
        """Block until a save may be staged (back-pressure: ``max_inflight``)."""
        self._saver.wait_for_room()
        while not self._pool.free():  # the retained slot plus max_inflight: only a failed save gets here
            self._saver.wait_all()

    def submit(
        self, tree: Any, done: int, options: dict[str, Any], started: float | None = None
    ) -> SaveHandle[CheckpointInfo]:
        """Stage ``tree`` (live tensors) and queue its save with bank ``options``; call :meth:`make_room` first."""
        t0 = time.perf_counter() if started is None else started
        snapshot = self._pool.stage(tree)
        job = partial(self._write, snapshot, done, options)
        return self._saver.submit(job, step=done, blocked_seconds=time.perf_counter() - t0)

    def protected(self) -> set[str]:
        """Checkpoints pruning must spare: the retained last good one."""
        snap = self.retained
        return {snap.checkpoint} if snap is not None and snap.checkpoint else set()

    def _write(self, snapshot: Snapshot, done: int, options: dict[str, Any]) -> CheckpointInfo:
        try:
            snapshot.ready()
            problem = self._problem(snapshot)
            if problem:
                # Never written, never retained: the last good state stays the one to roll back to.
                self.rejected = (done, problem)
                raise TrainingDiverged(
                    done,
                    problem,
                    detail="the state was not saved; the next step rolls back to the last good one",
                )
            cid, info = self.job.save(self.bank, snapshot.tree, options)
            snapshot.checkpoint = cid
            if self.guard is not None and self.job.retains:
                self._pool.retain(snapshot)  # before the slot is released: no save may stage into it
                self.retained = snapshot
        finally:
            self._pool.release(snapshot.slot)
        if info is None:  # not the leader: the commit and what follows it are the leader's
            return self.bank.info(cid, tags=True)
        if self.after_commit is not None:
            self.after_commit(info)
        return info

    def _problem(self, snapshot: Snapshot) -> str:
        """Why the guard refuses the staged state (agreed by every process of the job), or ``""``."""
        if self.guard is None or not self.guard.finite_state:
            return ""
        problem = self.guard.state_problem(snapshot.tree)
        if self.job.any_rank(bool(problem)) and not problem:
            problem = "model state is not finite on another rank"
        return problem

    def raise_failures(self) -> None:
        """Re-raise a failed save once; a refused state is not a failure here (see :attr:`rejected`)."""
        self._saver.raise_failures(divert=_rejected_save)

    def wait(self) -> None:
        """Block until every queued save has finished; re-raise a failure."""
        self._saver.wait_all()
        self.raise_failures()

    def close(self) -> None:
        """Wait for every save and stop the thread; re-raise a failure, or a refused state no rollback handled."""
        self._pool.retain(None)
        self.retained = None
        self._saver.close(divert=_rejected_save)
        if self.rejected is not None:
            done, reason = self.rejected
            self.rejected = None
            raise TrainingDiverged(
                done,
                reason,
                detail="that state was not saved; the run's newest checkpoint is its last good state",
            )
