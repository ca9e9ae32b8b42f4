"""TrainingState: everything a training run needs to continue exactly, captured and restored by one object.

A checkpoint written through it is one tree (no pickle)::

    model        the model's state_dict, or {name: state_dict} for several models
    optimizer    optimizer.state_dict(), or {name: ...}
    scheduler    LR scheduler state_dict(s)
    scaler       AMP GradScaler state_dict
    data         the data position (e.g. ResumableLoader: epoch, batch index, seed)
    extra        {name: state_dict() | torch.Generator state | tensor | JSON-safe value}
    rng          Python random, numpy global, torch CPU and every CUDA generator

Only the sections the state was built with are written; restoring needs the
same sections (``strict``). Tensor names are key paths, so the model's
weights of a training checkpoint are ``model.*`` and can be loaded alone with
``bank.load(ref, into=model, prefix="model.")``.

Example:
    >>> import torch, weightbank as wb
    >>> model = torch.nn.Linear(2, 2); opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> state = wb.TrainingState(model=model, optimizer=opt, extra={"tokens_seen": 0})
    >>> sorted(state.capture())
    ['classes', 'extra', 'model', 'optimizer', 'rng']
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from ..errors import IncompatibleState, InvalidArgument, InvalidState
from . import lr
from .checks import CLASSES, class_problem, classes, problems
from .rng import capture_rng, restore_rng

__all__ = ["SECTIONS", "Stateful", "TrainingState", "clone_tree"]

#: The sections of a training checkpoint, in the order they are restored.
SECTIONS = ("model", "optimizer", "scheduler", "scaler", "data", "extra", "rng")


@runtime_checkable
class Stateful(Protocol):
    """Anything with ``state_dict()`` and ``load_state_dict()`` (modules, optimizers, schedulers, loaders)."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state_dict: Any, /) -> Any: ...


def clone_tree(tree: Any) -> Any:
    """A deep copy of a state tree: containers rebuilt, tensors and arrays cloned, values shared.

    Example:
        >>> t = {"w": torch.ones(1), "ids": [1, 2]}
        >>> c = clone_tree(t); c["w"] += 1; c["ids"].append(3); t
        {'w': tensor([1.]), 'ids': [1, 2]}
    """
    if isinstance(tree, torch.Tensor):
        return tree.detach().clone()
    if isinstance(tree, np.ndarray):
        return tree.copy()
    if isinstance(tree, dict):
        return {k: clone_tree(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [clone_tree(v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(clone_tree(v) for v in tree)
    return tree


def _named(kind: str, value: Any) -> tuple[bool, dict[str, Any]]:
    """(was it a mapping of several, {name: object}) with every object checked to be Stateful."""
    several = isinstance(value, Mapping)
    objs = dict(value) if several else {"": value}
    for name, obj in objs.items():
        if not isinstance(name, str):
            raise InvalidState(f"{kind}.{name!r}", f"{kind} names must be strings")
        if not isinstance(obj, Stateful):
            where = f"{kind}.{name}" if name else kind
            raise InvalidState(where, f"{type(obj).__qualname__} has no state_dict()/load_state_dict()")
    return several, objs


class TrainingState:
    """The full state of a training run: model(s), optimizer(s), scheduler(s), scaler, data position, extras, RNGs.

    ``model``, ``optimizer`` and ``scheduler`` take one object or a mapping of
    name to object. ``extra`` maps names to objects with
    ``state_dict()/load_state_dict()``, ``torch.Generator`` objects, tensors or
    JSON-safe values; after a restore, plain values are found again in
    ``state.extra``. ``rng=False`` leaves the global generators alone.

    Example:
        >>> import torch, weightbank as wb
        >>> from weightbank.training.state import clone_tree
        >>> model = torch.nn.Linear(2, 1); state = wb.TrainingState(model=model, rng=False)
        >>> tree = clone_tree(state.capture()); _ = torch.nn.init.zeros_(model.weight)
        >>> state.load(tree); bool(model.weight.abs().sum() > 0)
        True
    """

    def __init__(
        self,
        *,
        model: Any = None,
        optimizer: Any = None,
        scheduler: Any = None,
        scaler: Any = None,
        data: Any = None,
        extra: Mapping[str, Any] | None = None,
        rng: bool = True,
    ) -> None:
        self._groups: dict[str, tuple[bool, dict[str, Any]]] = {}
        for kind, value in (("model", model), ("optimizer", optimizer), ("scheduler", scheduler)):
            if value is not None:
                self._groups[kind] = _named(kind, value)
        for kind, value in (("scaler", scaler), ("data", data)):
            if value is not None:
                self._groups[kind] = _named(kind, value)
                if self._groups[kind][0]:
                    raise InvalidState(kind, f"pass one {kind} object, not a mapping")
        self.extra: dict[str, Any] = dict(extra or {})
        for name in self.extra:
            if not isinstance(name, str):
                raise InvalidState(f"extra.{name!r}", "extra names must be strings")
        self.rng = rng

    # -- what it holds ---------------------------------------------------------------
    def sections(self) -> tuple[str, ...]:
        """The sections this state writes, in restore order."""
        present = set(self._groups) | ({"extra"} if self.extra else set()) | ({"rng"} if self.rng else set())
        return tuple(s for s in SECTIONS if s in present)

    def objects(self, kind: str) -> dict[str, Any]:
        """The objects of one section by name (``""`` for a single unnamed one)."""
        return dict(self._groups.get(kind, (False, {}))[1])

    def is_named(self, kind: str) -> bool:
        """Whether section ``kind`` was given as a mapping of names (its tree is ``{name: state}``)."""
        return self._groups.get(kind, (False, {}))[0]

    @property
    def data(self) -> Any:
        """The data object (e.g. a ResumableLoader), or None."""
        return self._groups.get("data", (False, {"": None}))[1][""]

    # -- capture / load --------------------------------------------------------------
    def capture(self, sections: Sequence[str] | None = None) -> dict[str, Any]:
        """The current state (of ``sections``, default all) as a tree of live tensors and values.

        Copy it before training goes on.

        Example:
            >>> import torch
            >>> TrainingState(model=torch.nn.Linear(1, 1), rng=False).capture()["model"]["bias"].shape
            torch.Size([1])
        """
        wanted = set(self.sections() if sections is None else sections)
        tree: dict[str, Any] = {}
        for kind, (several, objs) in self._groups.items():
            if kind in wanted:
                states = {name: obj.state_dict() for name, obj in objs.items()}
                tree[kind] = states if several else states[""]
        if self.extra and "extra" in wanted:
            tree["extra"] = {name: self._extra_state(name, v) for name, v in self.extra.items()}
        if self.rng and "rng" in wanted:
            tree["rng"] = capture_rng()
        record = {k: v for k, v in self.classes().items() if k in wanted}
        if record:
            tree[CLASSES] = record
        return tree

    @staticmethod
    def _extra_state(name: str, value: Any) -> Any:
        if isinstance(value, torch.Generator):
            return {"__generator__": value.get_state()}
        if isinstance(value, Stateful) and not isinstance(value, torch.Tensor):
            return value.state_dict()
        return value

    def classes(self) -> dict[str, Any]:
        """The classes of the optimizers and schedulers, as a checkpoint records them (``classes``).

        Example:
            >>> import torch
            >>> opt = torch.optim.AdamW(torch.nn.Linear(1, 1).parameters())
            >>> TrainingState(optimizer=opt).classes()
            {'optimizer': 'torch.optim.adamw.AdamW'}
        """
        return classes(self._groups)

    def check_classes(self, record: Any, sections: Sequence[str]) -> None:
        """IncompatibleState if the checkpoint's ``classes`` record names another class for ``sections``.

        Example:
            >>> import torch
            >>> opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
            >>> TrainingState(optimizer=opt).check_classes({"optimizer": "torch.optim.adamw.AdamW"}, ["optimizer"])
            Traceback (most recent call last):
            weightbank.errors.IncompatibleState: cannot restore optimizer: the checkpoint holds a torch.optim.adamw.AdamW, this state a torch.optim.sgd.SGD; build the same optimizer and scheduler classes, or restore fewer parts= (e.g. ("model",)) and start the rest fresh
        """
        found = []
        for kind in (k for k in sections if k in self._groups):
            for name, obj in self._groups[kind][1].items():
                mismatch = class_problem(kind, name, obj, record)
                if mismatch:
                    found.append((f"{kind}.{name}" if name else kind, mismatch))
        self._refuse(found, classes_differ=bool(found))

    @staticmethod
    def _refuse(found: list[tuple[str, str]], *, classes_differ: bool = False) -> None:
        """Raise IncompatibleState listing ``found`` ((where, problem) pairs), if any."""
        if not found:
            return
        detail = "; ".join(f"cannot restore {where}: {problem}" for where, problem in found[:8])
        hint = (
            '; build the same optimizer and scheduler classes, or restore fewer parts= (e.g. ("model",))'
            " and start the rest fresh"
            if classes_differ
            else " (nothing was restored)"
        )
        raise IncompatibleState(detail + hint, list(dict.fromkeys(where for where, _ in found)))

    def load(
        self, tree: Mapping[str, Any], *, parts: Sequence[str] | None = None, strict: bool = True
    ) -> None:
        """Restore from a tree written by :meth:`capture` (e.g. ``bank.load(ref)``).

        ``parts`` restores only some sections (``("model",)`` to start a
        fine-tune from another run's weights); a checkpoint holding a bare
        ``state_dict`` (no sections) can be loaded into a single model that
        way. With ``strict`` every requested section must be in the tree.

        Example:
            >>> import torch
            >>> m = torch.nn.Linear(1, 1); s = TrainingState(model=m, rng=False)
            >>> s.load({"weight": torch.ones(1, 1), "bias": torch.zeros(1)}, parts=["model"]); m.weight.item()
            1.0
        """
        wanted = tuple(self.sections() if parts is None else parts)
        unknown = [p for p in wanted if p not in SECTIONS]
        if unknown:
            raise InvalidArgument(
                "parts", list(wanted), f"unknown state section(s) {unknown}; choose from {list(SECTIONS)}"
            )
        if not isinstance(tree, Mapping):
            raise IncompatibleState(f"a training checkpoint is a mapping, not {type(tree).__name__}")
        if wanted == ("model",) and "model" not in tree and "model" in self._groups:
            tree = {"model": tree if not self._groups["model"][0] else dict(tree)}
        missing = [p for p in wanted if p in self.sections() and p not in tree]
        if missing and strict:
            raise IncompatibleState(
                f"the checkpoint has no {', '.join(missing)} section(s) (it holds {sorted(tree)});"
                " pass parts= to restore less",
                missing,
            )
        kinds = [k for k in SECTIONS if k in wanted and k in tree]
        # Everything is checked before anything is copied: a checkpoint that does not fit leaves
        # every model, optimizer, scheduler, scaler, data position and generator as it was.
        record = tree.get(CLASSES)
        self.check_classes(record, kinds)
        found: list[tuple[str, str]] = []
        for kind in kinds:
            found += self._problems(kind, tree[kind], record, strict)
        self._refuse(found)
        for kind in kinds:
            if kind == "extra":
                self._load_extra(tree["extra"])
            elif kind == "rng":
                if self.rng:
                    restore_rng(tree["rng"])
            elif kind in self._groups:
                self._load_group(kind, tree[kind])

    def _problems(self, kind: str, value: Any, record: Any, strict: bool) -> list[tuple[str, str]]:
        """(where, problem) for everything in section ``kind`` of a checkpoint that would not restore."""
        if kind == "rng":
            return [("rng", p) for p in problems("rng", "", None, value)] if self.rng else []
        if kind == "extra":
            if not isinstance(value, Mapping):
                return [("extra", "the checkpoint's extra section is not a mapping")]
            absent = [n for n in self.extra if n not in value]
            out = [("extra", f"the checkpoint has no extra {absent}")] if absent and strict else []
            for name, saved in value.items():
                if name in self.extra:
                    out += [(f"extra.{name}", p) for p in problems("extra", name, self.extra[name], saved)]
            return out
        if kind not in self._groups:
            return []
        several, objs = self._groups[kind]
        states = value if several else {"": value}
        if not isinstance(states, Mapping) or set(states) != set(objs):
            held = sorted(states) if isinstance(states, Mapping) else type(states).__name__
            return [(kind, f"the checkpoint's {kind} section holds {held}, this state has {sorted(objs)}")]
        out = []
        for name, obj in objs.items():
            where = f"{kind}.{name}" if name else kind
            out += [(where, p) for p in problems(kind, name, obj, states[name], record)]
        return out

    def _load_group(self, kind: str, value: Any) -> None:
        several, objs = self._groups[kind]
        states = value if several else {"": value}
        for name, obj in objs.items():
            where = f"{kind}.{name}" if name else kind
            try:
                # Optimizers and schedulers keep references to what they are given: hand them copies.
                obj.load_state_dict(states[name] if kind == "model" else clone_tree(states[name]))
            except (RuntimeError, ValueError, KeyError, TypeError) as e:
                # Only what the checks above cannot foresee (a custom load_state_dict) gets here.
                raise IncompatibleState(f"cannot restore {where}: {e}", [where]) from None

    def _load_extra(self, saved: Mapping[str, Any]) -> None:
        for name, value in saved.items():
            current = self.extra.get(name)
            if isinstance(current, torch.Generator):
                current.set_state(torch.as_tensor(value["__generator__"], dtype=torch.uint8).clone())
            elif isinstance(current, Stateful) and not isinstance(current, torch.Tensor):
                current.load_state_dict(clone_tree(value))
            else:
                self.extra[name] = clone_tree(value)

    # -- what the manager adjusts on a rollback ------------------------------------------
    def data_position(self) -> Any:
        """A copy of the data object's state (its position), or None without one."""
        data = self.data
        return None if data is None else copy.deepcopy(data.state_dict())

    def set_data_position(self, position: Any) -> None:
        """Move the data object to ``position`` (from :meth:`data_position`)."""
        if self.data is not None and position is not None:
            self.data.load_state_dict(position)

    def scale_lr(self, factor: float) -> None:
        """Multiply every learning rate by ``factor``: the optimizers' groups and what the schedulers derive rates from.

        Every later rate is ``factor`` times the one the unscaled run would have
        had, for the schedulers :mod:`weightbank.training.lr` lists; with
        another one (see :meth:`unscalable_schedulers`) InvalidArgument, and
        nothing is changed.

        Example:
            >>> import torch
            >>> opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
            >>> TrainingState(optimizer=opt).scale_lr(0.5); opt.param_groups[0]["lr"]
            0.05
        """
        self.check_scalable(factor)
        lr.scale_lr(
            list(self.objects("optimizer").values()), list(self.objects("scheduler").values()), factor
        )

    def check_scalable(self, factor: float) -> None:
        """InvalidArgument (naming ``lr_scale``) if :meth:`scale_lr` cannot scale this state by ``factor``.

        Example:
            >>> class Flat:  # a scheduler of its own, without scale_lr()
            ...     def state_dict(self): return {}
            ...     def load_state_dict(self, state): pass
            >>> TrainingState(scheduler=Flat()).check_scalable(0.5)
            Traceback (most recent call last):
            weightbank.errors.InvalidArgument: lr_scale=0.5: cannot scale the learning rate of ...Flat: ...
        """
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 0 < factor < float("inf"):
            raise InvalidArgument("lr_scale", factor, "must be a positive, finite factor")
        bad = self.unscalable_schedulers()
        if bad:
            raise InvalidArgument(
                "lr_scale",
                factor,
                f"cannot scale the learning rate of {', '.join(bad)}: its rates would not follow the factor;"
                " give it a scale_lr(factor) method, use a torch.optim.lr_scheduler scheduler, or use"
                " Guard(lr_scale=1.0)",
            )

    def unscalable_schedulers(self) -> list[str]:
        """Names of this state's schedulers whose rates :meth:`scale_lr` cannot scale ([]: it can scale them all).

        Example:
            >>> import torch
            >>> opt = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
            >>> TrainingState(scheduler=torch.optim.lr_scheduler.OneCycleLR(opt, 1.0, total_steps=9)).unscalable_schedulers()
            []
        """
        return lr.unscalable(self.objects("scheduler").values())
