"""Guard: notices divergence (NaN/Inf, loss spikes) so the manager can roll back automatically.

After every step the manager hands the step's metrics to ``Guard.check``.
A watched metric (``loss`` and, when reported, ``grad_norm``) that is NaN or
infinite, or — with ``spike=k`` — above ``k`` times the median of its last
``window`` healthy values (once ``min_history`` of them are known), makes
``check`` return the reason. Healthy values join the window; bad ones never do.

With ``finite_state`` (the default) the guard also checks the state the
manager is about to keep: before a save is written, the background thread
scans the staged copy of the model section (every parameter and buffer —
BatchNorm running statistics included) for NaN and infinities
(:func:`nonfinite`). A state that is not finite is never written and never
becomes the last good state: its handle's ``wait()`` raises
TrainingDiverged, and the manager's next ``step()`` rolls back to the newest
good checkpoint instead (when that comes from the bank, checkpoints whose
model is not finite are passed over).

The manager then restores the last good state, skips the batches that led
there, scales the learning rate by ``lr_scale`` (see
:mod:`weightbank.training.lr` for the schedulers that can be scaled; with
another one the manager refuses ``lr_scale``) and records a ``rollback``
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

import torch

from ..bank.bank import Bank
from ..errors import CheckpointNotFound, IncompatibleState, InvalidArgument, TrainingDiverged

__all__ = ["Guard", "nonfinite"]


def nonfinite(tree: Any, path: str = "") -> list[str]:
    """Key paths of the floating-point tensors in ``tree`` holding NaN or an infinity.

    A ``DTensor`` is checked on its local shard (no collective).

    Example:
        >>> nonfinite({"w": torch.ones(2), "bn": {"running_var": torch.tensor([1.0, float("nan")])}})
        ['bn.running_var']
    """
    if isinstance(tree, torch.Tensor):
        local = tree.to_local() if hasattr(tree, "to_local") else tree
        if (local.is_floating_point() or local.is_complex()) and not bool(torch.isfinite(local).all()):
            return [path]
        return []
    items: Any = ()
    if isinstance(tree, Mapping):
        items = tree.items()
    elif isinstance(tree, (list, tuple)):
        items = enumerate(tree)
    out = []
    for key, value in items:
        out.extend(nonfinite(value, f"{path}.{key}" if path else str(key)))
    return out


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
        finite_state: bool = True,
    ) -> None:
        if spike is not None and not (isinstance(spike, (int, float)) and spike > 1):
            raise InvalidArgument("spike", spike, "is a factor over the recent median and must be > 1")
        for name, value, least in (
            ("window", window, 1),
            ("min_history", min_history, 1),
            ("within", within, 1),
            ("max_rollbacks", max_rollbacks, 0),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise InvalidArgument(name, value, f"must be an int >= {least}")
        if (
            isinstance(lr_scale, bool)
            or not isinstance(lr_scale, (int, float))
            or not 0 < lr_scale < math.inf
        ):
            raise InvalidArgument("lr_scale", lr_scale, "must be a positive, finite factor")
        self.finite_state = bool(finite_state)
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

    def state_problem(self, tree: Any) -> str:
        """Why the model section of a staged state must not be kept (NaN/Inf in it), or ``""``.

        Example:
            >>> Guard().state_problem({"model": {"w": torch.tensor([float("inf")])}})
            'model state is not finite (model.w)'
        """
        if not self.finite_state or not isinstance(tree, Mapping) or "model" not in tree:
            return ""
        bad = nonfinite(tree["model"], "model")
        if not bad:
            return ""
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        return f"model state is not finite ({', '.join(bad[:3])}{more})"

    def newest_good(self, bank: Bank, run: str) -> str | None:
        """The newest checkpoint of ``run`` whose model this guard accepts (with ``finite_state``), or None.

        Example:
            >>> import weightbank as wb
            >>> bank = wb.open("memory://")
            >>> for v in (1.0, float("nan")): _ = bank.save({"model": {"w": torch.tensor([v])}}, run="r")
            >>> bank.info(Guard().newest_good(bank, "r")).metrics, bank.load(Guard().newest_good(bank, "r"))["model"]["w"].item()
            ({}, 1.0)
        """
        try:
            infos = bank.log(run)
        except CheckpointNotFound:
            return None
        for info in infos:
            if not self.finite_state:
                return info.id
            try:
                model = bank.load(info.id, select="model.*")
            except IncompatibleState:  # no model tensors: nothing that could be non-finite
                return info.id
            if not self.state_problem(model):
                return info.id
        return None

    def refusal(self, step: int) -> str:
        """Why a rollback at ``step`` is not allowed (the budget is spent), or ``""`` when it is.

        Example:
            >>> Guard(max_rollbacks=0).refusal(5)
            '0 automatic rollback(s) within 1000 steps already'
        """
        recent = [s for s in self.rollbacks if step - s < self.within]
        if len(recent) < self.max_rollbacks:
            return ""
        return f"{len(recent)} automatic rollback(s) within {self.within} steps already"

    def allow_rollback(self, step: int, reason: str) -> None:
        """Count a rollback at ``step``; raise TrainingDiverged when the budget is spent."""
        recent = [s for s in self.rollbacks if step - s < self.within]
        refused = self.refusal(step)
        if refused:
            raise TrainingDiverged(step, reason, recent, detail=refused)
        self.rollbacks = [*recent, step]

    def state_dict(self) -> dict[str, Any]:
        """The windows of healthy values and the recent rollbacks (stored in every checkpoint)."""
        return {"history": {k: list(v) for k, v in self.history.items()}, "rollbacks": list(self.rollbacks)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore what :meth:`state_dict` returned."""
        hist = state.get("history", {})
        self.history = {m: deque((float(x) for x in hist.get(m, [])), maxlen=self.window) for m in self.watch}
        self.rollbacks = [int(s) for s in state.get("rollbacks", [])]
