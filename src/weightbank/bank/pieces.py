"""What ``save_part`` is given, checked: whole tensors, numpy arrays and :class:`TensorShard` boxes.

Every value is checked before a byte is written (no lease, no pack): a bad
name, value, box or dtype is an :class:`~weightbank.errors.InvalidState`
naming the key, never a raw ``TypeError`` from deep inside the pipeline.

Example:
    >>> import torch, weightbank as wb
    >>> from weightbank.bank.pieces import pieces_of
    >>> [(p.name, p.offsets) for p in pieces_of({"w": wb.TensorShard(torch.ones(2), offsets=(2,), shape=(4,))})]
    [('w', (2,))]
"""

from __future__ import annotations

import operator
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import InvalidState
from ..format.dtypes import dtype_name
from ..format.tree import flatten, tensor_problem

__all__ = ["Piece", "TensorShard", "check_box", "pieces_of"]


def _ints(what: str, value: object) -> tuple[int, ...]:
    """``value`` as a tuple of ints (a sequence of Python / numpy ints; bools refused)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, np.ndarray, torch.Size)):
        raise InvalidState(what, f"expected a sequence of ints, not {type(value).__name__}")
    out = []
    for v in value:
        try:
            if isinstance(v, (bool, np.bool_)):
                raise TypeError
            out.append(operator.index(v))
        except TypeError:
            raise InvalidState(what, f"expected a sequence of ints, found {v!r}") from None
    return tuple(out)


@dataclass(frozen=True)
class TensorShard:
    """A box of a bigger tensor, for :meth:`Bank.save_part`: the local data, where it starts, the whole shape.

    ``offsets`` and ``shape`` are sequences of ints (InvalidState otherwise);
    whether the box fits the shape is checked when the shard is saved.

    Example:
        >>> import torch, weightbank as wb
        >>> wb.TensorShard(torch.zeros(2, 3), offsets=(2, 0), shape=(4, 3)).offsets
        (2, 0)
    """

    tensor: torch.Tensor
    offsets: tuple[int, ...]
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.tensor, torch.Tensor):
            raise InvalidState(
                "TensorShard.tensor", f"expected a torch.Tensor, not {type(self.tensor).__name__}"
            )
        object.__setattr__(self, "offsets", _ints("TensorShard.offsets", self.offsets))
        object.__setattr__(self, "shape", _ints("TensorShard.shape", self.shape))


@dataclass(frozen=True)
class Piece:
    """One tensor (or shard of one) to write, as the save pipeline sees it."""

    name: str
    tensor: torch.Tensor
    offsets: tuple[int, ...] | None = None  # None: the piece is the whole tensor
    whole: tuple[int, ...] | None = None
    alias_of: int | None = None  # an earlier piece sharing this one's memory (whole tensors only)
    numpy: bool = False


def check_box(name: str, shape: tuple[int, ...], offsets: tuple[int, ...], whole: tuple[int, ...]) -> None:
    """InvalidState unless a box of ``shape`` at ``offsets`` lies inside a tensor of shape ``whole``.

    Example:
        >>> from weightbank.bank.pieces import check_box
        >>> check_box("w", (2, 3), (2, 0), (4, 3))  # fits: nothing raised
    """
    if len(offsets) != len(whole) or len(shape) != len(whole):
        raise InvalidState(
            name, f"shard of {len(shape)} dims at offsets {offsets} of a {len(whole)}-dim tensor"
        )
    if any(d < 0 for d in whole) or any(
        o < 0 or n < 0 or o + n > w for o, n, w in zip(offsets, shape, whole, strict=True)
    ):
        raise InvalidState(
            name, f"shard {list(shape)} at {list(offsets)} lies outside the tensor {list(whole)}"
        )


def _storable(name: str, t: torch.Tensor) -> torch.Tensor:
    problem = tensor_problem(t)
    if problem is not None:
        raise InvalidState(name, problem)
    dtype_name(t.dtype, name)  # InvalidState for a dtype weightbank cannot store
    return t.detach()


def pieces_of(tensors: Mapping[str, Any]) -> list[Piece]:
    """The pieces of a ``save_part`` argument, checked (every value a tensor, an array or shard(s) that fit).

    A value is a tensor, a numpy array, a :class:`TensorShard`, or a list or
    tuple of shards (empty: this process holds none of that tensor).

    Example:
        >>> import torch
        >>> from weightbank.bank.pieces import pieces_of
        >>> [p.name for p in pieces_of({"b": torch.ones(3)})]
        ['b']
    """
    if not isinstance(tensors, Mapping):
        raise InvalidState("<tensors>", f"expected a dict of name -> tensor, not {type(tensors).__name__}")
    out: list[Piece] = []
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise InvalidState(repr(name), "tensor names must be non-empty strings")
        if isinstance(value, (torch.Tensor, TensorShard, np.ndarray)):
            items: list[Any] = [value]
        elif isinstance(value, (list, tuple)):
            items = list(value)
            if len(items) > 1 and not all(isinstance(i, TensorShard) for i in items):
                raise InvalidState(name, "several pieces of one name must all be wb.TensorShard boxes")
        else:
            raise InvalidState(
                name, f"expected a tensor, a numpy array or wb.TensorShard(s), not {type(value).__name__}"
            )
        for item in items:
            if isinstance(item, np.ndarray):
                try:
                    _, leaves = flatten(item)  # the same checks as a save (numeric dtypes only)
                except InvalidState as e:
                    raise InvalidState(name, e.reason) from None
                out.append(Piece(name, leaves[0].tensor, numpy=True))
            elif isinstance(item, torch.Tensor):
                out.append(Piece(name, _storable(name, item)))
            elif isinstance(item, TensorShard):
                if not isinstance(item.tensor, torch.Tensor):  # a shard built around __post_init__
                    raise InvalidState(name, "a wb.TensorShard must hold a torch.Tensor")
                check_box(name, tuple(item.tensor.shape), item.offsets, item.shape)
                out.append(Piece(name, _storable(name, item.tensor), item.offsets, item.shape))
            else:
                raise InvalidState(name, f"expected a tensor or wb.TensorShard, not {type(item).__name__}")
    return out
