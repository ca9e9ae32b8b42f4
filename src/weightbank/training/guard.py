"""Guard: notices divergence (NaN/Inf, loss spikes) so the manager can roll back automatically.

After every step the manager hands the step's metrics to ``Guard.check``.
A watched metric (``loss`` and, when reported, ``grad_norm``) that is NaN or
infinite, or — with ``spike=k`` — above ``k`` times the median of its last
``window`` healthy values (once ``min_history`` of them are known), makes
``check`` return the reason. Healthy values join the window; bad ones never do.

The manager then restores the last good state, skips the batches that led
there, scales the learning rate by ``lr_scale`` and records a ``rollback``
event. ``max_rollbacks`` rollbacks within ``within`` steps are allowed; the
divergence that would need one more raises TrainingDiverged.

Example:
    >>> from weightbank.training.guard import Guard
    >>> g = Guard(spike=3.0, min_history=3)
    >>> [g.check({"loss": v}) for v in (1.0, 1.1, 0.9, 5.0, float("nan"))]
    [None, None, None, 'loss 5 > 3×median 1', 'loss is nan']
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from ..errors import TrainingDiverged

__all__ = ["Guard"]


class Guard:
    """Watches the loss (and grad norm) for NaN/Inf and spikes; holds the rollback budget.

    Example:
        >>> Guard(nan=True, spike=5.0, lr_scale=0.5)
        Guard(nan=True, spike=5.0, window=50, watch=('loss', 'grad_norm'), lr_scale=0.5)
    """

    def __init__(
        self,
        *,
        nan: bool = True,
        spike: float | None = None,
        window: int = 50,
        min_history: int = 10,
        watch: Sequence[str] = ("loss", "grad_norm"),
        lr_scale: float = 1.0,
        max_rollbacks: int = 3,
        within: int = 1000,
    ) -> None:
        if spike is not None and not spike > 1:
            raise ValueError(f"spike is a factor over the recent median and must be > 1, not {spike!r}")
        if window < 1 or min_history < 1 or max_rollbacks < 0 or within < 1:
            raise ValueError("window, min_history and within must be >= 1 and max_rollbacks >= 0")
        if not lr_scale > 0:
            raise ValueError(f"lr_scale must be positive, not {lr_scale!r}")
        self.nan = nan
        self.spike = spike
        self.window = window
        self.min_history = min(min_history, window)
        self.watch = tuple(watch)
        self.lr_scale = float(lr_scale)
        self.max_rollbacks = max_rollbacks
        self.within = within
        self.history: dict[str, deque[float]] = {m: deque(maxlen=window) for m in self.watch}
        self.rollbacks: list[int] = []

    def __repr__(self) -> str:
        return (
            f"Guard(nan={self.nan}, spike={self.spike}, window={self.window}, watch={self.watch},"
            f" lr_scale={self.lr_scale})"
        )

    def check(self, metrics: Mapping[str, Any]) -> str | None:
        """Why this step diverged (for the first watched metric that did), or None; healthy values are remembered."""
        reasons: list[str] = []
        healthy: list[tuple[str, float]] = []
        for name in self.watch:
            v = metrics.get(name)
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            v = float(v)
            if not math.isfinite(v):
                if self.nan:
                    reasons.append(f"{name} is {v}")
                continue
            past = self.history[name]
            if self.spike is not None and len(past) >= self.min_history:
                median = statistics.median(past)
                if median > 0 and v > self.spike * median:
                    reasons.append(f"{name} {v:.4g} > {self.spike:g}×median {median:.4g}")
                    continue
            healthy.append((name, v))
        if reasons:
            return reasons[0]
        for name, v in healthy:
            self.history[name].append(v)
        return None

    def allow_rollback(self, step: int, reason: str) -> None:
        """Count a rollback at ``step``; raise TrainingDiverged when the budget is spent."""
        recent = [s for s in self.rollbacks if step - s < self.within]
        if len(recent) >= self.max_rollbacks:
            raise TrainingDiverged(
                step,
                reason,
                recent,
                detail=f"{len(recent)} automatic rollback(s) within {self.within} steps already",
            )
        self.rollbacks = [*recent, step]

    def state_dict(self) -> dict[str, Any]:
        """The windows of healthy values and the recent rollbacks (stored in every checkpoint)."""
        return {"history": {k: list(v) for k, v in self.history.items()}, "rollbacks": list(self.rollbacks)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        hist = state.get("history", {})
        self.history = {m: deque((float(x) for x in hist.get(m, [])), maxlen=self.window) for m in self.watch}
        self.rollbacks = [int(s) for s in state.get("rollbacks", [])]
