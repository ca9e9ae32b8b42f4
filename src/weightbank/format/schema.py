"""Typed readers for the JSON records weightbank stores, and the typed records they yield.

Everything read back from storage is untrusted: a manifest, a save part, a
trash entry may have been damaged or crafted, and still carry a valid hash.
The readers here check each field's type and range and raise ``ValueError``
/ ``TypeError`` saying which field is wrong; the parser of the whole record
turns that into one ``CorruptObject``. They never recurse without a bound.

Two codec records are typed here rather than left as loose dicts:

* :class:`DeltaArgs` — a ``delta`` chunk's base (the hash of the chunk it is
  XORed against), its ``depth`` in links above the keyframe, the chain's
  decode ``cost`` (relative to a keyframe load) and ``gen``, the generations
  since its keyframe (a star delta skips some, so ``gen >= depth``).
* :class:`LossySums` / :class:`LossySummary` — a lossy tensor's error: each
  save part keeps sums (which add across parts), the manifest keeps the
  summary (``max_abs`` and relative L2 error ``rel_err``).

Example:
    >>> from weightbank.format.schema import DeltaArgs
    >>> DeltaArgs.from_json({"base": "ab" * 32, "depth": 2}).gen
    2
    >>> DeltaArgs.from_json({"base": "x", "depth": 2})
    Traceback (most recent call last):
    ValueError: delta args: base is not a chunk hash
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from .hashing import is_digest

__all__ = [
    "MAX_CHUNK_SIZE",
    "MAX_READ_CHUNK_SIZE",
    "DeltaArgs",
    "LossySummary",
    "LossySums",
    "finite",
    "hex_digest",
    "int_tuple",
    "max_stored_len",
    "typed",
]

#: The largest chunk size a save may use (a chunk is coded and hashed as one buffer).
MAX_CHUNK_SIZE = 1 << 30
#: The largest chunk size a manifest may declare: above what saves use now, for banks that
#: older releases (which had no cap) wrote; reads are bounded by the packs' real sizes anyway.
MAX_READ_CHUNK_SIZE = 1 << 40


def typed(value: Any, kind: type | tuple[type, ...], what: str = "value") -> Any:
    """``value`` if it is a ``kind`` (a bool never passes for an int or float); TypeError otherwise.

    Example:
        >>> typed(3, int, "step"), typed([1], list, "shape")
        (3, [1])
    """
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _kinds(kind)):
        raise TypeError(f"{what} has the wrong type ({type(value).__name__})")
    return value


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def int_tuple(value: Any, what: str = "value") -> tuple[int, ...]:
    """A JSON list of ints as a tuple; TypeError for anything else."""
    return tuple(typed(v, int, what) for v in typed(value, list, what))


def finite(value: Any, what: str) -> float:
    """A finite, non-negative JSON number as a float; ValueError/TypeError otherwise."""
    number = typed(value, (int, float), what)
    if not 0 <= number < math.inf:
        raise ValueError(f"{what} must be a finite non-negative number")
    return float(number)


def hex_digest(value: Any, what: str) -> str:
    """A full lowercase hex digest (a chunk hash or checkpoint id); ValueError otherwise."""
    if not isinstance(value, str) or not is_digest(value):
        raise ValueError(f"{what} is not a chunk hash")
    return value


def max_stored_len(raw_len: int) -> int:
    """The most bytes any codec stores for a chunk of ``raw_len`` bytes.

    Lossy payloads of one-element rows carry a float32 scale per element
    (about 3× a float16 chunk); every other codec stores at most the raw
    bytes plus a header. A record claiming more is damaged, and is refused
    before any buffer is allocated for it.
    """
    return 4 * raw_len + 4096


@dataclass(frozen=True)
class DeltaArgs:
    """A ``delta`` chunk's codec arguments: its base chunk and where it sits in its chain.

    Manifests written before ``cost`` and ``gen`` were recorded read as cost
    0 and ``gen == depth``.
    """

    base: str
    depth: int
    cost: float = 0.0
    gen: int = 0

    def to_json(self) -> dict[str, Any]:
        return {"base": self.base, "depth": self.depth, "cost": self.cost, "gen": self.gen}

    @classmethod
    def from_json(cls, obj: Any) -> DeltaArgs:
        if not isinstance(obj, dict):
            raise TypeError("delta args must be an object")
        try:
            base = hex_digest(obj.get("base"), "base")
            depth = typed(obj.get("depth"), int, "depth")
            if depth < 1:
                raise ValueError("depth must be >= 1")
            cost = 0.0 if obj.get("cost") is None else finite(obj["cost"], "cost")
            gen = depth if obj.get("gen") is None else typed(obj["gen"], int, "gen")
            if gen < depth:
                raise ValueError("gen must be >= depth")
        except (TypeError, ValueError) as e:
            raise type(e)(f"delta args: {e}") from None
        return cls(base=base, depth=depth, cost=cost, gen=gen)


@dataclass(frozen=True)
class LossySummary:
    """A lossy tensor's measured error, as a manifest records it.

    Example:
        >>> LossySummary("int8", 0.01, 0.002).to_json()
        {'codec': 'int8', 'max_abs': 0.01, 'rel_err': 0.002}
    """

    codec: str
    max_abs: float
    rel_err: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Any) -> LossySummary:
        return cls(**_lossy_fields(cls, obj))


@dataclass(frozen=True)
class LossySums:
    """A lossy tensor's error sums over some chunks: parts of one tensor add up, then summarize.

    Example:
        >>> a, b = LossySums("int8", 0.1, 1.0, 100.0), LossySums("int8", 0.2, 3.0, 300.0)
        >>> (a + b).summary()
        LossySummary(codec='int8', max_abs=0.2, rel_err=0.1)
    """

    codec: str
    max_abs: float = 0.0
    sq_err: float = 0.0
    sq_ref: float = 0.0

    def __add__(self, other: LossySums) -> LossySums:
        return LossySums(
            self.codec or other.codec,
            max(self.max_abs, other.max_abs),
            self.sq_err + other.sq_err,
            self.sq_ref + other.sq_ref,
        )

    def summary(self) -> LossySummary:
        rel = (self.sq_err / self.sq_ref) ** 0.5 if self.sq_ref > 0 else 0.0
        return LossySummary(self.codec, self.max_abs, rel)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, obj: Any) -> LossySums:
        return cls(**_lossy_fields(cls, obj))


def _lossy_fields(cls: type, obj: Any) -> dict[str, Any]:
    """The fields of a lossy record read back: a codec name, then finite non-negative numbers."""
    typed(obj, dict, cls.__name__)
    return {
        f.name: typed(obj.get(f.name), str, "lossy codec")
        if f.name == "codec"
        else finite(obj.get(f.name), f.name)
        for f in fields(cls)
    }
