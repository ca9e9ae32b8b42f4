"""Flatten a nested state into a JSON tree plus a list of tensors, and back.

A state is any nesting of ``dict`` (keys ``str`` or ``int``), ``list`` and
``tuple`` whose leaves are torch tensors, numeric numpy arrays, or JSON-safe
values (None, bool, int, float incl. inf/nan/-0.0, str). Everything else is
refused *before anything is written*, with the key path of the offending leaf:
there is no pickle fallback.

The JSON tree encodes each node as a one-key object::

    {"d": [[key, node], ...]}   dict (keys keep their type: "0" vs 0)
    {"l": [node, ...]}          list
    {"u": [node, ...]}          tuple
    {"T": i} / {"N": i}         the i-th tensor (returned as torch / numpy)
    {"v": value}                JSON value
    {"f": "nan"|"inf"|"-inf"}   non-finite float

Tensor names are key paths joined with ``.`` (``"model.decoder.weight"``,
``"optim.state.0.exp_avg"``) — the names a user selects and diffs by.

This module owns the grammar: everyone else walks a tree through
:func:`check_tree` (a tree read back from storage, validated once, bounded
depth), :func:`tensor_indices`, :func:`map_tensors`, :func:`dict_items`,
:func:`seq_items`, :func:`child`, :func:`node_kind` and :func:`tensor_index`.

Example:
    >>> import torch
    >>> from weightbank.format.tree import flatten, unflatten
    >>> spec, leaves = flatten({"w": torch.ones(2), "step": 3})
    >>> [leaf.name for leaf in leaves], spec
    (['w'], {'d': [['w', {'T': 0}], ['step', {'v': 3}]]})
    >>> unflatten(spec, [leaf.tensor for leaf in leaves])["step"]
    3
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..errors import InvalidState
from .dtypes import dtype_name
from .jsonsafe import NON_FINITE

__all__ = [
    "MAX_DEPTH",
    "Leaf",
    "TensorRef",
    "check_tree",
    "child",
    "dict_items",
    "flatten",
    "flatten_refs",
    "map_tensors",
    "node_kind",
    "seq_items",
    "tensor_index",
    "tensor_indices",
    "tensor_problem",
    "unflatten",
]

#: Deepest nesting of containers a state may have (and a stored tree is checked against).
MAX_DEPTH = 64
_KINDS = frozenset("dluTNvf")


@dataclass(frozen=True)
class Leaf:
    """A tensor found in a state: its name, the tensor, and the index of an earlier leaf it aliases."""

    name: str
    tensor: torch.Tensor
    alias_of: int | None = None
    numpy: bool = False


@dataclass(frozen=True)
class TensorRef:
    """A placeholder for a tensor written elsewhere (a part of a two-phase save), by its name.

    Example:
        >>> from weightbank.format.tree import TensorRef, flatten_refs
        >>> flatten_refs({"w": TensorRef("model.w"), "step": 3})
        ({'d': [['w', {'T': 0}], ['step', {'v': 3}]]}, ['model.w'])
    """

    name: str


def _join(path: str, key: object) -> str:
    return f"{path}.{key}" if path else str(key)


def tensor_problem(t: torch.Tensor) -> str | None:
    """Why ``t`` cannot be stored, or None if it can."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter):
        return f"tensor subclass {type(t).__name__} is not supported; convert it to a plain tensor"
    if t.layout != torch.strided:
        return f"{t.layout} tensors are not supported; call .to_dense() first"
    if t.is_quantized:
        return "quantized tensors are not supported; dequantize first"
    if t.is_nested:
        return "nested tensors are not supported"
    if t.device.type == "meta":
        return "meta tensors hold no data"
    return None


class _Flattener:
    def __init__(self, refs: bool = False) -> None:
        self.refs: list[str] | None = [] if refs else None
        self.leaves: list[Leaf] = []
        self.names: dict[str, str] = {}
        self._seen: dict[tuple[Any, ...], int] = {}
        self._stack: set[int] = set()

    def node(self, obj: object, path: str, depth: int) -> dict[str, Any]:
        if depth > MAX_DEPTH:
            raise InvalidState(path, f"nested deeper than {MAX_DEPTH} levels (is the state cyclic?)")
        if self.refs is not None:
            if isinstance(obj, TensorRef):
                if obj.name in self.refs:
                    raise InvalidState(path, f"tensor {obj.name!r} is placed twice")
                self.refs.append(obj.name)
                return {"T": len(self.refs) - 1}
            if isinstance(obj, (torch.Tensor, np.ndarray)):
                raise InvalidState(path, "place tensors of a two-phase save with TensorRef(name)")
        if isinstance(obj, torch.Tensor):
            return {"T": self.tensor(obj, path, numpy=False)}
        if isinstance(obj, np.ndarray):
            if obj.dtype.kind not in "biufc" or obj.dtype.byteorder == ">":
                raise InvalidState(path, f"numpy array of dtype {obj.dtype} cannot be stored without pickle")
            try:
                t = torch.from_numpy(np.ascontiguousarray(obj))
            except TypeError as e:
                raise InvalidState(path, f"numpy dtype {obj.dtype} has no torch equivalent") from e
            return {"N": self.tensor(t, path, numpy=True)}
        if obj is None or isinstance(obj, (bool, str)):
            return {"v": obj}
        if isinstance(obj, int):
            return {"v": int(obj)}
        if isinstance(obj, float):
            if math.isnan(obj):
                return {"f": "nan"}
            if math.isinf(obj):
                return {"f": "inf" if obj > 0 else "-inf"}
            return {"v": float(obj)}
        if isinstance(obj, (dict, list, tuple)):
            ident = id(obj)
            if ident in self._stack:
                raise InvalidState(path, "the state contains itself (cycle)")
            self._stack.add(ident)
            try:
                return self.container(obj, path, depth)
            finally:
                self._stack.discard(ident)
        raise InvalidState(
            path,
            f"values of type {type(obj).__module__}.{type(obj).__qualname__} cannot be stored "
            "(allowed: tensors, numeric numpy arrays, dict/list/tuple, None, bool, int, float, str)",
        )

    def container(
        self, obj: dict[Any, Any] | list[Any] | tuple[Any, ...], path: str, depth: int
    ) -> dict[str, Any]:
        if isinstance(obj, dict):
            items = []
            for key, value in obj.items():
                if isinstance(key, bool) or not isinstance(key, (str, int)):
                    raise InvalidState(
                        _join(path, repr(key)), f"dict keys must be str or int, not {type(key).__name__}"
                    )
                items.append(
                    [key if isinstance(key, str) else int(key), self.node(value, _join(path, key), depth + 1)]
                )
            return {"d": items}
        children = [self.node(v, _join(path, i), depth + 1) for i, v in enumerate(obj)]
        return {"u": children} if isinstance(obj, tuple) else {"l": children}

    def tensor(self, t: torch.Tensor, path: str, *, numpy: bool) -> int:
        problem = tensor_problem(t)
        if problem:
            raise InvalidState(path, problem)
        dtype_name(t.dtype, path)
        if path in self.names:
            raise InvalidState(path, "two tensors would get this name; rename one of the keys")
        self.names[path] = path
        alias_of = None
        if t.numel() > 0 and not numpy:
            key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
            alias_of = self._seen.get(key)
            if alias_of is None:
                self._seen[key] = len(self.leaves)
        self.leaves.append(Leaf(name=path, tensor=t.detach(), alias_of=alias_of, numpy=numpy))
        return len(self.leaves) - 1


def flatten(state: object) -> tuple[dict[str, Any], list[Leaf]]:
    """Split ``state`` into its JSON tree and its tensor leaves (see module docstring)."""
    f = _Flattener()
    spec = f.node(state, "", 0)
    return spec, f.leaves


def flatten_refs(state: object) -> tuple[dict[str, Any], list[str]]:
    """Like :func:`flatten` for a state whose tensors are :class:`TensorRef` placeholders: (tree, names)."""
    f = _Flattener(refs=True)
    spec = f.node(state, "", 0)
    return spec, f.refs or []


def unflatten(spec: dict[str, Any], tensors: Sequence[Any]) -> Any:
    """Rebuild the state from its tree; ``tensors[i]`` fills ``{"T": i}``.

    ``tensors`` holds tensors (or :class:`TensorRef` placeholders, for a tree
    without numpy leaves). A ``None`` in it (a tensor not selected by a partial load) drops
    that entry from its dict; inside a list or tuple it stays ``None``.
    """

    def build(node: dict[str, Any]) -> Any:
        if "v" in node:
            return node["v"]
        if "T" in node:
            return tensors[node["T"]]
        if "N" in node:
            t = tensors[node["N"]]
            return None if t is None else t.numpy()
        if "f" in node:
            return float(node["f"])
        if "d" in node:
            out = {}
            for key, child in node["d"]:
                value = build(child)
                if value is None and _is_dropped(child):
                    continue
                out[key] = value
            return out
        if "l" in node:
            return [build(c) for c in node["l"]]
        if "u" in node:
            return tuple(build(c) for c in node["u"])
        raise InvalidState("", f"unknown tree node {sorted(node)}")

    def _is_dropped(child: dict[str, Any]) -> bool:
        idx = child.get("T", child.get("N"))
        return idx is not None and tensors[idx] is None

    return build(spec)


def check_tree(spec: Any, n_tensors: int) -> None:
    """Raise ValueError unless ``spec`` is a tree :func:`flatten` could make over ``n_tensors`` tensors.

    For a tree read back from storage: every node one of the kinds above,
    dict keys ``str`` or ``int``, tensor indices in range, values JSON
    scalars, nesting at most :data:`MAX_DEPTH` deep (the walk is iterative, so a
    crafted tree cannot exhaust the stack). The walkers below assume a
    checked tree.

    Example:
        >>> check_tree({"d": [["w", {"T": 0}]]}, 1)
        >>> check_tree({"d": [["w", {"T": 3}]]}, 1)
        Traceback (most recent call last):
        ValueError: tree node names tensor 3 of 1
    """
    stack: list[tuple[Any, int]] = [(spec, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ValueError(f"tree is nested deeper than {MAX_DEPTH} levels")
        if not isinstance(node, dict) or len(node) != 1:
            raise ValueError("tree node is not a one-key object")
        ((kind, body),) = node.items()
        if kind not in _KINDS:
            raise ValueError(f"unknown tree node kind {str(kind)[:20]!r}")
        if kind in "TN":
            if isinstance(body, bool) or not isinstance(body, int) or not 0 <= body < n_tensors:
                raise ValueError(f"tree node names tensor {str(body)[:20]} of {n_tensors}")
        elif kind == "v":
            if body is not None and not isinstance(body, (bool, int, float, str)):
                raise ValueError("tree value is not a JSON scalar")
        elif kind == "f":
            if body not in NON_FINITE:
                raise ValueError("tree float is not nan, inf or -inf")
        elif kind == "d":
            if not isinstance(body, list):
                raise ValueError("tree dict is not a list of entries")
            for entry in body:
                if not isinstance(entry, list) or len(entry) != 2:
                    raise ValueError("tree dict entry is not a [key, node] pair")
                key = entry[0]
                if isinstance(key, bool) or not isinstance(key, (str, int)):
                    raise ValueError("tree dict key is not a str or int")
                stack.append((entry[1], depth + 1))
        else:
            if not isinstance(body, list):
                raise ValueError("tree list is not a list")
            stack.extend((child, depth + 1) for child in body)


def node_kind(node: dict[str, Any]) -> str:
    """A checked node's kind: ``"d"`` dict, ``"l"`` list, ``"u"`` tuple, ``"T"``/``"N"`` tensor, ``"v"``/``"f"`` value."""
    return next(iter(node))


def tensor_index(node: dict[str, Any]) -> int | None:
    """The tensor a leaf node names (``{"T": i}`` or ``{"N": i}``), None for any other node."""
    index = node.get("T", node.get("N"))
    return index if isinstance(index, int) and len(node) == 1 else None


def dict_items(node: dict[str, Any]) -> list[tuple[str | int, dict[str, Any]]] | None:
    """A dict node's (key, child) entries in order, None if ``node`` is not a dict."""
    body = node.get("d")
    return None if body is None else [(k, child) for k, child in body]


def seq_items(node: dict[str, Any]) -> list[dict[str, Any]] | None:
    """A list or tuple node's children, None if ``node`` is neither."""
    body = node.get("l", node.get("u"))
    return None if body is None else list(body)


def child(node: dict[str, Any], key: str | int) -> dict[str, Any] | None:
    """The child of a dict node whose key reads as ``str(key)``, or of a list/tuple node at index ``key``.

    None when there is none (a path read back from storage is untrusted).

    Example:
        >>> child({"d": [[0, {"v": 1}]]}, "0"), child({"l": [{"v": 1}]}, 5)
        ({'v': 1}, None)
    """
    items = dict_items(node)
    if items is not None:
        return next((c for k, c in items if str(k) == str(key)), None)
    seq = seq_items(node)
    try:
        index = int(key)
    except ValueError:
        return None
    return seq[index] if seq is not None and 0 <= index < len(seq) else None


def _children(node: dict[str, Any]) -> list[dict[str, Any]]:
    items = dict_items(node)
    if items is not None:
        return [child for _, child in items]
    return seq_items(node) or []


def tensor_indices(node: dict[str, Any], kinds: str = "TN") -> list[int]:
    """The tensor indices under ``node``, in tree order (``kinds``: ``"T"``, ``"N"`` or both).

    Example:
        >>> tensor_indices({"d": [["a", {"T": 0}], ["b", {"l": [{"N": 1}, {"v": 2}]}]]})
        [0, 1]
    """
    out: list[int] = []
    stack = [node]
    while stack:
        n = stack.pop()
        index = tensor_index(n)
        if index is not None:
            if next(iter(n)) in kinds:
                out.append(index)
            continue
        stack.extend(reversed(_children(n)))
    return out


def map_tensors(node: dict[str, Any], leaf: Any) -> dict[str, Any]:
    """A copy of the tree with each tensor node ``n`` replaced by ``leaf(n)`` (a new node).

    Example:
        >>> as_numpy = lambda n: {"N": n["T"]} if "T" in n else n
        >>> map_tensors({"l": [{"T": 0}, {"v": 1}]}, as_numpy)
        {'l': [{'N': 0}, {'v': 1}]}
    """
    if tensor_index(node) is not None:
        replaced: dict[str, Any] = leaf(node)
        return replaced
    items = dict_items(node)
    if items is not None:
        return {"d": [[k, map_tensors(child, leaf)] for k, child in items]}
    for kind in ("l", "u"):
        if kind in node:
            return {kind: [map_tensors(child, leaf) for child in node[kind]]}
    return node
