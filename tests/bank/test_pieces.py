"""Bad input to ``save_part`` / ``TensorShard`` / ``commit`` is a weightbank error that names the key and writes nothing."""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import weightbank as wb
from weightbank.bank.layout import MANIFESTS
from weightbank.bank.pieces import pieces_of


def objects(bank: wb.Bank) -> set[str]:
    return {info.key for info in bank.storage.list("")}


@pytest.mark.parametrize(
    ("tensors", "key"),
    [
        ({"w": None}, "w"),
        ({"w": 3}, "w"),
        ({"w": "abc"}, "w"),
        ({"w": {"nested": torch.ones(2)}}, "w"),
        ({"w": [torch.ones(2), torch.ones(2)]}, "w"),
        ({"w": (wb.TensorShard(torch.ones(1), offsets=(0,), shape=(2,)), torch.ones(1))}, "w"),
        ({"w": [3]}, "w"),
        ({"w": torch.ones(2).to_sparse()}, "w"),
        ({"w": torch.empty(2, device="meta")}, "w"),
        ({"w": np.array(["a", "b"])}, "w"),
        ({"w": wb.TensorShard(torch.ones(2), offsets=(0, 0), shape=(2,))}, "w"),
        ({"w": wb.TensorShard(torch.ones(2), offsets=(1,), shape=(2,))}, "w"),
        ({"w": wb.TensorShard(torch.ones(2), offsets=(0,), shape=(-2,))}, "w"),
        ({"": torch.ones(2)}, "''"),
        ({1: torch.ones(2)}, "1"),
    ],
)
def test_bad_values_name_their_key_and_write_nothing(tensors: dict[Any, Any], key: str) -> None:
    bank = wb.open("memory://")
    before = objects(bank)
    with pytest.raises(wb.InvalidState) as e:
        bank.save_part(tensors)
    assert e.value.path == key
    assert objects(bank) == before


@pytest.mark.parametrize("tensors", [None, [torch.ones(2)], "w", 3])
def test_save_part_wants_a_mapping(tensors: Any) -> None:
    bank = wb.open("memory://")
    with pytest.raises(wb.InvalidState, match="dict of name"):
        bank.save_part(tensors)
    assert objects(bank) == {info.key for info in wb.open("memory://").storage.list("")}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"tensor": [1, 2], "offsets": (0,), "shape": (2,)}, "TensorShard.tensor"),
        ({"tensor": np.ones(2), "offsets": (0,), "shape": (2,)}, "TensorShard.tensor"),
        ({"tensor": torch.ones(2), "offsets": ("a",), "shape": (2,)}, "TensorShard.offsets"),
        ({"tensor": torch.ones(2), "offsets": 0, "shape": (2,)}, "TensorShard.offsets"),
        ({"tensor": torch.ones(2), "offsets": (0.5,), "shape": (2,)}, "TensorShard.offsets"),
        ({"tensor": torch.ones(2), "offsets": (True,), "shape": (2,)}, "TensorShard.offsets"),
        ({"tensor": torch.ones(2), "offsets": "0", "shape": (2,)}, "TensorShard.offsets"),
        ({"tensor": torch.ones(2), "offsets": (0,), "shape": None}, "TensorShard.shape"),
        ({"tensor": torch.ones(2), "offsets": (0,), "shape": {2: 2}}, "TensorShard.shape"),
    ],
)
def test_tensor_shard_checks_its_fields(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(wb.InvalidState) as e:
        wb.TensorShard(**kwargs)
    assert e.value.path == field


def test_tensor_shard_takes_any_int_sequence() -> None:
    t = torch.ones(2, 3)
    # deliberately not the annotated tuple[int, ...]: any sequence of integers is normalised to one
    s = wb.TensorShard(t, offsets=[np.int64(2), 0], shape=torch.Size([4, 3]))  # type: ignore[arg-type]
    assert s.offsets == (2, 0) and s.shape == (4, 3)
    assert type(s.offsets[0]) is int
    assert wb.TensorShard(t, offsets=np.array([0, 0]), shape=(2, 3)).offsets == (0, 0)  # type: ignore[arg-type]


def test_an_empty_list_of_shards_is_nothing_to_save() -> None:
    assert pieces_of({"w": [], "b": torch.ones(1)})[0].name == "b"


# -- property: garbage in, a weightbank error (or a good checkpoint) out, never a torn bank --------

_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.binary(max_size=8),
)
_json = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-5, 2**40), st.floats(), st.text(max_size=6)),
    lambda kids: st.one_of(
        st.lists(kids, max_size=4), st.dictionaries(st.text(max_size=6), kids, max_size=4)
    ),
    max_leaves=12,
)


@st.composite
def _values(draw: st.DrawFn) -> Any:
    kind = draw(st.sampled_from(["scalar", "list", "tensor", "shard", "array", "dict"]))
    if kind == "scalar":
        return draw(_scalars)
    if kind == "list":
        return draw(st.lists(st.one_of(_scalars, st.just(torch.ones(1))), max_size=3))
    if kind == "tensor":
        return torch.ones(draw(st.lists(st.integers(0, 3), max_size=2)))
    if kind == "array":
        return np.array(draw(st.lists(st.one_of(st.integers(0, 9), st.text(max_size=2)), max_size=3)))
    if kind == "dict":
        return draw(st.dictionaries(st.text(max_size=3), _scalars, max_size=2))
    n = draw(st.integers(0, 3))
    garbage = st.one_of(_scalars, st.lists(st.one_of(st.integers(-3, 5), _scalars), max_size=3))
    try:
        return wb.TensorShard(
            torch.ones(n),
            offsets=draw(st.one_of(garbage, st.lists(st.integers(-2, 4), max_size=2))),
            shape=draw(st.one_of(garbage, st.lists(st.integers(-2, 6), max_size=2))),
        )
    except wb.InvalidState:
        return draw(_scalars)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    tensors=st.one_of(
        st.dictionaries(st.one_of(st.text(max_size=4), st.integers(0, 3)), _values(), max_size=3),
        _json,
    )
)
def test_garbage_to_save_part_is_refused_with_a_weightbank_error(tensors: Any) -> None:
    bank = wb.open("memory://")
    before = objects(bank)
    try:
        part = bank.save_part(tensors)
    except wb.WeightbankError:
        assert objects(bank) == before  # refused before a lease or a pack was written
        return
    # accepted: it is a real part, and it commits into a checkpoint that loads
    try:
        info = bank.commit([part])
    except wb.InvalidState:
        return  # e.g. shards that do not tile their tensor: refused at commit, nothing visible
    assert set(bank.load(info.id)) == {t.name for t in part.tensors}


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), replacement=_json)
def test_a_part_with_any_field_replaced_commits_cleanly_or_not_at_all(
    data: st.DataObject, replacement: Any
) -> None:
    bank = wb.open("memory://")
    w = torch.arange(40.0).reshape(10, 4)
    good = [
        bank.save_part({"w": wb.TensorShard(w[i : i + 5], offsets=(i, 0), shape=(10, 4)), "b": torch.ones(3)})
        for i in (0, 5)
    ]
    j = copy.deepcopy(good[1].to_json())
    path = data.draw(st.sampled_from(_paths(j)))
    node: Any = j
    for step in path[:-1]:
        node = node[step]
    node[path[-1]] = replacement
    try:
        info = bank.commit([good[0], j])
    except wb.WeightbankError:
        assert not list(bank.storage.list(MANIFESTS))
        return
    # Whatever was accepted is a manifest every reader accepts. A commit reads no chunk, so a part that
    # lies about where its bytes are is caught by the hash check of a load, never returned as data.
    fresh = wb.Bank(bank.storage)
    assert [c.id for c in fresh.log()] == [info.id]
    report = fresh.verify()
    try:
        out = fresh.load(info.id)
    except wb.WeightbankError:
        assert not report.ok
        return
    assert torch.equal(out["w"], w) and torch.equal(out["b"], torch.ones(3))
    fresh.gc(grace=0)
