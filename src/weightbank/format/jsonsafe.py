"""JSON encoding of user metadata (config, metrics, meta) that keeps inf/nan and refuses the rest.

Strict JSON has no NaN or Infinity, so non-finite floats are written as
``{"$f": "nan"}``; everything that is not None/bool/int/float/str or a
list/tuple/dict (str keys) of those is refused with the key path.

Example:
    >>> from weightbank.format.jsonsafe import encode, decode
    >>> encode({"loss": float("nan")}, "metrics")
    {'loss': {'$f': 'nan'}}
    >>> decode(encode({"a": [1, 2.5]}, "config"))
    {'a': [1, 2.5]}
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import InvalidState

__all__ = ["decode", "encode"]


def encode(value: object, path: str) -> Any:
    """A strict-JSON form of ``value``; InvalidState naming the path of anything unstorable."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return float(value)
        return {"$f": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, (list, tuple)):
        return [encode(v, f"{path}.{i}") for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidState(f"{path}.{k!r}", "metadata keys must be strings")
            if k == "$f":
                raise InvalidState(f"{path}.{k}", "the key '$f' is reserved")
            out[k] = encode(v, f"{path}.{k}")
        return out
    hint = " (use .item() for a scalar tensor)" if type(value).__name__ in ("Tensor", "Parameter") else ""
    raise InvalidState(path, f"{type(value).__qualname__} is not JSON-safe{hint}")


def decode(value: Any) -> Any:
    """Inverse of :func:`encode`."""
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, dict):
        if len(value) == 1 and "$f" in value:
            return float(value["$f"])
        return {k: decode(v) for k, v in value.items()}
    return value
