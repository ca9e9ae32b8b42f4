"""What follows a committed save of a run: moving its best tags, then pruning what no keep rule keeps.

``<run>.best.<metric>`` is kept on the best checkpoint of every monitored
metric (from ``BestN``, ``OnImprovement`` and ``EarlyStopping``); the name is
made fit for the tag grammar by :func:`weightbank.bank.layout.sanitize_name`
and checked when the keeper is made, never first by the save thread. Ties go
to the newest checkpoint, the rule of the bank's retention engine
(:mod:`weightbank.bank.retention`) and of ``<run>@best:<metric>``, so the tag,
the ref and ``BestN(metric, 1)`` always name the same checkpoint. Pruning runs
only after the new checkpoint is committed and never deletes the newest, a
tagged one or one the caller protects (the retained last good state).

A damaged tag record (one ``bank.tags()`` lists with a ``problem``) may have
protected any checkpoint, so while one exists the keeper prunes nothing — the
bank's ``delete`` would refuse as well — and a best tag whose own record is
damaged is not moved. Training goes on: each damaged tag is reported once, as
a :class:`DamagedTagWarning` the manager raises on the training thread at its
next ``step``, ``wait`` or ``close``, naming ``weightbank untag --force NAME``
(``Bank.untag(name, force=True)``), which replaces the record. After that the
tag is pointed at ``<run>@best:<metric>`` again and pruning resumes.

Example:
    >>> import torch, weightbank as wb
    >>> from weightbank.training.keeping import Keeper
    >>> bank = wb.open("memory://")
    >>> keeper = Keeper(bank, "r", keep=[wb.LastN(1)], monitored={"val": "min"})
    >>> for s in (1, 2): keeper.after_commit(bank.save({"w": torch.ones(1)}, run="r", step=s, metrics={"val": 0.5}))
    >>> [c.step for c in bank.log("r")], bank.info(keeper.tag("val")).step   # the tie went to the newest
    ([2], 2)
"""

from __future__ import annotations

import time
import warnings
from collections import deque
from collections.abc import Callable, Mapping, Sequence

from ..bank.bank import Bank
from ..bank.layout import check_new_name, sanitize_name
from ..bank.results import CheckpointInfo
from ..bank.retention import KeepPolicy, metric_value, to_keep
from ..errors import CheckpointNotFound, CorruptObject

__all__ = ["DamagedTagWarning", "Keeper"]


class DamagedTagWarning(UserWarning):
    """A tag record is damaged: the manager pruned nothing, or left that best tag where it was; training went on."""


class Keeper:
    """Best tags and retention of one run (see the module docstring)."""

    def __init__(
        self,
        bank: Bank,
        run: str,
        *,
        keep: Sequence[KeepPolicy] = (),
        monitored: Mapping[str, str] | None = None,
        protected: Callable[[], set[str]] = set,
    ) -> None:
        self.bank = bank
        self.run = run
        self.keep = list(keep)
        self.monitored = dict(monitored or {})
        self.protected = protected
        for metric in self.monitored:
            check_new_name("tag", self.tag(metric))  # e.g. too long: refused before any training
        self._best: dict[str, float | None] = {}
        # Metrics whose tag was left unmoved while its record was damaged: ranked again once it is replaced.
        self._stale: set[str] = set()
        self._warned: set[tuple[str, str]] = set()  # (tag, what was skipped) already reported
        self._pending: deque[UserWarning] = deque()  # filled by the save thread, raised by warn_pending

    def tag(self, metric: str) -> str:
        """The name of the tag kept on the best checkpoint for ``metric`` (``<run>.best.<metric>``)."""
        return sanitize_name(f"{self.run}.best.{metric}")

    def damaged(self) -> dict[str, str]:
        """Every tag whose record is damaged: name → what is wrong with it."""
        return {t.name: t.problem for t in self.bank.tags() if t.problem}

    def after_commit(self, info: CheckpointInfo) -> None:
        """Move the best tags to ``info`` where it is best (or tied), then prune the run."""
        if not self.monitored and not self.keep:
            return
        damaged = self.damaged()
        unmoved = [m for m, mode in self.monitored.items() if not self._move_best(info, m, mode, damaged)]
        unpruned = bool(self.keep) and not self.prune(protect={info.id}, damaged=damaged)
        self._report(damaged, unmoved, unpruned)

    def _move_best(self, info: CheckpointInfo, metric: str, mode: str, damaged: dict[str, str]) -> bool:
        """Move ``metric``'s tag to ``info`` if it is the best (or tied); False if its record is damaged."""
        if metric in self._stale:
            return self._point_at_best(
                metric, mode, f"best {metric}, ranked again: its record was replaced", damaged
            )
        value = metric_value(info.metrics, metric)
        if value is None:
            return True
        tag = self.tag(metric)
        if tag in damaged:
            return self._leave(metric)
        try:
            if metric not in self._best:
                self._best[metric] = self._tagged_value(tag, metric)
            best = self._best[metric]
            if best is None or (value <= best if mode == "min" else value >= best):
                self.bank.tag(tag, info.id, why=f"best {metric}={value:g} at step {info.step}")
                self._best[metric] = value
        except CorruptObject as e:
            return self._damaged_since(metric, damaged, e)
        return True

    def _tagged_value(self, tag: str, metric: str) -> float | None:
        try:
            return metric_value(self.bank.info(tag).metrics, metric)
        except CheckpointNotFound:
            return None

    def prune(self, protect: set[str], damaged: dict[str, str] | None = None) -> bool:
        """Delete the run's checkpoints no keep rule keeps (never the newest, a tagged or a protected one).

        Deletes nothing and returns False while any tag record is damaged
        (``damaged``, as :meth:`damaged` lists them; found again if not given).
        """
        damaged = self.damaged() if damaged is None else damaged
        if damaged:
            return False
        infos = self.bank.log(self.run)
        keep = to_keep(infos, self.keep, time.time(), protect | self.protected())
        for c in infos:
            if c.id not in keep and not c.tags:
                try:
                    self.bank.delete(c.id, why=f"retention of run {self.run}")
                except CorruptObject:
                    found = self.damaged()
                    if not found:
                        raise
                    damaged.update(found)  # damaged since we looked: the bank refused to delete
                    return False
        return True

    def tag_best(self, metric: str, mode: str, why: str) -> None:
        """Point the metric's best tag at ``<run>@best:<metric>:<mode>`` (if any checkpoint has the metric)."""
        damaged = self.damaged()
        if not self._point_at_best(metric, mode, why, damaged):
            self._report(damaged, [metric], False)

    def _point_at_best(self, metric: str, mode: str, why: str, damaged: dict[str, str]) -> bool:
        """:meth:`tag_best`; False (nothing moved) if the tag's record is damaged."""
        tag = self.tag(metric)
        if tag in damaged:
            return self._leave(metric)
        try:
            best = self.bank.resolve(f"{self.run}@best:{metric}:{mode}")
        except CheckpointNotFound:
            best = None
        try:
            if best is not None:
                try:
                    current: str | None = self.bank.resolve(tag)
                except CheckpointNotFound:
                    current = None
                if current != best:
                    self.bank.tag(tag, best, why=why)
        except CorruptObject as e:
            return self._damaged_since(metric, damaged, e)
        self._stale.discard(metric)
        self._best.pop(metric, None)  # read from the tagged checkpoint at the next commit
        return True

    def _leave(self, metric: str) -> bool:
        """Leave ``metric``'s tag unmoved (its record is damaged); rank the run again once it is replaced."""
        self._stale.add(metric)
        self._best.pop(metric, None)
        return False

    def _damaged_since(self, metric: str, damaged: dict[str, str], error: CorruptObject) -> bool:
        """A move met CorruptObject: if the tag's record is damaged now, leave the tag; else it is not ours."""
        tag = self.tag(metric)
        problem = self.damaged().get(tag)
        if not problem:
            raise error  # damage elsewhere (a checkpoint's manifest): the save reports it
        damaged[tag] = problem
        return self._leave(metric)

    def _report(self, damaged: Mapping[str, str], unmoved: Sequence[str], unpruned: bool) -> None:
        """Queue one DamagedTagWarning per damaged tag for what was newly skipped because of it."""
        self._warned = {w for w in self._warned if w[0] in damaged}  # repaired: a new damage warns again
        tags_of = {self.tag(m): m for m in unmoved}
        for name, problem in sorted(damaged.items()):
            skipped = []
            if unpruned and (name, "prune") not in self._warned:
                self._warned.add((name, "prune"))
                skipped.append(
                    f"run {self.run!r} prunes nothing while it is damaged (it may protect any checkpoint)"
                )
            if name in tags_of and (name, "move") not in self._warned:
                self._warned.add((name, "move"))
                metric = tags_of[name]
                skipped.append(
                    f"the tag is not moved to the best {metric} checkpoint (once the record is replaced it"
                    f" is pointed at {self.run}@best:{metric}:{self.monitored.get(metric, 'min')})"
                )
            if skipped:
                self._pending.append(
                    DamagedTagWarning(
                        f"tag {name!r} has a damaged record ({problem}): {'; '.join(skipped)}. Training goes"
                        f" on. `weightbank untag --force {name}` (Bank.untag({name!r}, force=True)) replaces"
                        " the record, keeping its bytes under quarantine/; `weightbank verify` lists every"
                        " damaged record."
                    )
                )

    def note(self, warning: UserWarning) -> None:
        """Queue ``warning`` (from the save thread) for :meth:`warn_pending` to issue."""
        self._pending.append(warning)

    def warn_pending(self, stacklevel: int = 1) -> None:
        """Issue the warnings (DamagedTagWarning, RekeySkipped) queued since the last call, in the calling thread.

        ``stacklevel`` counts from the caller, as ``warnings.warn`` does from
        itself (1: the line that called this).
        """
        while self._pending:
            warnings.warn(self._pending.popleft(), stacklevel=stacklevel + 1)
