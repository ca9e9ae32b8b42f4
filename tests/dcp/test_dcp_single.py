"""weightbank.dcp in one process: the Writer/Reader protocol, JSON metadata, no pickle anywhere."""

from __future__ import annotations

import json
import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import _create_default_local_metadata
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan

import weightbank as wb
from weightbank.dcp.metadata import metadata_from_json, metadata_of, metadata_to_json, same_metadata

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(0)
    return {
        "model": {"w": torch.randn(8, 4, generator=g), "b": torch.randn(4, generator=g).to(torch.bfloat16)},
        "optim": {
            "state": {"w": {"step": torch.tensor(3.0)}},
            "param_groups": [{"lr": 0.1, "betas": (0.9, 0.99)}],
        },
        "epoch": 2,
        "ids": np.arange(4, dtype=np.int32),
        "nan": math.nan,
        "pair": (torch.ones(2), "x"),  # a tuple is one opaque value to DCP, tensors inside it included
    }


def _zeros_like(tree: Any) -> Any:
    if isinstance(tree, torch.Tensor):
        return torch.zeros_like(tree)
    if isinstance(tree, dict):
        return {k: _zeros_like(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_zeros_like(v) for v in tree]
    return None


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.tobytes() == b.tobytes()
    if isinstance(a, float) and math.isnan(a):
        return isinstance(b, float) and math.isnan(b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def test_save_through_dcp_then_load_through_dcp_and_through_the_bank() -> None:
    bank = wb.open("memory://")
    state = _state()
    writer = wb.dcp.Writer(bank, run="r", step=5, tags=["t"], metrics={"loss": 0.5}, message="hi")
    md = dcp.save(state, storage_writer=writer, planner=wb.dcp.SavePlanner())
    cid = wb.dcp.saved_id(md)
    assert writer.info is not None and writer.info.id == cid and writer.info.tags == ("t",)
    info = bank.show(cid).info
    assert (info.run, info.step, info.metrics, info.message) == ("r", 5, {"loss": 0.5}, "hi")
    assert info.meta["dcp"] == {"version": md.version, "world_size": 1}  # metadata follows from the manifest
    assert _same(bank.load(cid), state)
    target = _zeros_like(state)
    target["optim"]["param_groups"] = [{"lr": 0.0, "betas": None}]
    dcp.load(target, storage_reader=wb.dcp.Reader(bank, "t"), planner=wb.dcp.LoadPlanner())
    assert _same(target, state)
    # again, unchanged: nothing new is written, and the parent is the previous save
    again = wb.dcp.Writer(bank)
    dcp.save(state, storage_writer=again, checkpoint_id="r@6")
    assert isinstance(again.info, wb.SaveResult) and again.info.step == 6 and again.info.parent == cid
    assert again.info.save_stats is not None and again.info.save_stats.written_bytes == 0


def test_keyframe_every_reaches_the_parts_a_writer_saves() -> None:
    """``keyframe_every=1`` (a save to be rekeyed): the changed chunks are standalone, not deltas."""
    bank = wb.open("memory://")
    w = torch.randn(1 << 18)
    codecs = []
    for step, every in ((1, 16), (2, 16), (3, 1)):
        w[:: 100 + step] += 1e-3
        dcp.save({"w": w}, storage_writer=wb.dcp.Writer(bank, run="r", step=step, keyframe_every=every))
        codecs.append({c.codec for c in bank.checkpoint(f"r@{step}").manifest.chunks[:1]})
    assert codecs[1] == {"delta"} and codecs[2] != {"delta"}, codecs
    assert torch.equal(bank.load("r@3")["w"], w)


def test_a_checkpoint_saved_with_bank_save_loads_through_dcp() -> None:
    bank = wb.open("memory://")
    lin = torch.nn.Linear(3, 2)
    bank.save({"model": lin.state_dict(), "step": 9}, tags=["v1"])
    target: dict[str, Any] = {"model": torch.nn.Linear(3, 2).state_dict(), "step": 0}
    dcp.load(target, checkpoint_id="v1", storage_reader=wb.dcp.Reader(bank))
    assert torch.equal(target["model"]["weight"], lin.weight) and target["step"] == 9


def test_values_are_never_pickled_and_unstorable_ones_are_refused() -> None:
    bank = wb.open("memory://")
    with pytest.raises(CheckpointException, match=r"InvalidState: cannot store fn"):
        dcp.save({"w": torch.ones(1), "fn": object()}, storage_writer=wb.dcp.Writer(bank))
    assert bank.log() == []
    dcp.save({"w": torch.ones(1), "v": [1, 2]}, storage_writer=wb.dcp.Writer(bank, run="r"))

    class PicklingLoader(dcp.DefaultLoadPlanner):
        def load_bytes(self, read_item: Any, value: Any) -> None:  # expects torch.save bytes
            raise AssertionError("never called")

    with pytest.raises(CheckpointException, match="load_value"):
        dcp.load(
            {"w": torch.zeros(1), "v": None},
            storage_reader=wb.dcp.Reader(bank, "r@latest"),
            planner=PicklingLoader(),
        )
    with pytest.raises(wb.InvalidState, match="never unpickles"):
        wb.dcp.LoadPlanner().load_bytes(_read_item("v"), None)  # type: ignore[arg-type]


def _read_item(fqn: str) -> Any:
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

    idx = MetadataIndex(fqn)
    return ReadItem(LoadItemType.BYTE_IO, idx, torch.Size([0]), idx, torch.Size([0]), torch.Size([0]))


def test_metadata_the_manifest_cannot_reproduce_is_stored_as_json() -> None:
    bank = wb.open("memory://")
    state = {"model": {"w": torch.arange(4.0)}, "step": 3}
    planner = dcp.DefaultSavePlanner(flatten_state_dict=False)  # "model" becomes one opaque value
    md = dcp.save(state, storage_writer=wb.dcp.Writer(bank, run="r"), planner=planner)
    info = bank.show(wb.dcp.saved_id(md)).info
    assert "metadata" in info.meta["dcp"]
    assert same_metadata(metadata_of(bank.checkpoint(info.id).manifest)[0], md)
    target: dict[str, Any] = {"model": None, "step": 0}
    dcp.load(
        target,
        storage_reader=wb.dcp.Reader(bank, info.id),
        planner=wb.dcp.LoadPlanner(flatten_state_dict=False),
    )
    assert torch.equal(target["model"]["w"], torch.arange(4.0)) and target["step"] == 3
    json.dumps(info.meta)  # JSON through and through


def test_writer_and_reader_refuse_what_cannot_work() -> None:
    bank = wb.open("memory://")
    with pytest.raises(wb.IncompatibleState, match="use_collectives"):
        wb.dcp.Writer(bank).set_up_storage_writer(True, rank=0, use_collectives=False)
    with pytest.raises(wb.InvalidRef):
        wb.dcp.Writer(bank).reset("not a@run")
    assert wb.dcp.Writer.validate_checkpoint_id("tts@10") and not wb.dcp.Writer.validate_checkpoint_id("a@b")
    assert wb.dcp.Reader.validate_checkpoint_id("tts@latest")
    a = bank.save({"w": torch.ones(1)}).id
    b = bank.save({"w": torch.zeros(1)}).id
    reader = wb.dcp.Reader(bank, a)
    plans = [LoadPlan([], storage_data={"weightbank": {"checkpoint": cid}}) for cid in (a, b)]
    with pytest.raises(wb.IncompatibleState, match="different checkpoints"):
        reader.prepare_global_plan(plans)


# -- metadata JSON ---------------------------------------------------------------------------
_names = st.text(alphabet="abcxyz_.0123", min_size=1, max_size=8)
_dtypes = st.sampled_from([torch.float32, torch.bfloat16, torch.int64, torch.bool, torch.float8_e4m3fn])


@st.composite
def _tensor_md(draw: st.DrawFn) -> TensorStorageMetadata:
    size = draw(st.lists(st.integers(0, 9), max_size=3))
    chunks = [
        ChunkStorageMetadata(
            torch.Size(draw(st.integers(0, 9)) for _ in size),
            torch.Size(draw(st.integers(0, 9)) for _ in size),
        )
        for _ in range(draw(st.integers(1, 3)))
    ]
    return TensorStorageMetadata(TensorProperties(dtype=draw(_dtypes)), torch.Size(size), chunks)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda c: st.lists(c, max_size=3) | st.tuples(c, c) | st.dictionaries(st.text(max_size=4), c, max_size=3),
    max_leaves=8,
)


@settings(max_examples=80, deadline=None)
@given(
    sd=st.dictionaries(_names, st.one_of(_tensor_md(), st.just(BytesStorageMetadata())), max_size=6),
    planner_data=_json_values,
    version=st.none() | st.text(max_size=4),
)
def test_metadata_json_round_trip(sd: dict[str, Any], planner_data: Any, version: str | None) -> None:
    md = Metadata(state_dict_metadata=sd, planner_data=planner_data, version=version)
    back = metadata_from_json(json.loads(json.dumps(metadata_to_json(md), allow_nan=False)))
    assert back == md


_leaf = st.one_of(
    st.integers(-5, 5),
    st.text(max_size=3),
    st.none(),
    st.builds(lambda n: torch.arange(n, dtype=torch.float32), st.integers(0, 4)),
)
_states = st.recursive(
    _leaf,
    lambda c: (
        st.lists(c, max_size=3) | st.dictionaries(st.sampled_from(["a", "b", "c1", "0"]), c, max_size=3)
    ),
    max_leaves=10,
)


@settings(max_examples=80, deadline=None)
@given(state=st.dictionaries(st.sampled_from(["m", "o", "s"]), _states, min_size=1, max_size=3))
def test_metadata_from_a_manifest_matches_what_dcp_plans(state: dict[str, Any]) -> None:
    """The manifest-derived Metadata has exactly the keys, kinds and tensors DCP's own planner makes."""
    flat, mapping = flatten_state_dict(state)
    want = _create_default_local_metadata(flat)
    bank = wb.open("memory://")
    try:
        cid = bank.save(state).id
    except wb.InvalidState:
        return  # two tensors with one name: not a state this test is about
    got, paths = metadata_of(bank.checkpoint(cid).manifest)
    assert same_metadata(
        Metadata(got.state_dict_metadata, planner_data=dict(mapping)),
        Metadata(want.state_dict_metadata, planner_data=dict(mapping)),
    )
    assert paths == dict(mapping)


def test_async_save_commits_through_the_writer_too() -> None:
    bank = wb.open("memory://")
    fut = dcp.async_save({"w": torch.ones(3), "step": 2}, storage_writer=wb.dcp.Writer(bank, run="a", step=2))
    md = fut.result() if hasattr(fut, "result") else fut.upload_completion.result()
    assert isinstance(md, Metadata)  # torch types upload_completion as Future[None]; it holds the Metadata
    assert bank.load(wb.dcp.saved_id(md))["step"] == 2 and bank.log("a")[0].step == 2


def test_import_weightbank_does_not_load_dcp() -> None:
    import subprocess
    import sys

    code = "import sys, weightbank as wb; a = 'torch.distributed.checkpoint' in sys.modules; wb.dcp.Writer; print(a, 'torch.distributed.checkpoint' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True
    )
    assert out.stdout.split() == ["False", "True"]
