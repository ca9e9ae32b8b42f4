"""Small, composable policies: when to save, what to keep, when to stop.

When to save (any policy saying yes saves; call order per step:
``should_save(step, metrics, now)`` on every policy, then ``saved(step, now)``
on every policy if a save was started):

- ``Every(steps=N)``: when ``step % N == 0`` (``step`` = steps done);
- ``Every(seconds=T)``: when T seconds passed since the last save;
- ``OnImprovement(metric, min_delta=..., mode="min")``: when the metric improves.

What to keep (a checkpoint survives if any rule keeps it; the newest and
tagged checkpoints always survive; with no rule nothing is pruned):

- ``LastN(n)``, ``BestN(metric, k, mode)``, ``EveryN(steps)`` (kept forever),
  ``MaxAge(seconds)`` (everything younger).

The keep rules are the bank's retention engine (:mod:`weightbank.bank.retention`,
re-exported here), so ``Bank.prune``, ``<run>@best:<metric>`` and the manager
rank and break ties the same way (the newest checkpoint wins a tie).

When to stop: ``EarlyStopping(metric, patience, min_delta, mode)``.

Policies with memory (best value so far, evaluations without improvement)
have ``state_dict()/load_state_dict()``; the manager stores it in every
checkpoint, so a resumed run decides exactly as an uninterrupted one.

Example:
    >>> from weightbank.training.policies import Every, LastN
    >>> [s for s in range(1, 7) if Every(steps=3).should_save(s, {}, 0.0)]
    [3, 6]
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol, runtime_checkable

from ..bank.retention import (
    BestN,
    EveryN,
    KeepPolicy,
    LastN,
    MaxAge,
    Mode,
    check_mode,
    metric_value,
    positive,
    to_keep,
)
from ..errors import InvalidArgument

__all__ = [
    "BestN",
    "EarlyStopping",
    "Every",
    "EveryN",
    "KeepPolicy",
    "LastN",
    "MaxAge",
    "OnImprovement",
    "SavePolicy",
    "improved",
    "metric_value",
    "to_keep",
]


def _min_delta(value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise InvalidArgument("min_delta", value, "must be a number >= 0")
    return float(value)


def improved(value: float, best: float | None, min_delta: float, mode: Mode) -> bool:
    """Whether ``value`` beats ``best`` by more than ``min_delta`` in direction ``mode``.

    Example:
        >>> improved(0.9, 1.0, 0.05, "min"), improved(0.97, 1.0, 0.05, "min")
        (True, False)
    """
    if best is None:
        return True
    return value < best - min_delta if mode == "min" else value > best + min_delta


@runtime_checkable
class SavePolicy(Protocol):
    """Decides after each step whether to save.

    Call order, once per step: ``should_save`` on every policy (each sees every
    step, so it can keep its own memory), then ``saved`` on every policy when a
    save was started for any reason (a policy, ``save_now``, a signal).
    ``state_dict``/``load_state_dict`` carry the memory across a resume.
    """

    def should_save(self, step: int, metrics: Mapping[str, Any], now: float) -> bool: ...

    def saved(self, step: int, now: float) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None: ...


class Every:
    """Save every ``steps`` steps, or every ``seconds`` of wall time (exactly one of them).

    Example:
        >>> Every(steps=500)
        Every(steps=500)
    """

    def __init__(self, *, steps: int | None = None, seconds: float | None = None) -> None:
        if (steps is None) == (seconds is None):
            raise InvalidArgument("steps", steps, "Every needs exactly one of steps= or seconds=")
        self.steps = None if steps is None else positive("steps", steps)
        if seconds is not None and (
            isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds > 0
        ):
            raise InvalidArgument("seconds", seconds, "must be a positive number of seconds")
        self.seconds = None if seconds is None else float(seconds)
        self._last: float | None = None

    def __repr__(self) -> str:
        return f"Every(steps={self.steps})" if self.steps else f"Every(seconds={self.seconds})"

    def should_save(self, step: int, metrics: Mapping[str, Any], now: float) -> bool:
        if self.steps is not None:
            return step % self.steps == 0
        if self._last is None:
            self._last = now
        return self.seconds is not None and now - self._last >= self.seconds

    def saved(self, step: int, now: float) -> None:
        self._last = now

    def state_dict(self) -> dict[str, Any]:
        return {}  # wall-clock time does not carry across processes

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self._last = None


class OnImprovement:
    """Save whenever ``metric`` improves on its best so far by more than ``min_delta``.

    Example:
        >>> p = OnImprovement("val_loss")
        >>> [p.should_save(s, {"val_loss": v}, 0.0) for s, v in [(1, 1.0), (2, 1.2), (3, 0.8)]]
        [True, False, True]
    """

    def __init__(self, metric: str, *, min_delta: float = 0.0, mode: str = "min") -> None:
        self.metric = metric
        self.min_delta = _min_delta(min_delta)
        self.mode = check_mode(mode)
        self.best: float | None = None

    def __repr__(self) -> str:
        return f"OnImprovement({self.metric!r}, min_delta={self.min_delta}, mode={self.mode!r})"

    def should_save(self, step: int, metrics: Mapping[str, Any], now: float) -> bool:
        v = metric_value(metrics, self.metric)
        if v is None or not improved(v, self.best, self.min_delta, self.mode):
            return False
        self.best = v
        return True

    def saved(self, step: int, now: float) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        best = state.get("best")
        self.best = None if best is None else float(best)


class EarlyStopping:
    """Stop when ``metric`` has not improved by more than ``min_delta`` for ``patience`` evaluations.

    Only steps that report the metric count as evaluations. ``observe``
    returns True when training should stop.

    Example:
        >>> es = EarlyStopping("val_loss", patience=2)
        >>> [es.observe({"val_loss": v}) for v in (1.0, 0.9, 0.95, 0.91)]
        [False, False, False, True]
    """

    def __init__(self, metric: str, patience: int, min_delta: float = 0.0, mode: str = "min") -> None:
        self.metric = metric
        self.patience = positive("patience", patience)
        self.min_delta = _min_delta(min_delta)
        self.mode = check_mode(mode)
        self.best: float | None = None
        self.bad = 0

    def __repr__(self) -> str:
        return f"EarlyStopping({self.metric!r}, patience={self.patience}, min_delta={self.min_delta})"

    def observe(self, metrics: Mapping[str, Any]) -> bool:
        v = metric_value(metrics, self.metric)
        if v is None:
            return False
        if improved(v, self.best, self.min_delta, self.mode):
            self.best, self.bad = v, 0
            return False
        self.bad += 1
        return self.bad >= self.patience

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "bad": self.bad}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        best = state.get("best")
        self.best = None if best is None else float(best)
        self.bad = int(state.get("bad", 0))
