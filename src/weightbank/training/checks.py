"""Checking a checkpoint against a training state before anything is restored: all or nothing.

torch's ``load_state_dict`` copies every matching key before it raises, and a
restore touches several objects in turn, so a checkpoint that does not fit
could leave the model changed and the optimizer not. ``TrainingState.load``
therefore checks every section it is about to restore with :func:`problems`
and copies nothing unless all of them fit. Per section it checks what torch
itself would refuse, late:

==========  ====================================================================
model       the keys (strict) and the shape of every tensor
optimizer   its class, the number of parameter groups and of parameters in each
scheduler   its class, and the lengths torch assumes (lr lambdas, sub-schedulers)
scaler      every key the scaler's own state has
data        a ``ResumableLoader`` position parses
extra       a ``torch.Generator``'s state has the right size
rng         every global generator's state parses
==========  ====================================================================

Classes: a checkpoint records the class of every optimizer and scheduler
(:func:`classes`, under the tree's ``classes`` key, as ``module.qualname``),
and a restore into an object of another kind is refused — an ``SGD`` must not
silently take an ``AdamW``'s parameter groups, nor a ``CosineAnnealingLR`` a
``StepLR``'s state. What identifies the kind is the class's ``__qualname__``,
not its module (:func:`same_kind`): a class saved from ``__main__`` and
restored from the module that defines it, or a torch class that moved module
between torch versions, restores. One guard keeps a name from standing in for
torch: a checkpoint recording a torch class restores only into a torch class
of that qualname or a class of that qualname deriving from one, and a torch
object only from a recorded torch class. Checkpoints written before the
record load as they did. Objects of other types (a custom ``Stateful``) are checked for what they
are given only where torch requires a mapping: their own ``load_state_dict``
may still fail late.

Example:
    >>> import torch
    >>> from weightbank.training.checks import class_name, module_problems
    >>> class_name(torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1))
    'torch.optim.sgd.SGD'
    >>> module_problems(torch.nn.Linear(2, 2), {"weight": torch.zeros(3, 3), "bias": torch.zeros(2)})
    ['weight: checkpoint shape [3, 3] != [2, 2]']
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..errors import WeightbankError
from .rng import check_rng

__all__ = ["CLASSES", "class_name", "class_problem", "classes", "module_problems", "problems", "same_kind"]

#: The top-level key of a training checkpoint recording its optimizers' and schedulers' classes.
CLASSES = "classes"
#: Sections whose objects' classes are recorded and compared.
_CLASSED = ("optimizer", "scheduler")


def class_name(obj: object) -> str:
    """The fully qualified class name of ``obj`` (what the checkpoint records).

    Example:
        >>> class_name(torch.nn.Linear(1, 1))
        'torch.nn.modules.linear.Linear'
    """
    cls = type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _in_torch(module: str) -> bool:
    return module == "torch" or module.startswith("torch.")


def same_kind(recorded: str, cls: type) -> bool:
    """Whether ``recorded`` (a ``module.qualname`` from a checkpoint) names the kind of class ``cls`` is.

    The qualnames must agree — the recorded name is ``cls.__qualname__``
    with any module path before it, so the module a class was saved from
    does not matter. When the recorded class is torch's, ``cls`` must be torch's
    class of that qualname or derive from one; when ``cls`` is torch's, the
    recorded class must be torch's too (a class of another library named
    ``SGD`` is not ``torch.optim.SGD``).

    Example:
        >>> sgd = torch.optim.SGD
        >>> same_kind("torch.optim.sgd.SGD", sgd), same_kind("torch.optim._moved.SGD", sgd)
        (True, True)
        >>> same_kind("torch.optim.adamw.AdamW", sgd), same_kind("mylib.SGD", sgd)
        (False, False)
    """
    qualname = cls.__qualname__
    module = recorded[: -len(qualname) - 1] if recorded.endswith(f".{qualname}") else None
    if recorded != qualname and not (module and all(p.isidentifier() for p in module.split("."))):
        return False  # another qualname (``f.<locals>.X`` is no module path before ``X``)
    if _in_torch(recorded):
        return any(_in_torch(c.__module__) and c.__qualname__ == qualname for c in cls.__mro__)
    return not _in_torch(cls.__module__)


def classes(groups: Mapping[str, tuple[bool, Mapping[str, Any]]]) -> dict[str, Any]:
    """The ``classes`` record of a state's groups: ``{"optimizer": name or {name: class}, ...}``.

    Example:
        >>> opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
        >>> classes({"optimizer": (False, {"": opt})})
        {'optimizer': 'torch.optim.sgd.SGD'}
    """
    out: dict[str, Any] = {}
    for kind in _CLASSED:
        if kind in groups:
            several, objs = groups[kind]
            names = {name: class_name(obj) for name, obj in objs.items()}
            out[kind] = names if several else names[""]
    return out


def _saved_class(record: Any, kind: str, name: str) -> str | None:
    """The class the checkpoint recorded for ``kind``/``name``, or None (no record: an older checkpoint)."""
    if not isinstance(record, Mapping):
        return None
    entry = record.get(kind)
    if isinstance(entry, Mapping):
        entry = entry.get(name)
    return entry if isinstance(entry, str) else None


def module_problems(module: torch.nn.Module, saved: Any) -> list[str]:
    """What ``module.load_state_dict(saved)`` (strict) would refuse: keys and shapes; [] if it fits."""
    if not isinstance(saved, Mapping):
        return [f"the checkpoint holds a {type(saved).__name__}, not a state dict"]
    expected = module.state_dict()  # references to the live tensors: nothing is copied
    out = []
    missing = [k for k in expected if k not in saved]
    unexpected = [k for k in saved if k not in expected]
    if missing:
        out.append(f"missing in checkpoint: {', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}")
    if unexpected:
        out.append(f"not in the model: {', '.join(unexpected[:8])}{' …' if len(unexpected) > 8 else ''}")
    for key, dest in expected.items():
        if key not in saved or not isinstance(dest, torch.Tensor):
            continue
        if torch.nn.parameter.is_lazy(dest):
            continue  # an uninitialized parameter takes the checkpoint's shape
        got = saved[key]
        if not isinstance(got, torch.Tensor):
            out.append(f"{key}: the checkpoint holds a {type(got).__name__}, not a tensor")
        elif got.shape != dest.shape:
            out.append(f"{key}: checkpoint shape {list(got.shape)} != {list(dest.shape)}")
    return out


def _optimizer_problems(opt: Any, saved: Any) -> list[str]:
    if not isinstance(saved, Mapping):
        return [f"the checkpoint holds a {type(saved).__name__}, not an optimizer state"]
    if not isinstance(opt, torch.optim.Optimizer):
        return []
    groups = saved.get("param_groups")
    if not isinstance(saved.get("state"), Mapping) or not isinstance(groups, list):
        return ["not an optimizer state (no 'state' and 'param_groups')"]
    if len(groups) != len(opt.param_groups):
        return [
            f"the checkpoint has {len(groups)} parameter group(s), this optimizer {len(opt.param_groups)}"
        ]
    for i, (mine, theirs) in enumerate(zip(opt.param_groups, groups, strict=True)):
        params = theirs.get("params") if isinstance(theirs, Mapping) else None
        if not isinstance(params, list):
            return [f"parameter group {i} of the checkpoint lists no params"]
        if len(params) != len(mine["params"]):
            return [
                f"parameter group {i} has {len(params)} parameter(s) in the checkpoint,"
                f" {len(mine['params'])} in this optimizer"
            ]
    return []


def _scheduler_problems(sched: Any, saved: Any) -> list[str]:
    if not isinstance(saved, Mapping):
        return [f"the checkpoint holds a {type(saved).__name__}, not a scheduler state"]
    out = []
    for attr, key in (("lr_lambdas", "lr_lambdas"), ("_schedulers", "_schedulers"), ("base_lrs", "base_lrs")):
        mine = getattr(sched, attr, None)
        if not isinstance(mine, list):
            continue
        theirs = saved.get(key)
        if not isinstance(theirs, list) or len(theirs) != len(mine):
            n = len(theirs) if isinstance(theirs, list) else "no"
            out.append(f"the checkpoint has {n} {key}, this scheduler {len(mine)}")
    return out


def _scaler_problems(scaler: Any, saved: Any) -> list[str]:
    if not isinstance(saved, Mapping):
        return [f"the checkpoint holds a {type(saved).__name__}, not a scaler state"]
    needed = scaler.state_dict() if isinstance(scaler, torch.amp.GradScaler) else {}
    missing = sorted(set(needed) - set(saved))
    return [f"the checkpoint's scaler state lacks {', '.join(missing)}"] if missing else []


def _data_problems(data: Any, saved: Any) -> list[str]:
    from .data import ResumableLoader

    if isinstance(data, ResumableLoader):
        try:
            ResumableLoader.parse_position(saved)
        except WeightbankError as e:
            return [str(e)]
    return []


def _generator_problems(gen: torch.Generator, saved: Any) -> list[str]:
    state = saved.get("__generator__") if isinstance(saved, Mapping) else None
    try:
        ok = torch.as_tensor(state, dtype=torch.uint8).shape == gen.get_state().shape
    except (TypeError, ValueError, RuntimeError):
        ok = False
    return [] if ok else ["not the state of a torch.Generator of this kind"]


def class_problem(kind: str, name: str, obj: Any, record: Any) -> str:
    """How the class ``record`` names for ``kind``/``name`` is not ``obj``'s kind (:func:`same_kind`), or ``""``.

    Example:
        >>> class_problem("scheduler", "", object(), {"scheduler": "builtins.object"})
        ''
    """
    if kind not in _CLASSED:
        return ""
    recorded = _saved_class(record, kind, name)
    if recorded is None or same_kind(recorded, type(obj)):
        return ""
    return f"the checkpoint holds a {recorded}, this state a {class_name(obj)}"


def problems(kind: str, name: str, obj: Any, saved: Any, record: Any = None) -> list[str]:
    """What keeps ``saved`` from restoring into ``obj`` (section ``kind``, object ``name``); [] if it fits.

    ``record`` is the checkpoint's ``classes`` record (None for a checkpoint
    without one: then classes are not compared).

    Example:
        >>> sgd = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
        >>> problems("optimizer", "", sgd, sgd.state_dict(), {"optimizer": "torch.optim.adamw.AdamW"})
        ['the checkpoint holds a torch.optim.adamw.AdamW, this state a torch.optim.sgd.SGD']
    """
    mismatch = class_problem(kind, name, obj, record)
    if mismatch:
        return [mismatch]
    if kind == "model":
        return module_problems(obj, saved) if isinstance(obj, torch.nn.Module) else []
    if kind == "optimizer":
        return _optimizer_problems(obj, saved)
    if kind == "scheduler":
        return _scheduler_problems(obj, saved)
    if kind == "scaler":
        return _scaler_problems(obj, saved)
    if kind == "data":
        return _data_problems(obj, saved)
    if kind == "extra":
        return _generator_problems(obj, saved) if isinstance(obj, torch.Generator) else []
    if kind == "rng":
        try:
            check_rng(saved)
        except WeightbankError as e:
            return [str(e)]
    return []
