"""``Writer``: weightbank as DCP's storage — every rank writes its shards, rank 0 commits one checkpoint.

``dcp.save(state, storage_writer=wb.dcp.Writer(bank, run="tts", step=1000))``
runs DCP's usual protocol, and the bank's two-phase save underneath it:

1. (coordinator) ``prepare_global_plan`` picks the parent checkpoint once
   (delta coding needs the same one on every rank) and sends it to every rank
   in its plan. DCP's planner has already given each replicated item (a plain
   tensor, a ``Replicate()`` DTensor) to a single rank, so ranks do not upload
   the same bytes;
2. (every rank) ``write_data`` writes the rank's tensors and shards with
   :meth:`Bank.save_part <weightbank.Bank.save_part>` — chunks the bank
   already holds are not written again — and returns the part (JSON) in the
   write results' ``storage_data``; non-tensor values travel there as JSON
   too (:mod:`.planners`: never pickled);
3. (coordinator) ``finish`` commits every rank's part as one manifest — the
   commit point — and moves the tags. The checkpoint id goes back to every
   rank in the returned ``Metadata`` (:func:`saved_id`).

If any rank fails or dies before ``finish``, nothing is committed: DCP never
calls it. The ranks that did write a part then hold a lease that keeps ``gc``
from their packs (and from everything deleted since) until it goes stale,
with their process or after a day. :meth:`Writer.abort` gives the part up at
once; use the writer as a context manager around ``dcp.save``, or call it
when ``dcp.save`` raises::

    with wb.dcp.Writer(bank, run="tts", step=1000) as writer:
        dcp.save(state, storage_writer=writer)

    writer = wb.dcp.Writer(bank, run="tts", step=1000)
    try:
        dcp.save(state, storage_writer=writer)
    except BaseException as e:
        writer.abort(e)
        raise

A part is never given up once the commit may have happened: the
coordinator's part only after its own ``finish`` is over, the other ranks'
only once the coordinator's verdict reached them (DCP's
``CheckpointException``), and in both cases only if no committed checkpoint
references the part (:meth:`Bank.abandon_part <weightbank.Bank.abandon_part>`).
A rank that lost touch with the coordinator (a timeout, a dead peer) keeps its
part, to go stale with its lease.

Example:
    >>> import torch, warnings, weightbank as wb
    >>> import torch.distributed.checkpoint as dcp
    >>> bank = wb.open("memory://")
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")  # DCP warns that no process group is running
    ...     md = dcp.save({"w": torch.ones(2), "step": 7}, storage_writer=wb.dcp.Writer(bank, run="r", step=7))
    >>> bank.load(wb.dcp.saved_id(md))["step"]
    7
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Mapping
from types import TracebackType
from typing import Any

import torch
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from ..bank.bank import AUTO, Auto, Bank
from ..bank.parts import SavePart, TensorShard, mark_numpy
from ..bank.results import SaveResult
from ..bank.writer import DEFAULT_KEYFRAME_EVERY
from ..errors import CheckpointNotFound, CorruptObject, IncompatibleState, InvalidRef, InvalidState
from ..format.tree import TensorRef, check_tree, flatten, flatten_refs, map_tensors, tensor_indices, unflatten
from .metadata import Path, dcp_entries, metadata_to_json
from .planners import value_of

__all__ = ["Writer", "parse_checkpoint_id", "saved_id"]

_KEY = "weightbank"


def parse_checkpoint_id(checkpoint_id: str | os.PathLike[str]) -> tuple[str, int | None]:
    """``"run@step"`` or ``"run"`` → (run, step); InvalidRef otherwise.

    Example:
        >>> parse_checkpoint_id("tts@1000")
        ('tts', 1000)
    """
    text = os.fspath(checkpoint_id)
    run, _, step = text.partition("@")
    if not run or (step and not step.isdigit()):
        raise InvalidRef(text, "a DCP checkpoint_id for weightbank is '<run>' or '<run>@<step>'")
    return run, int(step) if step else None


def saved_id(metadata: Metadata) -> str:
    """The id of the checkpoint ``dcp.save`` just committed, from the ``Metadata`` it returned (every rank).

    Example:
        >>> from torch.distributed.checkpoint.metadata import Metadata
        >>> saved_id(Metadata({}, storage_data={"weightbank": {"checkpoint": "ab" * 32}}))[:4]
        'abab'
    """
    data = metadata.storage_data
    if not isinstance(data, dict) or not isinstance(data.get(_KEY), dict):
        raise IncompatibleState("this DCP metadata was not returned by a save through weightbank.dcp.Writer")
    return str(data[_KEY]["checkpoint"])


def _set_path(root: dict[str, Any], path: Path, value: Any) -> None:
    """DCP's ``set_element``: a str key makes a dict level, an int one a list level."""
    node: Any = root
    for i, key in enumerate(path):
        last = i == len(path) - 1
        child: Any = value if last else ({} if isinstance(path[i + 1], str) else [])
        if isinstance(node, dict):
            if last:
                if key in node:
                    raise ValueError(f"two keys at {path}")
                node[key] = value
            else:
                node = node.setdefault(key, child)
        else:
            if not isinstance(key, int):
                raise ValueError(f"a str key under a list at {path}")
            while len(node) <= key:
                node.append(None)
            if last:
                node[key] = value
            else:
                if node[key] is None:
                    node[key] = child
                node = node[key]
        if not last and not isinstance(node, (dict, list)):
            raise ValueError(f"a value and a container at {path}")


def _paths(metadata: Metadata) -> dict[str, Path]:
    """Each key's path of nested keys: the default planner's flattening map, else the key itself."""
    pd = metadata.planner_data
    keys = list(metadata.state_dict_metadata)
    if isinstance(pd, Mapping) and all(
        isinstance(pd.get(k), tuple) and pd[k] and all(isinstance(p, (str, int)) for p in pd[k]) for k in keys
    ):
        return {k: tuple(pd[k]) for k in keys}
    return {k: (k,) for k in keys}


class Writer(StorageWriter):
    """DCP ``StorageWriter`` that saves into a weightbank bank (see the module docstring).

    Args:
        bank: the bank (every rank opens the same one).
        run, step: the checkpoint's run and step (or pass ``checkpoint_id="run@step"`` to ``dcp.save``).
        tags: tags moved to the checkpoint after it is committed.
        metrics, config, meta, message: stored with the checkpoint (rank 0's are used).
        parent: a ref, None for a root, or ``AUTO`` (the run's newest checkpoint).
        codec, chunk_size, keyframe_every: as for :meth:`Bank.save <weightbank.Bank.save>`.

    After ``dcp.save`` returns, ``info`` holds the checkpoint's info on rank 0;
    every rank can get its id with :func:`saved_id`. If it raises, :meth:`abort`
    (or leaving a ``with`` block on the error) gives up this rank's part.

    Example:
        >>> import weightbank as wb
        >>> wb.dcp.Writer(wb.open("memory://"), run="tts", step=5).checkpoint_id
        'tts@5'
    """

    def __init__(
        self,
        bank: Bank,
        *,
        run: str = "main",
        step: int | None = None,
        tags: Iterable[str] = (),
        metrics: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
        message: str = "",
        parent: str | Auto | None = AUTO,
        codec: str = "auto",
        chunk_size: int | None = None,
        keyframe_every: int = DEFAULT_KEYFRAME_EVERY,
    ) -> None:
        self.bank = bank
        self.run, self.step = run, step
        self.tags = [tags] if isinstance(tags, str) else list(tags)
        self.metrics, self.config, self.meta = dict(metrics or {}), dict(config or {}), dict(meta or {})
        if "dcp" in self.meta:
            raise InvalidState("meta.dcp", "the key 'dcp' of meta is weightbank's own")
        self.message, self.parent, self.codec, self.chunk_size = message, parent, codec, chunk_size
        self.keyframe_every = keyframe_every
        self.info: SaveResult | None = None
        self.part: SavePart | None = None
        self._parent_id: str | None = None
        self.rank = 0
        self.is_coordinator = True

    def __enter__(self) -> Writer:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None
    ) -> None:
        if error is not None:
            self.abort(error)

    def abort(self, error: BaseException | None = None) -> bool:
        """Give up this rank's part of a save that failed (``error``: what ``dcp.save`` raised); True if it went.

        The part's own packs are deleted and its lease released, so ``gc``
        need not wait for the lease to go stale. Nothing is deleted when the
        commit may have happened or may still happen: when a committed
        checkpoint references the part (the coordinator's ``finish`` wrote
        the manifest, then failed), and, on a rank other than the
        coordinator, when ``error`` is not DCP's ``CheckpointException`` —
        the coordinator's verdict never came, so it may still be committing.
        With ``error`` None the caller vouches that the save is over on every
        rank. Best effort: if the bank cannot be reached, the part stays, to
        go stale with its lease.

        Example:
            >>> import torch, warnings, weightbank as wb
            >>> import torch.distributed.checkpoint as dcp
            >>> class Failing(wb.dcp.Writer):
            ...     def finish(self, metadata, results):
            ...         raise OSError("disk full")
            >>> bank = wb.open("memory://")
            >>> try:
            ...     with warnings.catch_warnings(), Failing(bank, run="r", step=1) as writer:
            ...         warnings.simplefilter("ignore")  # one process: DCP warns that no process group runs
            ...         dcp.save({"w": torch.ones(4)}, storage_writer=writer)
            ... except BaseException as e:
            ...     print(type(e).__name__, writer.part, bank.gc(grace=0).packs_kept_for_inflight)
            CheckpointException None 0
        """
        part = self.part
        if part is None:
            return False
        # Only the coordinator commits, and its own finish is over by now; the others know the
        # commit is over (done or failed) only from the verdict DCP broadcasts after it.
        if not self.is_coordinator and error is not None and not isinstance(error, CheckpointException):
            return False
        self.part = None
        try:
            return self.bank.abandon_part(part)
        except Exception:
            return False  # the lease stays and goes stale: gc frees the packs then

    @property
    def checkpoint_id(self) -> str:
        """``"run@step"`` (or ``"run"``): what this writer saves."""
        return self.run if self.step is None else f"{self.run}@{self.step}"

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        """Whether ``checkpoint_id`` reads as ``"run@step"`` / ``"run"``."""
        try:
            parse_checkpoint_id(checkpoint_id)
        except InvalidRef:
            return False
        return True

    # -- the DCP protocol, in call order ------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        """A new save begins; a ``checkpoint_id`` (``"run@step"``) names its run and step."""
        if checkpoint_id is not None:
            self.run, self.step = parse_checkpoint_id(checkpoint_id)
        self.info = None
        self.part = None
        self._parent_id = None

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        if kwargs.get("use_collectives") is False:
            raise IncompatibleState(
                "weightbank.dcp.Writer commits one checkpoint from every rank's data; "
                "it needs dcp.save(use_collectives=True)"
            )
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank", 0) or 0)

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.checkpoint_id)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """Pick the parent once, on the coordinator, and tell every rank (delta coding needs the same one)."""
        if isinstance(self.parent, Auto):
            try:
                parent: str | None = self.bank.resolve(f"{self.run}@latest")
            except CheckpointNotFound:
                parent = None
        else:
            parent = None if self.parent is None else self.bank.resolve(str(self.parent))
        self._parent_id = parent
        return [
            dataclasses.replace(plan, storage_data={_KEY: {"parent": parent, "rank": i}})
            for i, plan in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """Write this rank's items as one part; its JSON rides back in the first write result."""
        data = plan.storage_data.get(_KEY) if isinstance(plan.storage_data, dict) else None
        parent = data.get("parent") if isinstance(data, dict) else None
        tensors: dict[str, Any] = {}
        values: dict[str, Any] = {}
        sizes: list[int] = []
        for item in plan.items:
            fqn = item.index.fqn
            if item.type == WriteItemType.BYTE_IO:
                values[fqn] = self._value(planner, item, tensors)
                sizes.append(0)
            else:
                t = planner.resolve_data(item)
                if not isinstance(t, torch.Tensor):
                    raise InvalidState(fqn, f"the planner resolved a tensor item to {type(t).__name__}")
                self._add_tensor(tensors, item, t)
                sizes.append(t.numel() * t.element_size())
        fut: Future[list[WriteResult]] = Future()
        if not plan.items:
            fut.set_result([])
            return fut
        self.part = self.bank.save_part(
            tensors,
            codec=self.codec,
            parent=parent,
            chunk_size=self.chunk_size,
            keyframe_every=self.keyframe_every,
        )
        results = []
        for n, (item, size) in enumerate(zip(plan.items, sizes, strict=True)):
            sd: dict[str, Any] = {"rank": self.rank}
            if n == 0:
                sd.update(part=self.part.to_json(), values=values)
            results.append(WriteResult(index=item.index, size_in_bytes=size, storage_data={_KEY: sd}))
        fut.set_result(results)
        return fut

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Commit every rank's part as one checkpoint (rank 0 only), then move the tags."""
        parts: list[SavePart] = []
        values: dict[str, Any] = {}
        for rank_results in results:
            for wr in rank_results:
                sd = wr.storage_data.get(_KEY) if isinstance(wr.storage_data, dict) else None
                if isinstance(sd, dict) and "part" in sd:
                    parts.append(SavePart.from_json(sd["part"]))
                    reported = sd.get("values")
                    if not isinstance(reported, dict):
                        raise CorruptObject("<dcp write result>", detail="a rank's values are not a dict")
                    values.update({str(k): _checked_value(str(k), v) for k, v in reported.items()})
        state, paths = _state(metadata, _paths(metadata), values)
        dcp_meta: dict[str, Any] = {"version": metadata.version, "world_size": len(results)}
        numpy = {n for v in values.values() for n in _numpy_names(v)}
        if not self._derivable(metadata, paths, state, numpy):
            dcp_meta["metadata"] = metadata_to_json(metadata)
            dcp_meta["paths"] = {k: list(v) for k, v in paths.items()}
        self.info = self.bank.commit(
            parts,
            state=state,
            run=self.run,
            step=self.step,
            metrics=self.metrics,
            config=self.config,
            tags=self.tags,
            message=self.message,
            meta={**self.meta, "dcp": dcp_meta},
            parent=self._parent_id,
        )
        metadata.storage_data = {_KEY: {"checkpoint": self.info.id}}

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _add_tensor(tensors: dict[str, Any], item: WriteItem, t: torch.Tensor) -> None:
        fqn, td = item.index.fqn, item.tensor_data
        if td is None:
            raise InvalidState(fqn, "a tensor write item without tensor metadata")
        if tuple(t.shape) != tuple(td.chunk.sizes) or t.dtype != td.properties.dtype:
            raise InvalidState(
                fqn,
                f"the planner's data {t.dtype} {list(t.shape)} does not match its plan {list(td.chunk.sizes)}",
            )
        whole = tuple(td.size) == tuple(t.shape) and not any(td.chunk.offsets)
        if item.type == WriteItemType.TENSOR or whole:
            tensors[fqn] = t
        else:
            tensors.setdefault(fqn, []).append(TensorShard(t, tuple(td.chunk.offsets), tuple(td.size)))

    @staticmethod
    def _value(planner: SavePlanner, item: WriteItem, tensors: dict[str, Any]) -> dict[str, Any]:
        """A non-tensor value as its JSON tree; tensors inside it (a tuple of tensors) go into the part."""
        fqn = item.index.fqn
        try:
            spec, leaves = flatten(value_of(planner, item))
        except InvalidState as e:
            raise InvalidState(f"{fqn}.{e.path}" if e.path else fqn, e.reason) from None
        names = []
        for leaf in leaves:
            name = f"{fqn}.{leaf.name}" if leaf.name else fqn
            tensors[name] = leaf.tensor.numpy() if leaf.numpy else leaf.tensor
            names.append(name)
        return {"tree": spec, "tensors": names}

    @staticmethod
    def _derivable(
        metadata: Metadata, paths: dict[str, Path], state: dict[str, Any], numpy: set[str]
    ) -> bool:
        """Whether the manifest alone will give back this metadata (then it is not stored)."""
        try:
            spec, names = flatten_refs(state)
            entries = dcp_entries(mark_numpy(spec, {i for i, n in enumerate(names) if n in numpy}))
        except (IncompatibleState, InvalidState):
            return False
        derived = {fqn: (path, kind) for fqn, path, kind, _ in entries}
        wanted = {
            fqn: (paths[fqn], "tensor" if isinstance(md, TensorStorageMetadata) else "value")
            for fqn, md in metadata.state_dict_metadata.items()
        }
        return derived == wanted and metadata.planner_data == {k: v for k, (v, _) in derived.items()}


def _state(
    metadata: Metadata, paths: dict[str, Path], values: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Path]]:
    """The checkpoint's structure: every key at its path (or, if the paths clash, a flat dict by key)."""

    def leaf(fqn: str) -> Any:
        if fqn not in values:
            return TensorRef(fqn)
        v = values[fqn]
        return unflatten(_numpy_as_tensor(v["tree"]), [TensorRef(n) for n in v["tensors"]])

    state: dict[str, Any] = {}
    try:
        for fqn in metadata.state_dict_metadata:
            _set_path(state, paths[fqn], leaf(fqn))
    except ValueError:
        return {fqn: leaf(fqn) for fqn in metadata.state_dict_metadata}, {k: (k,) for k in paths}
    return state, paths


def _numpy_names(value: dict[str, Any]) -> list[str]:
    """The tensors of a value that were numpy arrays (their ``{"N": i}`` nodes)."""
    return [value["tensors"][i] for i in tensor_indices(value["tree"], "N")]


def _numpy_as_tensor(node: Any) -> Any:
    """A value's tree with numpy leaves as plain tensor leaves (the part records which were numpy)."""
    return map_tensors(node, lambda n: {"T": n["N"]} if "N" in n else n)


def _checked_value(fqn: str, v: Any) -> dict[str, Any]:
    """A non-tensor value another rank reported: its tree and tensor names, checked (CorruptObject if not)."""
    try:
        names = v["tensors"]
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise TypeError("tensor names are not a list of strings")
        check_tree(v["tree"], len(names))
    except (KeyError, TypeError, ValueError) as e:
        raise CorruptObject("<dcp write result>", detail=f"the value of {fqn!r} is malformed ({e})") from None
    checked: dict[str, Any] = v
    return checked
