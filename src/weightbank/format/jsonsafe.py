"""JSON encoding of user metadata (config, metrics, meta) that keeps inf/nan and refuses the rest.

Strict JSON has no NaN or Infinity, so non-finite floats are written as
``{"$f": "nan"}``; everything that is not None/bool/int/float/str or a
list/tuple/dict (str keys) of those, nested at most :data:`MAX_DEPTH` deep,
is refused with the key path. :func:`check` validates an encoded value read
back from storage (so :func:`decode` of it cannot fail).

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

__all__ = ["MAX_DEPTH", "NON_FINITE", "check", "decode", "encode"]

#: Deepest nesting of lists and dicts a metadata value may have.
MAX_DEPTH = 200
#: The encodings of the non-finite floats (``{"$f": ...}`` here, ``{"f": ...}`` in a state's tree).
NON_FINITE = frozenset(("nan", "inf", "-inf"))


def encode(value: object, path: str, _depth: int = 0) -> Any:
    """A strict-JSON form of ``value``; InvalidState naming the path of anything unstorable."""
    if _depth > MAX_DEPTH:
        raise InvalidState(path, f"nested deeper than {MAX_DEPTH} levels (is it cyclic?)")
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        if math.isfinite(value):
            return float(value)
        return {"$f": "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, (list, tuple)):
        return [encode(v, f"{path}.{i}", _depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise InvalidState(f"{path}.{k!r}", "metadata keys must be strings")
            if k == "$f":
                raise InvalidState(f"{path}.{k}", "the key '$f' is reserved")
            out[k] = encode(v, f"{path}.{k}", _depth + 1)
        return out
    hint = " (use .item() for a scalar tensor)" if type(value).__name__ in ("Tensor", "Parameter") else ""
    raise InvalidState(path, f"{type(value).__qualname__} is not JSON-safe{hint}")


def check(value: Any, what: str, _depth: int = 0) -> Any:
    """``value`` if it is what :func:`encode` makes; ValueError saying what is wrong otherwise.

    For metadata read back from storage: bounded depth, string keys, finite
    numbers, and ``{"$f": ...}`` only as the encoding of nan/inf/-inf.

    Example:
        >>> check({"loss": {"$f": "nan"}}, "metrics")
        {'loss': {'$f': 'nan'}}
        >>> check({"loss": {"$f": "zzz"}}, "metrics")
        Traceback (most recent call last):
        ValueError: metrics.loss: {'$f': ...} must be 'nan', 'inf' or '-inf'
    """
    if _depth > MAX_DEPTH:
        raise ValueError(f"{what}: nested deeper than {MAX_DEPTH} levels")
    if value is None or isinstance(value, (bool, str, int)):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"{what}: a non-finite number outside {{'$f': ...}}")
        return value
    if isinstance(value, list):
        for i, v in enumerate(value):
            check(v, f"{what}.{i}", _depth + 1)
        return value
    if isinstance(value, dict):
        if "$f" in value:
            if len(value) != 1 or value["$f"] not in NON_FINITE:
                raise ValueError(f"{what}: {{'$f': ...}} must be 'nan', 'inf' or '-inf'")
            return value
        for k, v in value.items():
            check(v, f"{what}.{k}", _depth + 1)  # JSON object keys are always strings
        return value
    raise ValueError(f"{what}: {type(value).__name__} is not a JSON value")


def decode(value: Any) -> Any:
    """Inverse of :func:`encode` (of a value :func:`check` accepts)."""
    if isinstance(value, list):
        return [decode(v) for v in value]
    if isinstance(value, dict):
        if len(value) == 1 and "$f" in value:
            return float(value["$f"])
        return {k: decode(v) for k, v in value.items()}
    return value
