"""Handlers: how a JSON request becomes model input and model output becomes JSON.

A handler is any object with the methods of :class:`Handler`; servers load one
by import path (``"pkg.module:Handler"``) with :func:`load_handler` — importlib
only, nothing is ever unpickled. :class:`TensorHandler` is the built-in one for
a plain tensor-in/tensor-out module: nested JSON lists in, nested lists out.

What a handler raises decides the reply (see :class:`~weightbank.ModelService`):
a :class:`~weightbank.errors.WeightbankError` keeps its meaning; ``ValueError``,
``TypeError``, ``KeyError``, ``IndexError`` and ``OverflowError`` from ``decode``
and ``ValueError``, ``IndexError`` and ``OverflowError`` from ``predict`` (a model
rejecting its input: an out-of-range token id) are the request's fault
(InvalidRequest, a 4xx); anything else is a
:class:`~weightbank.errors.HandlerError` (a 5xx; a device out of memory is a
transient one). An output holding NaN or infinities is refused with
:class:`~weightbank.errors.NonFiniteOutput` — never sent as ``null``.

Example:
    >>> import torch
    >>> h = TensorHandler(lambda info: torch.nn.Identity(), input_shape=(None, 2))
    >>> h.encode(h.predict(torch.nn.Identity(), h.decode([[1, 2]])))
    [[1.0, 2.0]]
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..bank.results import CheckpointInfo
from ..errors import InvalidName, InvalidRequest
from .tiers import OutOfMemoryError

__all__ = ["Handler", "TensorHandler", "count_nonfinite", "load_handler", "load_object"]

MAX_ELEMENTS = 1 << 22
MAX_DEPTH = 8


@runtime_checkable
class Handler(Protocol):
    """What a server needs to turn requests into model calls.

    Call order: ``build(info)`` once per checkpoint as it is first loaded (under
    ``torch.device("meta")``: create the empty module from ``info.config``);
    then per request ``decode(payload)`` (raise InvalidRequest, ValueError or
    TypeError for bad input: the client gets a 4xx), ``predict(model, inputs)``
    while the model is leased (read-only: never change the model), and
    ``encode(outputs)`` to JSON-safe values.
    """

    def build(self, info: CheckpointInfo) -> nn.Module: ...

    def decode(self, payload: Any) -> Any: ...

    def predict(self, model: nn.Module, inputs: Any) -> Any: ...

    def encode(self, outputs: Any) -> Any: ...


def _shape_of(value: Any, depth: int = 0) -> tuple[int, ...]:
    if isinstance(value, bool) or value is None:
        raise InvalidRequest("input must hold numbers only (no booleans or nulls)", "input")
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidRequest("input numbers must be finite", "input")
        return ()
    if not isinstance(value, list):
        raise InvalidRequest(f"input must be nested lists of numbers, found {type(value).__name__}", "input")
    if depth >= MAX_DEPTH:
        raise InvalidRequest(f"input is nested deeper than {MAX_DEPTH} levels", "input")
    if not value:
        return (0,)
    inner = {_shape_of(v, depth + 1) for v in value}
    if len(inner) != 1:
        raise InvalidRequest("input is ragged: every row must have the same shape", "input")
    return (len(value), *inner.pop())


def count_nonfinite(value: Any) -> int:
    """How many floats in a JSON-like ``value`` are NaN or infinite; TypeError for a value JSON cannot hold.

    Example:
        >>> count_nonfinite({"a": [1.0, float("nan")], "b": [[float("inf")], 2, "x", None, True]})
        2
    """
    count = 0
    stack: list[Any] = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, float):
            count += not math.isfinite(v)
        elif isinstance(v, list | tuple):
            stack.extend(v)
        elif isinstance(v, dict):
            for k, item in v.items():
                if not isinstance(k, str):
                    raise TypeError(f"output has a {type(k).__name__} key; JSON keys are strings")
                stack.append(item)
        elif not (v is None or isinstance(v, str | int | bool)):
            raise TypeError(f"output holds a {type(v).__name__}, which JSON cannot hold")
    return count


class TensorHandler:
    """Built-in handler for a plain tensor-in/tensor-out module.

    ``input_shape`` (``None`` for any size in that dimension) is checked before
    the model runs, and every number must fit ``dtype`` (finite once converted:
    ``1e300`` does not fit float32, ``2**63`` does not fit int64). A model that
    still rejects its input (RuntimeError, IndexError, ValueError) answers
    InvalidRequest; a device out of memory is not the request's fault and is
    raised as it is.
    """

    def __init__(
        self,
        build: Callable[[CheckpointInfo], nn.Module],
        *,
        input_shape: Sequence[int | None] | None = None,
        dtype: torch.dtype = torch.float32,
        max_elements: int = MAX_ELEMENTS,
    ) -> None:
        self._build = build
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.dtype = dtype
        self.max_elements = max_elements

    def build(self, info: CheckpointInfo) -> nn.Module:
        return self._build(info)

    def decode(self, payload: Any) -> torch.Tensor:
        shape = _shape_of(payload)
        if math.prod(shape) > self.max_elements:
            raise InvalidRequest(
                f"input has {math.prod(shape)} elements; the limit is {self.max_elements}", "input"
            )
        if self.input_shape is not None:
            ok = len(shape) == len(self.input_shape) and all(
                want is None or want == got for want, got in zip(self.input_shape, shape, strict=True)
            )
            if not ok:
                want_s = "(" + ", ".join("*" if w is None else str(w) for w in self.input_shape) + ")"
                raise InvalidRequest(f"input has shape {shape}; this model takes {want_s}", "input")
        what = str(self.dtype).removeprefix("torch.")
        try:
            tensor = torch.tensor(payload, dtype=self.dtype)
        except (OverflowError, ValueError, TypeError, RuntimeError) as e:
            raise InvalidRequest(f"input numbers do not fit {what}: {e}", "input") from None
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InvalidRequest(
                f"input numbers must be finite in {what} (a value is out of its range)", "input"
            )
        return tensor

    def predict(self, model: nn.Module, inputs: Any) -> Any:
        try:
            with torch.inference_mode():
                return model(inputs)
        except OutOfMemoryError:
            raise
        except (RuntimeError, ValueError, IndexError, OverflowError) as e:
            shape = tuple(inputs.shape) if isinstance(inputs, torch.Tensor) else "?"
            raise InvalidRequest(f"the model rejected an input of shape {shape}: {e}", "input") from None

    def encode(self, outputs: Any) -> Any:
        if isinstance(outputs, torch.Tensor):
            return outputs.detach().cpu().tolist()
        if isinstance(outputs, list | tuple):
            return [self.encode(o) for o in outputs]
        if isinstance(outputs, dict):
            return {str(k): self.encode(v) for k, v in outputs.items()}
        return outputs


def load_object(spec: str) -> Any:
    """The object named ``"pkg.module:attr"`` (``attr`` may be dotted), imported with importlib.

    Example:
        >>> load_object("math:pi")
        3.141592653589793
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise InvalidName("import path", spec, "expected 'package.module:Name'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise InvalidName("import path", spec, f"cannot import {module_name}: {e}") from None
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise InvalidName("import path", spec, f"{module_name} has no {attr}") from None
    return obj


def load_handler(spec: str) -> Handler:
    """Load a handler by import path: a class (instantiated without arguments), a factory or an instance.

    Example:
        >>> h = load_handler("weightbank.serving.handler:_example_handler")
        >>> isinstance(h, Handler)
        True
    """
    obj = load_object(spec)
    if isinstance(obj, type) or (callable(obj) and not isinstance(obj, Handler)):
        try:
            obj = obj()
        except TypeError as e:
            raise InvalidName("handler", spec, f"cannot create it without arguments: {e}") from None
    if not isinstance(obj, Handler):
        raise InvalidName(
            "handler", spec, "it lacks build/decode/predict/encode (see weightbank.serving.Handler)"
        )
    return obj


def _example_handler() -> TensorHandler:
    """A tensor handler for ``nn.Linear(2, 2)`` checkpoints (used by examples and tests)."""
    return TensorHandler(lambda info: nn.Linear(2, 2), input_shape=(None, 2))
