"""The state tree: everything storable round-trips; everything else is refused with its path."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from weightbank.errors import InvalidState
from weightbank.format.tree import flatten, unflatten

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)
keys = st.one_of(st.text(alphabet="abcxyz_", min_size=1, max_size=4), st.integers(0, 5))
trees = st.recursive(
    scalars,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.lists(children, max_size=3).map(tuple),
        st.dictionaries(keys, children, max_size=3),
    ),
    max_leaves=12,
)


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


@given(trees)
@settings(max_examples=200, deadline=None)
def test_values_round_trip(tree: Any) -> None:
    spec, leaves = flatten(tree)
    assert leaves == []
    assert same(unflatten(spec, []), tree)


def test_tensors_names_and_int_keys() -> None:
    opt = {
        "state": {0: {"exp_avg": torch.ones(2), "step": torch.tensor(3.0)}},
        "param_groups": [{"lr": 0.1, "params": [0]}],
    }
    spec, leaves = flatten({"model": {"w": torch.zeros(2)}, "optim": opt})
    assert [leaf.name for leaf in leaves] == ["model.w", "optim.state.0.exp_avg", "optim.state.0.step"]
    out = unflatten(spec, [leaf.tensor for leaf in leaves])
    assert list(out["optim"]["state"]) == [0], "int keys stay ints"
    assert out["optim"]["param_groups"] == [{"lr": 0.1, "params": [0]}]


def test_aliases_detected_only_for_identical_views() -> None:
    base = torch.arange(6.0)
    _spec, leaves = flatten(
        {"a": base, "b": base, "c": base.view(2, 3), "d": base[:3], "e": torch.empty(0), "f": torch.empty(0)}
    )
    alias = {leaf.name: leaf.alias_of for leaf in leaves}
    assert alias == {"a": None, "b": 0, "c": None, "d": None, "e": None, "f": None}


def test_numpy_arrays_come_back_as_numpy() -> None:
    arr = np.arange(5, dtype=np.int32)
    spec, leaves = flatten({"a": arr})
    out = unflatten(spec, [leaf.tensor for leaf in leaves])
    assert isinstance(out["a"], np.ndarray) and out["a"].dtype == np.int32
    assert np.array_equal(out["a"], arr)


class Thing:
    pass


@pytest.mark.parametrize(
    ("state", "path"),
    [
        ({"a": {"b": Thing()}}, "a.b"),
        ({"fn": lambda x: x}, "fn"),
        ({"arr": np.array([object()], dtype=object)}, "arr"),
        ({"s": {1, 2}}, "s"),
        ({"b": b"bytes"}, "b"),
        ({"x": [1, 2, Thing()]}, "x.2"),
        ({"opt": {"param_groups": [{"lr": 0.1, "fn": print}]}}, "opt.param_groups.0.fn"),
        ({(1, 2): 3}, "(1, 2)"),
        ({True: 3}, "True"),
        ({"sp": torch.eye(2).to_sparse()}, "sp"),
        ({"m": torch.empty(2, device="meta")}, "m"),
    ],
)
def test_unstorable_leaves_are_refused_with_path(state: Any, path: str) -> None:
    with pytest.raises(InvalidState) as e:
        flatten(state)
    assert e.value.path == path
    assert path in str(e.value)


def test_quantized_refused() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        q = torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)
    with pytest.raises(InvalidState, match="quantized"):
        flatten({"q": q})


def test_cycles_refused() -> None:
    a: dict[str, Any] = {}
    a["self"] = a
    with pytest.raises(InvalidState, match="cycle"):
        flatten(a)


def test_name_collisions_refused() -> None:
    with pytest.raises(InvalidState, match="two tensors"):
        flatten({"a.b": torch.ones(1), "a": {"b": torch.ones(1)}})
