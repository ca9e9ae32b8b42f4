"""Scaling a training run's learning rate by a factor — what ``Guard(lr_scale=...)`` does after a rollback.

Multiplying ``param_group["lr"]`` is not enough: most schedulers recompute the
rate from values of their own at the next ``step()`` (``OneCycleLR`` from the
group's ``max_lr``/``initial_lr``/``min_lr``, ``LambdaLR`` and the warm
restarts from ``base_lrs``, cosine from ``eta_min`` as well), so a factor
applied to the group alone is undone or distorted. :func:`scale_lr` scales,
besides every group's ``lr`` and ``initial_lr``, every value the scheduler
derives a rate from, so that each later rate is the factor times the one the
unscaled run would have had:

==================================================  =======================================
``LambdaLR``, ``MultiplicativeLR``, ``StepLR``,      ``base_lrs``
``MultiStepLR``, ``ConstantLR``, ``LinearLR``,
``ExponentialLR``, ``PolynomialLR``
``CosineAnnealingLR``, ``CosineAnnealingWarmRestarts``  ``base_lrs``, ``eta_min``
``CyclicLR``                                          ``base_lrs``, ``max_lrs``
``OneCycleLR``                                        the groups' ``max_lr``, ``min_lr``
``ReduceLROnPlateau``                                 ``min_lrs``
``SequentialLR``, ``ChainedScheduler``                each scheduler they hold
==================================================  =======================================

(and subclasses of these that keep their formula, such as the ``LambdaLR``
schedules of Hugging Face ``transformers``). Any other scheduler is scaled
only if it has a ``scale_lr(factor)`` method of its own (the
:class:`ScalableLR` protocol); otherwise :func:`unscalable` names it and the
manager refuses ``lr_scale`` before training starts, rather than pretend.

Example:
    >>> import torch
    >>> from weightbank.training.lr import scale_lr
    >>> opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=1.0)
    >>> sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1.0, total_steps=10)
    >>> scale_lr([opt], [sched], 0.5); opt.param_groups[0]["max_lr"]
    0.5
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch.optim import lr_scheduler as lrs

__all__ = ["SUPPORTED", "ScalableLR", "scale_lr", "unscalable"]

#: Scheduler classes scaled here, and the attributes (besides the optimizer's groups) holding rates.
SUPPORTED: dict[type, tuple[str, ...]] = {
    lrs.LambdaLR: ("base_lrs",),
    lrs.MultiplicativeLR: ("base_lrs",),
    lrs.StepLR: ("base_lrs",),
    lrs.MultiStepLR: ("base_lrs",),
    lrs.ConstantLR: ("base_lrs",),
    lrs.LinearLR: ("base_lrs",),
    lrs.ExponentialLR: ("base_lrs",),
    lrs.PolynomialLR: ("base_lrs",),
    lrs.CosineAnnealingLR: ("base_lrs", "eta_min"),
    lrs.CosineAnnealingWarmRestarts: ("base_lrs", "eta_min"),
    lrs.CyclicLR: ("base_lrs", "max_lrs"),
    lrs.OneCycleLR: ("base_lrs",),
    lrs.ReduceLROnPlateau: ("min_lrs",),
    lrs.SequentialLR: (),
    lrs.ChainedScheduler: (),
}
#: Param-group keys holding rates (``max_lr``/``min_lr`` are OneCycleLR's).
_GROUP_KEYS = ("lr", "initial_lr", "max_lr", "min_lr")


@runtime_checkable
class ScalableLR(Protocol):
    """A scheduler of another kind that knows how to scale its rates: ``scale_lr(factor)``.

    The optimizer's groups are scaled before it is called; it scales what
    the scheduler itself derives rates from.
    """

    def scale_lr(self, factor: float) -> None: ...


def _kind(sched: Any) -> type | None:
    """The supported class ``sched`` is an instance of (the most derived one), or None."""
    for cls in type(sched).__mro__:
        if cls in SUPPORTED:
            return cls
    return None


def _children(sched: Any) -> list[Any]:
    inner = getattr(sched, "_schedulers", None)
    return list(inner) if isinstance(inner, (list, tuple)) else []


def unscalable(schedulers: Iterable[Any]) -> list[str]:
    """Names (``module.Class``) of the schedulers :func:`scale_lr` cannot scale; [] when it can scale all.

    Example:
        >>> unscalable([object()])
        ['builtins.object']
    """
    out = []
    for sched in schedulers:
        if isinstance(sched, ScalableLR) and _kind(sched) is None:
            continue
        if _kind(sched) is None:
            cls = type(sched)
            out.append(f"{cls.__module__}.{cls.__qualname__}")
        out.extend(unscalable(_children(sched)))
    return out


def _times(value: Any, factor: float) -> Any:
    if isinstance(value, torch.Tensor):
        return value.mul_(factor) if value.is_floating_point() else value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value * factor
    if isinstance(value, list):
        return [_times(v, factor) for v in value]
    return value


def _scale_scheduler(sched: Any, factor: float) -> None:
    kind = _kind(sched)
    if kind is None:
        if isinstance(sched, ScalableLR):
            sched.scale_lr(factor)
        return
    for attr in SUPPORTED[kind]:
        if hasattr(sched, attr):
            setattr(sched, attr, _times(getattr(sched, attr), factor))
    if isinstance(getattr(sched, "_last_lr", None), list):
        sched._last_lr = _times(sched._last_lr, factor)
    for inner in _children(sched):
        _scale_scheduler(inner, factor)


def scale_lr(optimizers: Sequence[Any], schedulers: Sequence[Any], factor: float) -> None:
    """Multiply every rate of ``optimizers`` (their groups) and ``schedulers`` (what they derive rates from).

    Call :func:`unscalable` first: a scheduler it names is left as it is.
    """
    for opt in optimizers:
        for group in getattr(opt, "param_groups", []):
            for key in _GROUP_KEYS:
                if key in group:
                    group[key] = _times(group[key], factor)
    for sched in schedulers:
        _scale_scheduler(sched, factor)
