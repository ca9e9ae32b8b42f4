"""The manager's metadata — ``config=``, ``meta=`` and each step's metrics — checked when it is given.

A value JSON cannot hold would otherwise be found only by the background
save, as a traceback steps later; here it is an InvalidState naming its key
path at once (in the constructor for ``config``/``meta``, in ``step()`` for
metrics).

Integer keys (a Hugging Face config's ``id2label`` is ``{0: "neg", 1: "pos"}``)
are stored as strings, the way ``json.dumps`` writes them, so the checkpoint's
``config`` reads back ``{"0": "neg", "1": "pos"}``: this is **not a lossless
round trip** (Hugging Face's own ``from_pretrained`` turns ``id2label``'s keys
back into ints). Keys that would collide as strings (``1`` and ``"1"``) and
keys of any other type (floats, bools, None, tuples) are refused.

Example:
    >>> from weightbank.training.metadata import json_metadata
    >>> json_metadata({"id2label": {0: "neg", 1: "pos"}, "lr": 3e-4}, "config")
    {'id2label': {'0': 'neg', '1': 'pos'}, 'lr': 0.0003}
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import Any

import torch

from ..errors import InvalidState
from ..format.jsonsafe import MAX_DEPTH, encode

__all__ = ["clean_metrics", "json_metadata"]


def _keys_as_json(value: Any, path: str, depth: int = 0) -> Any:
    """``value`` with integer mapping keys turned into strings; InvalidState for keys JSON cannot hold."""
    if depth > MAX_DEPTH:
        raise InvalidState(path, f"nested deeper than {MAX_DEPTH} levels (is it cyclic?)")
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            if isinstance(k, str):
                key = k
            elif isinstance(k, numbers.Integral) and not isinstance(k, bool):
                key = str(int(k))
            else:
                raise InvalidState(
                    f"{path}.{k!r}", f"a {type(k).__name__} key cannot be stored (keys are strings or ints)"
                )
            if key in out:
                raise InvalidState(f"{path}.{key}", f"two keys read {key!r} once stored as JSON")
            out[key] = _keys_as_json(v, f"{path}.{key}", depth + 1)
        return out
    if isinstance(value, (list, tuple)):
        return [_keys_as_json(v, f"{path}.{i}", depth + 1) for i, v in enumerate(value)]
    return value


def json_metadata(value: Mapping[str, Any] | None, what: str) -> dict[str, Any]:
    """A JSON-storable copy of ``value`` (integer keys as strings); InvalidState naming the key of anything else.

    Example:
        >>> json_metadata({"fn": print}, "config")
        Traceback (most recent call last):
        weightbank.errors.InvalidState: cannot store config.fn: builtin_function_or_method is not JSON-safe
    """
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise InvalidState(what, f"{type(value).__qualname__} is not a mapping")
    out: dict[str, Any] = _keys_as_json(value, what)
    encode(out, what)  # raises InvalidState naming the path of a value JSON cannot hold
    return out


def clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    """Metrics as plain numbers (1-element tensors and numpy scalars via ``.item()``), checked to be storable.

    Example:
        >>> import torch
        >>> clean_metrics({"loss": torch.tensor(0.5), "step_time": 1})
        {'loss': 0.5, 'step_time': 1}
    """
    out: dict[str, Any] = {}
    for k, v in (metrics or {}).items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.detach().item()
        elif hasattr(v, "item") and callable(v.item) and not isinstance(v, (list, dict, str)):
            v = v.item()  # numpy scalars
        out[str(k)] = v
    encode(out, "metrics")
    return out
