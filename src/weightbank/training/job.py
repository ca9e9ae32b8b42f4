"""The job a CheckpointManager runs in: one process (:class:`Solo`) or the ranks of a distributed job.

The manager holds one :class:`Job` and never asks which kind it is; what
differs between one process and ``torch.distributed`` ranks lives behind this
protocol (:class:`Solo` here, ``DistributedJob`` in
:mod:`weightbank.training.distributed`). Each step's outcome is a
:class:`Decision`, taken once — by the leader — and followed by every process.

Example:
    >>> from weightbank.training.job import Decision, Solo
    >>> Solo().agree(lambda: Decision(save=True), signalled=False)
    (Decision(diverged='', refused='', rollbacks=(), stop=False, save=True), False)
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ..bank.bank import Bank
from ..bank.results import CheckpointInfo
from ..errors import CheckpointNotFound
from .state import TrainingState

__all__ = ["Decision", "Job", "Solo", "choose_job"]


@dataclass(frozen=True)
class Decision:
    """What one step decided: roll back (and whether the guard allows it), stop, save.

    ``diverged`` is why the state must be rolled back (``""``: it need not);
    ``refused`` is non-empty when the guard's rollback budget is spent (the
    step raises TrainingDiverged with it); ``rollbacks`` are the guard's recent
    rollbacks once this one is counted, so every process's guard agrees.

    Example:
        >>> Decision.from_json(Decision(diverged="loss is nan", rollbacks=(8,)).to_json()).rollbacks
        (8,)
    """

    diverged: str = ""
    refused: str = ""
    rollbacks: tuple[int, ...] = ()
    stop: bool = False
    save: bool = False

    def to_json(self) -> dict[str, Any]:
        """A JSON-safe form (for the distributed job's one collective per step)."""
        return {
            "diverged": self.diverged,
            "refused": self.refused,
            "rollbacks": list(self.rollbacks),
            "stop": self.stop,
            "save": self.save,
        }

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> Decision:
        """The decision :meth:`to_json` encoded."""
        return cls(
            diverged=str(value.get("diverged", "")),
            refused=str(value.get("refused", "")),
            rollbacks=tuple(int(s) for s in value.get("rollbacks", ())),
            stop=bool(value.get("stop", False)),
            save=bool(value.get("save", False)),
        )


class Job(Protocol):
    """Where the manager's work runs. Every process of a job makes the same calls in the same order.

    Call order: ``restore`` — ``pick`` then ``restore`` (both collective);
    each ``step`` — ``agree`` once; each save — ``capture`` in the training
    thread, then in the background thread ``any_rank`` (when the guard checks
    the staged state) and ``save``; a rollback from the bank — ``broadcast``
    of the leader's choice, then ``restore``. Only the ``leader`` commits,
    moves tags, prunes and records run events. ``retains`` says whether the
    last good state may be kept in memory for rollbacks.
    """

    leader: bool
    retains: bool

    def agree(self, decide: Callable[[], Decision], signalled: bool) -> tuple[Decision, bool]:
        """The leader's ``decide()`` on every process, and whether any process was signalled."""
        ...

    def broadcast(self, value: Any) -> Any:
        """The leader's JSON-safe ``value`` on every process (tuples arrive as lists)."""
        ...

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any process (in the background thread)."""
        ...

    def pick(
        self, bank: Bank, ref: str | None, run: str, init_from: str | None
    ) -> tuple[str | None, str | None]:
        """(checkpoint to restore or None; else the ``init_from`` checkpoint or None)."""
        ...

    def capture(self, state: TrainingState) -> dict[str, Any]:
        """This process's part of a checkpoint of ``state`` (live tensors: stage it before training goes on)."""
        ...

    def save(self, bank: Bank, tree: Any, options: Mapping[str, Any]) -> tuple[str, CheckpointInfo | None]:
        """Write the staged ``tree``: (the checkpoint's id, its info on the leader, else None)."""
        ...

    def restore(
        self, state: TrainingState, bank: Bank, cid: str, parts: Sequence[str] | None = None
    ) -> tuple[Any, list[str]]:
        """Restore ``state`` (its ``parts``, default all) from ``cid``: (saved manager state, notes)."""
        ...


class Solo:
    """The job of a single process (no process group): it leads, decides alone and may retain a state.

    Example:
        >>> Solo().broadcast(("r@3", None))
        ('r@3', None)
    """

    leader = True
    retains = True

    def agree(self, decide: Callable[[], Decision], signalled: bool) -> tuple[Decision, bool]:
        return decide(), signalled

    def broadcast(self, value: Any) -> Any:
        return value

    def any_rank(self, flag: bool) -> bool:
        return flag

    def pick(
        self, bank: Bank, ref: str | None, run: str, init_from: str | None
    ) -> tuple[str | None, str | None]:
        if ref is not None:
            return bank.resolve(ref), None
        try:
            return bank.resolve(f"{run}@latest"), None
        except CheckpointNotFound:
            return None, None if init_from is None else bank.resolve(init_from)

    def capture(self, state: TrainingState) -> dict[str, Any]:
        return state.capture()

    def save(self, bank: Bank, tree: Any, options: Mapping[str, Any]) -> tuple[str, CheckpointInfo | None]:
        info = bank.save(tree, **options)
        return info.id, info

    def restore(
        self, state: TrainingState, bank: Bank, cid: str, parts: Sequence[str] | None = None
    ) -> tuple[Any, list[str]]:
        if "dcp" in bank.info(cid).meta:
            # Saved through DCP (a distributed job): load it the same way, as the only rank.
            from .distributed import Distributed
            from .distributed import restore as dist_restore

            return dist_restore(state, bank, cid, Distributed.alone(), parts=parts)
        tree = bank.load(cid)
        state.load(tree, parts=parts)
        manager = tree.get("manager") if isinstance(tree, Mapping) and parts is None else None
        return manager, []


def choose_job(distributed: bool | None, timeout: float | None = None) -> Job:
    """The job a manager runs in: ``Solo`` unless asked for a distributed one, or a process group is up.

    Example:
        >>> type(choose_job(False)).__name__
        'Solo'
    """
    if distributed is False:
        return Solo()
    if distributed is None:
        dist = sys.modules.get("torch.distributed")
        if dist is None or not (dist.is_available() and dist.is_initialized()):
            return Solo()
    from .distributed import Distributed, DistributedJob

    return DistributedJob(Distributed(timeout))
