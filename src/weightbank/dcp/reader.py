"""``Reader``: load (and reshard) any checkpoint of a bank with ``dcp.load``.

``dcp.load(state, storage_reader=wb.dcp.Reader(bank, "tts@latest"))`` fills a
state dict whose tensors may be sharded differently from how they were saved
(a world size 4 checkpoint loads on 2 or 1, and back): DCP's planner asks
each rank for regions of the stored boxes, and the reader reads only the
chunks overlapping each region, verifies them against their hashes like every
load, and copies the region into place. Non-tensor values come from the
manifest's JSON and are handed to the planner as objects (see
:mod:`.planners`); nothing is ever unpickled.

The checkpoint ``Metadata`` is rebuilt from the manifest (:mod:`.metadata`),
so a checkpoint made with ``bank.save`` loads through DCP as well. Each rank
resolves the ref on its own; the coordinator then checks that every rank
found the same checkpoint (pass an id to be sure, or let
:class:`~weightbank.CheckpointManager` do it).

Example:
    >>> import torch, warnings, weightbank as wb
    >>> import torch.distributed.checkpoint as dcp
    >>> bank = wb.open("memory://"); _ = bank.save({"w": torch.arange(4.0), "step": 3}, tags=["v1"])
    >>> state = {"w": torch.zeros(4), "step": 0}
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")  # DCP warns that no process group is running
    ...     dcp.load(state, storage_reader=wb.dcp.Reader(bank, "v1"))
    >>> state["w"].tolist(), state["step"]
    ([0.0, 1.0, 2.0, 3.0], 3)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from ..bank.bank import Bank
from ..bank.checkpoint import Checkpoint
from ..bank.refs import parse
from ..bank.shards import Region, region_of
from ..errors import IncompatibleState, InvalidRef
from ..format.manifest import Manifest
from ..format.tree import node_kind, tensor_index
from .metadata import Path, metadata_of, node_at
from .planners import set_value

__all__ = ["Reader"]

_KEY = "weightbank"


class Reader(StorageReader):
    """DCP ``StorageReader`` over one checkpoint of a bank (see the module docstring).

    ``ref`` is any bank ref (id, tag, ``run@step``, ``run@latest``...);
    ``dcp.load(..., checkpoint_id=ref)`` sets it too.

    Example:
        >>> import weightbank as wb
        >>> wb.dcp.Reader(wb.open("memory://"), "prod").checkpoint_id
        'prod'
    """

    def __init__(self, bank: Bank, ref: str | None = None) -> None:
        self.bank = bank
        self.ref = ref
        self.cid: str | None = None
        self._checkpoint: Checkpoint | None = None
        self._paths: dict[str, Path] = {}
        self.is_coordinator = True

    @property
    def checkpoint_id(self) -> str | None:
        """The ref this reader loads."""
        return self.ref

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        """Whether ``checkpoint_id`` parses as a bank ref (whether it exists is for the bank to say)."""
        try:
            parse(os.fspath(checkpoint_id))
        except InvalidRef:
            return False
        return True

    # -- the DCP protocol, in call order ------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        if checkpoint_id is not None:
            self.ref = os.fspath(checkpoint_id)
        self.cid, self._checkpoint, self._paths = None, None, {}

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        """The checkpoint's DCP ``Metadata``, rebuilt from its manifest (or read from its JSON)."""
        if kwargs.get("rank") is not None:
            raise IncompatibleState("weightbank checkpoints have global metadata only, not one per rank")
        if self.ref is None:
            raise InvalidRef("", "no checkpoint to read: pass a ref to Reader() or checkpoint_id to dcp.load")
        self._checkpoint = self.bank.checkpoint(self.ref)
        self.cid = self._checkpoint.id
        md, self._paths = metadata_of(self._checkpoint.manifest)
        md.storage_data = {_KEY: {"checkpoint": self.cid}}
        return md

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        self.is_coordinator = is_coordinator

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return dataclasses.replace(plan, storage_data={_KEY: {"checkpoint": self.cid}})

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """Check that every rank resolved the ref to the same checkpoint."""
        found = {
            (p.storage_data or {}).get(_KEY, {}).get("checkpoint")
            if isinstance(p.storage_data, dict)
            else None
            for p in plans
        }
        if len(found) > 1:
            ids = ", ".join(sorted(str(c)[:12] for c in found))
            raise IncompatibleState(
                f"ranks resolved {self.ref!r} to different checkpoints ({ids}); load a checkpoint id instead"
            )
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        """Read every item of this rank's plan: tensor regions (verified), then values."""
        ck = self._checkpoint
        if ck is None:
            raise IncompatibleState("read_data before read_metadata")
        m, cid = ck.manifest, ck.id
        tensor_items: list[ReadItem] = []
        regions: list[Region] = []
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                continue
            index = self._tensor_index(m, item.storage_index.fqn)
            try:
                regions.append(
                    region_of(m, index, item.storage_index.offset, item.storage_offsets, item.lengths)
                )
            except KeyError as e:
                raise IncompatibleState(
                    f"checkpoint {cid[:12]}: {e.args[0]}", [item.storage_index.fqn]
                ) from None
            tensor_items.append(item)
        for n, data in ck.iter_regions(regions):
            item = tensor_items[n]
            target = planner.resolve_tensor(item).detach()
            if tuple(target.shape) != tuple(data.shape):
                raise IncompatibleState(
                    f"{item.dest_index.fqn}: the checkpoint region is {list(data.shape)},"
                    f" the destination {list(target.shape)}",
                    [item.dest_index.fqn],
                )
            with torch.no_grad():
                target.copy_(data)
            planner.commit_tensor(item, target)
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                fqn = item.storage_index.fqn
                node = node_at(m.tree, self._paths[fqn])
                set_value(planner, item, ck.tree_value(node))
        fut: Future[None] = Future()
        fut.set_result(None)
        return fut

    def _tensor_index(self, m: Manifest, fqn: str) -> int:
        node = node_at(m.tree, self._paths[fqn]) if fqn in self._paths else {"v": None}
        index = tensor_index(node) if node_kind(node) == "T" else None
        if index is None:
            raise IncompatibleState(f"the checkpoint holds no tensor under the DCP key {fqn!r}", [fqn])
        return index
