"""Retention: which checkpoints of a run survive pruning — the one engine behind every keep rule.

Rules are small objects; a checkpoint survives if *any* rule keeps it (a union):

- ``LastN(n)``: the ``n`` newest;
- ``BestN(metric, k, mode)``: the ``k`` best by a metric (lowest for ``"min"``);
- ``EveryN(steps)``: every checkpoint whose step is a multiple of ``steps``;
- ``MaxAge(seconds)``: everything younger than that.

:meth:`weightbank.Bank.prune` (and ``weightbank prune``) turns its keywords into
these rules (:func:`prune_rules`); the training ``CheckpointManager`` takes them
directly (``keep=[LastN(3), BestN("val_loss", 2)]``) and adds that the newest
and tagged checkpoints always survive (:func:`to_keep`).

**One order, one tie rule.** A run's checkpoints are ordered by creation time,
then step, then id; "newest" is the last in that order. Ranking by a metric
uses only values that are finite numbers (missing, non-numeric, NaN and
infinite values never rank), and among equal values the *newest checkpoint
wins*. The same rule picks ``<run>@best:<metric>`` (:mod:`weightbank.bank.refs`),
``BestN`` and ``prune(keep_best=...)``, and moves the manager's
``<run>.best.<metric>`` tag, so ``BestN(m, 1)`` keeps exactly the checkpoint
``run@best:m`` names.

Example:
    >>> from weightbank.bank.retention import best_first
    >>> best_first([0.5, 0.2, None, 0.2], "min")   # newest first: index 1 is newer than index 3
    [1, 3, 0]
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

from ..errors import InvalidArgument
from .results import CheckpointInfo

__all__ = [
    "BestN",
    "EveryN",
    "KeepPolicy",
    "LastN",
    "MaxAge",
    "Mode",
    "best_first",
    "check_mode",
    "kept",
    "metric_value",
    "positive",
    "prune_rules",
    "to_keep",
]

Mode = Literal["min", "max"]


def check_mode(mode: object, name: str = "mode") -> Mode:
    """``mode`` if it is ``"min"`` or ``"max"``; InvalidArgument otherwise.

    Example:
        >>> check_mode("max")
        'max'
    """
    if mode == "min":
        return "min"
    if mode == "max":
        return "max"
    raise InvalidArgument(name, mode, "must be 'min' or 'max'")


def positive(name: str, value: object) -> int:
    """``value`` if it is a positive int (not a bool); InvalidArgument otherwise.

    Example:
        >>> positive("n", 3)
        3
    """
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidArgument(name, value, "must be a positive int")
    return value


def metric_value(metrics: Mapping[str, Any], name: str) -> float | None:
    """The finite number ``metrics[name]``, or None when absent, not a number, NaN or infinite.

    Example:
        >>> metric_value({"loss": 1, "acc": float("nan")}, "loss"), metric_value({"acc": float("nan")}, "acc")
        (1.0, None)
    """
    v = metrics.get(name)
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return None
    try:
        number = float(v)  # an int past a float's range (10**400) is no usable metric either
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def best_first(values: Sequence[float | None], mode: Mode) -> list[int]:
    """Indices of the ranked ``values`` (newest first; None does not rank), best first, newest first on ties.

    Example:
        >>> best_first([1.0, 3.0, 3.0], "max")
        [1, 2, 0]
    """
    sign = 1.0 if mode == "min" else -1.0
    ranked = sorted((sign * v, i) for i, v in enumerate(values) if v is not None)
    return [i for _, i in ranked]


@runtime_checkable
class KeepPolicy(Protocol):
    """Names the checkpoints of a run that must survive pruning.

    ``keep`` gets the run's checkpoints newest first and the current time
    (``time.time()``); it returns the ids to keep. Rules are combined by union.
    """

    def keep(self, checkpoints: Sequence[CheckpointInfo], now: float) -> set[str]: ...


class LastN:
    """Keep the ``n`` newest checkpoints.

    Example:
        >>> LastN(3)
        LastN(3)
    """

    def __init__(self, n: int) -> None:
        self.n = positive("n", n)

    def __repr__(self) -> str:
        return f"LastN({self.n})"

    def keep(self, checkpoints: Sequence[CheckpointInfo], now: float) -> set[str]:
        return {c.id for c in checkpoints[: self.n]}


class BestN:
    """Keep the ``k`` checkpoints with the best ``metric`` (lowest for ``mode="min"``), the newest on ties.

    Example:
        >>> BestN("val_loss", 2)
        BestN('val_loss', 2, mode='min')
    """

    def __init__(self, metric: str, k: int = 1, mode: str = "min") -> None:
        if not isinstance(metric, str) or not metric:
            raise InvalidArgument("metric", metric, "must be a metric name")
        self.metric = metric
        self.k = positive("k", k)
        self.mode = check_mode(mode)

    def __repr__(self) -> str:
        return f"BestN({self.metric!r}, {self.k}, mode={self.mode!r})"

    def keep(self, checkpoints: Sequence[CheckpointInfo], now: float) -> set[str]:
        order = best_first([metric_value(c.metrics, self.metric) for c in checkpoints], self.mode)
        return {checkpoints[i].id for i in order[: self.k]}


class EveryN:
    """Keep forever every checkpoint whose step is a multiple of ``steps``.

    Example:
        >>> EveryN(10_000)
        EveryN(10000)
    """

    def __init__(self, steps: int) -> None:
        self.steps = positive("steps", steps)

    def __repr__(self) -> str:
        return f"EveryN({self.steps})"

    def keep(self, checkpoints: Sequence[CheckpointInfo], now: float) -> set[str]:
        return {c.id for c in checkpoints if c.step is not None and c.step % self.steps == 0}


class MaxAge:
    """Keep every checkpoint younger than ``seconds`` (+ ``minutes``/``hours``/``days``); older ones may go.

    Example:
        >>> MaxAge(hours=6).seconds
        21600.0
    """

    def __init__(
        self, seconds: float = 0.0, *, minutes: float = 0.0, hours: float = 0.0, days: float = 0.0
    ) -> None:
        for name, v in (("seconds", seconds), ("minutes", minutes), ("hours", hours), ("days", days)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
                raise InvalidArgument(name, v, "must be a non-negative number")
        self.seconds = float(seconds + 60 * minutes + 3600 * hours + 86400 * days)
        if not self.seconds > 0:
            raise InvalidArgument("seconds", self.seconds, "MaxAge needs a positive age")

    def __repr__(self) -> str:
        return f"MaxAge(seconds={self.seconds})"

    def keep(self, checkpoints: Sequence[CheckpointInfo], now: float) -> set[str]:
        return {c.id for c in checkpoints if now - c.created < self.seconds}


def kept(checkpoints: Sequence[CheckpointInfo], rules: Sequence[KeepPolicy], now: float) -> set[str]:
    """The ids of ``checkpoints`` (one run, newest first) that at least one of ``rules`` keeps.

    Example:
        >>> kept([], [LastN(1)], 0.0)
        set()
    """
    out: set[str] = set()
    for rule in rules:
        out |= rule.keep(checkpoints, now)
    return out


def to_keep(
    checkpoints: Sequence[CheckpointInfo], rules: Sequence[KeepPolicy], now: float, protect: set[str]
) -> set[str]:
    """The training manager's survivors: kept by a rule, tagged, the newest, or in ``protect``; all with no rule.

    Example:
        >>> to_keep([], [LastN(1)], 0.0, set())
        set()
    """
    if not rules:
        return {c.id for c in checkpoints}
    keep = set(protect) | kept(checkpoints, rules, now)
    if checkpoints:
        keep.add(checkpoints[0].id)
    keep |= {c.id for c in checkpoints if c.tags}
    return keep


def prune_rules(
    *,
    keep_last: int | None = None,
    keep_best: Sequence[Any] | None = None,
    keep_every: int | None = None,
    older_than: float | None = None,
) -> list[KeepPolicy]:
    """The rules :meth:`weightbank.Bank.prune`'s keywords stand for (InvalidArgument for a bad one).

    ``keep_last=0`` and ``older_than=0`` are rules that keep nothing (every
    checkpoint is a candidate); ``keep_best`` is ``(metric, k)`` or
    ``(metric, k, "min"|"max")``.

    Example:
        >>> prune_rules(keep_last=2, keep_best=("val_loss", 1, "max"), older_than=0)
        [LastN(2), BestN('val_loss', 1, mode='max')]
    """
    rules: list[KeepPolicy] = []
    if keep_last is not None:
        if isinstance(keep_last, bool) or not isinstance(keep_last, int) or keep_last < 0:
            raise InvalidArgument("keep_last", keep_last, "must be an int >= 0")
        if keep_last:
            rules.append(LastN(keep_last))
    if keep_best is not None:
        if isinstance(keep_best, str) or not isinstance(keep_best, Sequence) or len(keep_best) not in (2, 3):
            raise InvalidArgument("keep_best", keep_best, "must be (metric, k) or (metric, k, 'min'|'max')")
        try:
            rules.append(BestN(*keep_best))
        except InvalidArgument as e:
            raise InvalidArgument("keep_best", keep_best, f"{e.name} {e.reason}") from None
    if keep_every is not None:
        rules.append(EveryN(positive("keep_every", keep_every)))
    if older_than is not None:
        if isinstance(older_than, bool) or not isinstance(older_than, (int, float)) or not older_than >= 0:
            raise InvalidArgument("older_than", older_than, "must be a number of seconds >= 0")
        if older_than > 0:
            rules.append(MaxAge(older_than))
    return rules
