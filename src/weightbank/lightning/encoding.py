"""An explicit JSON encoding for what a Lightning checkpoint dict holds besides tensors and JSON.

A Lightning checkpoint holds hyper-parameters (an ``argparse.Namespace``, an
``AttributeDict``, dataclasses, enums, ``Path``\\ s), loop and callback
states. The bank stores tensors, numeric numpy arrays, JSON values, and
dicts, lists and tuples of them (:mod:`weightbank.format.tree`); no pickle.
:func:`encode` turns the common other values into tagged dicts and
:func:`decode` turns them back, so they round-trip exactly:

==============================  ===================================================
value                           stored as
==============================  ===================================================
``argparse.Namespace``          ``{"__wb__": "namespace", "v": {attr: value}}``
``AttributeDict``               ``{"__wb__": "attrdict", "v": {key: value}}``
``collections.OrderedDict``     ``{"__wb__": "odict", "v": {key: value}}``
``pathlib`` paths               ``{"__wb__": "path", "v": "a/b", "flavour": "posix", "concrete": true}``
``set`` / ``frozenset``         ``{"__wb__": "set" / "frozenset", "v": [items]}``
``torch.dtype``                 ``{"__wb__": "dtype", "v": "float32"}``
``torch.device``                ``{"__wb__": "device", "v": "cuda:0"}``
an ``enum.Enum`` member         ``{"__wb__": "enum", "cls": "mod:Qual", "v": name}``
a dataclass instance            ``{"__wb__": "dataclass", "cls": "mod:Qual", "v": {field: value}}``
==============================  ===================================================

Enums and dataclasses come back as their class only when its module is
already imported (nothing is imported because a stored name says so); else
an enum comes back as its name and a dataclass as a dict of its fields, with
a :class:`DecodeWarning`. Anything else is refused with an
:class:`~weightbank.errors.InvalidState` that names its key path and says how
to fix it, and a user dict holding the key ``"__wb__"`` is refused too.

Example:
    >>> from argparse import Namespace
    >>> from pathlib import PurePosixPath
    >>> tree = encode({"hparams": Namespace(lr=0.1, out=PurePosixPath("runs/a"))})
    >>> tree["hparams"]["__wb__"]
    'namespace'
    >>> decode(tree)
    {'hparams': Namespace(lr=0.1, out=PurePosixPath('runs/a'))}
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import functools
import inspect
import os
import pathlib
import sys
import warnings
from collections import OrderedDict
from typing import Any

import numpy as np
import torch

from ..errors import InvalidState

__all__ = ["TAG", "DecodeWarning", "decode", "encode"]


class DecodeWarning(UserWarning):
    """A stored enum or dataclass came back as its name or fields: its class is not imported."""


#: The key a tagged value's dict carries.
TAG = "__wb__"
_JSON = (type(None), bool, int, float, str)
_FLAVOURS: dict[str, type[pathlib.PurePath]] = {
    "posix": pathlib.PurePosixPath,
    "windows": pathlib.PureWindowsPath,
}


@functools.cache
def _attribute_dict() -> type | None:
    try:
        from lightning.fabric.utilities.data import AttributeDict
    except ImportError:  # pragma: no cover - lightning is this subpackage's requirement
        return None
    return AttributeDict


def _class_name(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def encode(value: Any, path: str = "") -> Any:
    """``value`` with every non-tree leaf the table above names encoded; InvalidState for the rest."""
    where = path or "<checkpoint>"
    if isinstance(value, (torch.Tensor, np.ndarray)) or type(value) in _JSON:
        return value
    if isinstance(value, (torch.dtype, torch.device)):
        kind = "dtype" if isinstance(value, torch.dtype) else "device"
        return {TAG: kind, "v": str(value).removeprefix("torch.")}
    if isinstance(value, enum.Enum):
        return {TAG: "enum", "cls": _class_name(type(value)), "v": value.name}
    if isinstance(value, argparse.Namespace):
        return {TAG: "namespace", "v": _dict(vars(value), path)}
    attribute_dict = _attribute_dict()
    if attribute_dict is not None and isinstance(value, attribute_dict):
        return {TAG: "attrdict", "v": _dict(value, path)}
    if type(value) is OrderedDict:
        return {TAG: "odict", "v": _dict(value, path)}
    if type(value) is dict:
        if TAG in value:
            raise InvalidState(
                _join(path, TAG), f"the key {TAG!r} is weightbank's own in a Lightning checkpoint; rename it"
            )
        return _dict(value, path)
    if type(value) in (list, tuple):
        items = [encode(v, _join(path, str(i))) for i, v in enumerate(value)]
        return items if type(value) is list else tuple(items)
    if isinstance(value, pathlib.PurePath):
        flavour = "windows" if isinstance(value, pathlib.PureWindowsPath) else "posix"
        return {TAG: "path", "v": str(value), "flavour": flavour, "concrete": isinstance(value, pathlib.Path)}
    if type(value) in (set, frozenset):
        items = [encode(v, _join(path, str(i))) for i, v in enumerate(sorted(value, key=repr))]
        return {TAG: type(value).__name__, "v": items}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value) if f.init}
        return {TAG: "dataclass", "cls": _class_name(type(value)), "v": _dict(fields, path)}
    raise InvalidState(
        where,
        f"a {type(value).__module__}.{type(value).__qualname__} cannot be stored without pickle: turn it"
        " into JSON values or a tensor (e.g. in on_save_checkpoint / state_dict), or drop it from the"
        " checkpoint; weightbank.lightning stores tensors, JSON values, dicts, lists, tuples, Namespace,"
        " AttributeDict, OrderedDict, paths, sets, enums, dataclasses, torch dtypes and devices",
    )


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _dict(value: Any, path: str) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for k, v in value.items():
        if type(k) not in (str, int):
            raise InvalidState(
                _join(path, repr(k)), f"a dict key must be a str or an int, not {type(k).__name__}"
            )
        out[k] = encode(v, _join(path, str(k)))
    return out


def _loaded_class(name: Any, path: str) -> type | None:
    """The class ``mod:Qual`` names if its module is imported already (nothing is imported here)."""
    if not isinstance(name, str) or ":" not in name:
        raise InvalidState(
            path or "<checkpoint>", f"a stored class name must be 'module:Qualname', not {name!r}"
        )
    module_name, qualname = name.split(":", 1)
    obj: Any = sys.modules.get(module_name)
    for part in qualname.split("."):
        # Static lookups only: a module's __getattr__ (a lazy import) or a descriptor never runs.
        obj = inspect.getattr_static(obj, part, None) if obj is not None else None
    if not isinstance(obj, type) or (obj.__module__, obj.__qualname__) != (module_name, qualname):
        return None
    return obj


def decode(value: Any, path: str = "") -> Any:
    """The inverse of :func:`encode` on a tree read back from the bank (untrusted: checked as it goes)."""
    if isinstance(value, list):
        return [decode(v, _join(path, str(i))) for i, v in enumerate(value)]
    if isinstance(value, tuple):
        return tuple(decode(v, _join(path, str(i))) for i, v in enumerate(value))
    if not isinstance(value, dict):
        return value
    if TAG not in value:
        return {k: decode(v, _join(path, str(k))) for k, v in value.items()}
    kind, inner = value.get(TAG), value.get("v")
    where = path or "<checkpoint>"

    def fields() -> dict[Any, Any]:
        if not isinstance(inner, dict):
            raise InvalidState(where, f"a stored {kind} must hold a dict")
        return {k: decode(v, _join(path, str(k))) for k, v in inner.items()}

    if kind == "namespace":
        items = fields()
        if not all(isinstance(k, str) for k in items):
            raise InvalidState(where, "a stored Namespace has a non-str attribute name")
        return argparse.Namespace(**items)
    if kind == "attrdict":
        attribute_dict = _attribute_dict()
        return fields() if attribute_dict is None else attribute_dict(fields())
    if kind == "odict":
        return OrderedDict(fields())
    if kind in ("set", "frozenset"):
        if not isinstance(inner, list):
            raise InvalidState(where, f"a stored {kind} must hold a list")
        members = [decode(v, _join(path, str(i))) for i, v in enumerate(inner)]
        try:
            return set(members) if kind == "set" else frozenset(members)
        except TypeError as e:
            raise InvalidState(where, f"a stored {kind} holds an unhashable item ({e})") from None
    if kind in ("path", "dtype", "device") and not isinstance(inner, str):
        raise InvalidState(where, f"a stored {kind} must hold a string")
    text = str(inner)
    if kind == "path":
        name = value.get("flavour", "posix")
        flavour = _FLAVOURS.get(name) if isinstance(name, str) else None
        if flavour is None:
            raise InvalidState(where, f"unknown path flavour {value.get('flavour')!r}")
        native = (flavour is pathlib.PurePosixPath) == (os.name != "nt")
        return pathlib.Path(text) if native and value.get("concrete") is True else flavour(text)
    if kind == "dtype":
        dtype = getattr(torch, text, None)
        if not isinstance(dtype, torch.dtype):
            raise InvalidState(where, f"{text!r} is not a torch dtype")
        return dtype
    if kind == "device":
        try:
            return torch.device(text)
        except (RuntimeError, ValueError) as e:
            raise InvalidState(where, f"{text!r} is not a torch device ({e})") from None
    if kind == "enum":
        if not isinstance(inner, str):
            raise InvalidState(where, "a stored enum must hold its member's name")
        cls = _loaded_class(value.get("cls"), path)
        if cls is not None and issubclass(cls, enum.Enum) and inner in cls.__members__:
            return cls[inner]
        warnings.warn(
            DecodeWarning(f"{where}: enum {value.get('cls')} is not imported; its member name is returned"),
            stacklevel=2,
        )
        return inner
    if kind == "dataclass":
        items = fields()
        cls = _loaded_class(value.get("cls"), path)
        if cls is not None and dataclasses.is_dataclass(cls):
            try:  # the class's own __init__ / __post_init__ runs, as when the user built it
                return cls(**items)
            except Exception as e:
                raise InvalidState(where, f"{value.get('cls')} refuses the stored fields ({e!r})") from None
        warnings.warn(
            DecodeWarning(f"{where}: dataclass {value.get('cls')} is not imported; its fields are returned"),
            stacklevel=2,
        )
        return items
    raise InvalidState(where, f"unknown stored value kind {kind!r}")
