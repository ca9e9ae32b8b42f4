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

Example:
    >>> import torch, weightbank as wb
    >>> from weightbank.training.keeping import Keeper
    >>> bank = wb.open("memory://")
    >>> keeper = Keeper(bank, "r", keep=[wb.LastN(1)], monitored={"val": "min"})
    >>> for s in (1, 2): keeper.after_commit(bank.save({"w": torch.ones(1)}, run="r", step=s, metrics={"val": 0.5}))
    >>> [c.step for c in bank.log("r")], bank.show(keeper.tag("val")).info.step   # the tie went to the newest
    ([2], 2)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence

from ..bank.bank import Bank
from ..bank.layout import check_new_name, sanitize_name
from ..bank.results import CheckpointInfo
from ..bank.retention import KeepPolicy, metric_value, to_keep
from ..errors import CheckpointNotFound

__all__ = ["Keeper"]


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

    def tag(self, metric: str) -> str:
        """The name of the tag kept on the best checkpoint for ``metric`` (``<run>.best.<metric>``)."""
        return sanitize_name(f"{self.run}.best.{metric}")

    def after_commit(self, info: CheckpointInfo) -> None:
        """Move the best tags to ``info`` where it is best (or tied), then prune the run."""
        for metric, mode in self.monitored.items():
            value = metric_value(info.metrics, metric)
            if value is None:
                continue
            tag = self.tag(metric)
            if metric not in self._best:
                self._best[metric] = self._tagged_value(tag, metric)
            best = self._best[metric]
            if best is None or (value <= best if mode == "min" else value >= best):
                self.bank.tag(tag, info.id, why=f"best {metric}={value:g} at step {info.step}")
                self._best[metric] = value
        if self.keep:
            self.prune(protect={info.id})

    def _tagged_value(self, tag: str, metric: str) -> float | None:
        try:
            return metric_value(self.bank.show(tag).info.metrics, metric)
        except CheckpointNotFound:
            return None

    def prune(self, protect: set[str]) -> None:
        """Delete the run's checkpoints no keep rule keeps (never the newest, a tagged or a protected one)."""
        infos = self.bank.log(self.run)
        keep = to_keep(infos, self.keep, time.time(), protect | self.protected())
        for c in infos:
            if c.id not in keep and not c.tags:
                self.bank.delete(c.id, why=f"retention of run {self.run}")

    def tag_best(self, metric: str, mode: str, why: str) -> None:
        """Point the metric's best tag at ``<run>@best:<metric>:<mode>`` (if any checkpoint has the metric)."""
        try:
            best = self.bank.resolve(f"{self.run}@best:{metric}:{mode}")
        except CheckpointNotFound:
            return
        tag = self.tag(metric)
        try:
            current = self.bank.resolve(tag)
        except CheckpointNotFound:
            current = None
        if current != best:
            self.bank.tag(tag, best, why=why)
