"""The checkpoint manager in a ``torch.distributed`` job: one decision, every rank's shards, one commit.

When the manager runs on several ranks (``CheckpointManager(..., distributed=True)``,
or by default whenever a process group is initialized), every rank calls
``step``/``save_now``/``restore`` at the same points, and:

* **Decisions are made once.** Rank 0 runs the guard, early stopping and the
  save policies on its metrics; one small collective per step hands its
  decision (and whether any rank was signalled to stop) to every rank, so
  time- or metric-driven policies never split the job.
* **Saves are sharded.** Each rank stages its part of the state — DTensor /
  FSDP2 shards from ``get_state_dict``, plain (replicated) tensors, values —
  and a background thread saves it through DCP with
  :class:`weightbank.dcp.Writer`: every rank writes its own shards in
  parallel, replicated tensors are written by one rank, and rank 0 commits
  the checkpoint once all of them are durable, then moves tags and prunes.
* **Per-rank state stays per rank.** RNG states, the data position and
  ``extra`` live under ``ranks.<rank>``; they are never deduplicated into one
  value.
* **Restores reshard.** The model and optimizer are loaded through DCP with
  :class:`weightbank.dcp.Reader` (at any world size) and set with
  ``set_state_dict``; the other sections are read straight from the
  manifest. At another world size than the save, what could not be restored
  (the RNG and extras of ranks that did not exist, or no longer do) is said
  in a warning and in ``CheckpointManager.restore_notes``; a rank without
  its own entry takes rank 0's data position, converted to the new world size
  by :class:`~weightbank.ResumableLoader`.

The manager's collectives run on two private gloo groups made when it is
created (one for the training thread, one for the background writer), so
they never interleave with the job's own collectives or with each other.
What the manager itself sends between ranks (each step's decision, the
checkpoint to restore) travels as JSON bytes in a uint8 tensor, never
pickled; values that are not JSON-safe are refused. DCP's own collectives
inside a save or load (its gather of plans and write results) pickle what
they carry: that is DCP's protocol, outside weightbank's control, and what
weightbank puts in them is plain data.

A save that fails on any rank commits nothing, and every rank gives up the
part it wrote (:meth:`weightbank.dcp.Writer.abort`) unless the coordinator
may have committed it, so a failed save does not hold ``gc`` back.

Example:
    >>> from weightbank.training.distributed import PER_RANK
    >>> PER_RANK
    'ranks'
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from datetime import timedelta
from typing import Any

import torch

from ..bank.bank import Bank
from ..bank.checkpoint import Checkpoint
from ..bank.results import CheckpointInfo
from ..errors import CheckpointNotFound, IncompatibleState, InvalidState, WeightbankError
from ..format.jsonsafe import decode, encode
from ..format.tree import dict_items
from .checks import CLASSES
from .job import Decision
from .state import TrainingState

__all__ = ["PER_RANK", "Distributed", "DistributedJob", "capture", "pick", "restore", "save"]

#: The top-level key of the per-rank sections (``ranks.<rank>.rng``, ``ranks.<rank>.data``...).
PER_RANK = "ranks"
#: Sections every rank holds a copy of, read back straight from the manifest.
_SHARED = ("scheduler", "scaler")
_PER_RANK_SECTIONS = ("data", "extra", "rng")


def _sealed(value: object, what: str, **extra: Any) -> bytes:
    """The JSON bytes of a message carrying ``value``, or the reason it cannot travel (then every rank raises)."""
    try:
        body: dict[str, Any] = {"v": encode(value, what)}
    except InvalidState as e:
        body = {"e": [e.path, f"{e.reason} (the manager sends only JSON-safe values between ranks)"]}
    return json.dumps({**body, **extra}, separators=(",", ":"), allow_nan=False).encode()


def _opened(message: dict[str, Any]) -> Any:
    """The value a :func:`_sealed` message carries; InvalidState if it could not be sent."""
    if "e" in message:
        path, reason = message["e"]
        raise InvalidState(str(path), str(reason))
    return decode(message.get("v"))


class Distributed:
    """The job as the manager sees it: this rank, the world size, and the manager's private groups."""

    def __init__(self, timeout: float | None = None) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            raise IncompatibleState(
                "CheckpointManager(distributed=True) needs an initialized process group"
                " (torch.distributed.init_process_group)"
            )
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        kw: dict[str, Any] = {} if timeout is None else {"timeout": timedelta(seconds=timeout)}
        # Every rank creates both groups here, in the same order (new_group is collective).
        self.decide_group = dist.new_group(backend="gloo", **kw)
        self.save_group = dist.new_group(backend="gloo", **kw)

    @classmethod
    def alone(cls) -> Distributed:
        """A single process without a process group (restoring a distributed checkpoint in one process)."""
        ctx = cls.__new__(cls)
        ctx.rank, ctx.world, ctx.decide_group, ctx.save_group = 0, 1, None, None
        return ctx

    def agree(self, decide: Callable[[], object], flag: bool) -> tuple[Any, bool]:
        """Rank 0's ``decide()`` on every rank, and whether any rank raised ``flag``: one all-gather.

        ``decide()`` runs on rank 0 only and returns a JSON-safe value (tuples
        arrive as lists); any other value raises InvalidState on every rank.

        Example:
            >>> ctx = Distributed.alone()
            >>> ctx.agree(lambda: ("save", 3, float("nan")), flag=False)
            (['save', 3, nan], False)
        """
        if self.rank == 0:
            mine = _sealed(decide(), "decision", f=bool(flag))
        else:
            mine = json.dumps({"f": bool(flag)}).encode()
        got = [json.loads(data) for data in self._all_gather_bytes(mine)]
        return _opened(got[0]), any(bool(m["f"]) for m in got)

    def broadcast(self, obj: object) -> Any:
        """Rank 0's ``obj`` on every rank (the others' ``obj`` is ignored).

        ``obj`` is JSON-safe (tuples arrive as lists); any other value raises
        InvalidState on every rank.

        Example:
            >>> Distributed.alone().broadcast(("r@3", None))
            ['r@3', None]
        """
        data = _sealed(obj, "broadcast") if self.rank == 0 else b""
        return _opened(json.loads(self._broadcast_bytes(data)))

    def any_rank(self, flag: bool) -> bool:
        """Whether ``flag`` is true on any rank: one all-reduce on the background writer's group.

        Example:
            >>> Distributed.alone().any_rank(True)
            True
        """
        import torch.distributed as dist

        if self.save_group is None:
            return bool(flag)
        t = torch.tensor([1 if flag else 0], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.save_group)
        return bool(t.item())

    # Bytes travel as uint8 tensors over the manager's gloo group: lengths first, then the payloads.
    def _all_gather_bytes(self, data: bytes) -> list[bytes]:
        import torch.distributed as dist

        if self.decide_group is None:
            return [data]
        sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(self.world)]
        dist.all_gather(sizes, torch.tensor([len(data)], dtype=torch.int64), group=self.decide_group)
        lengths = [int(n.item()) for n in sizes]
        padded = torch.zeros(max(lengths), dtype=torch.uint8)
        padded[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        payloads = [torch.empty(max(lengths), dtype=torch.uint8) for _ in range(self.world)]
        dist.all_gather(payloads, padded, group=self.decide_group)
        return [p[:n].numpy().tobytes() for p, n in zip(payloads, lengths, strict=True)]

    def _broadcast_bytes(self, data: bytes) -> bytes:
        import torch.distributed as dist

        if self.decide_group is None:
            return data
        src = dist.get_global_rank(self.decide_group, 0)
        size = torch.tensor([len(data)], dtype=torch.int64)
        dist.broadcast(size, src=src, group=self.decide_group)
        payload = torch.empty(int(size.item()), dtype=torch.uint8)
        if self.rank == 0:
            payload.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
        dist.broadcast(payload, src=src, group=self.decide_group)
        return payload.numpy().tobytes()


def _owner(models: Mapping[str, torch.nn.Module], optimizer: Any) -> torch.nn.Module:
    """The model whose parameters ``optimizer`` updates."""
    params = {id(p) for group in getattr(optimizer, "param_groups", []) for p in group.get("params", [])}
    for model in models.values():
        if any(id(p) in params for p in model.parameters()):
            return model
    raise IncompatibleState("an optimizer of the training state updates no parameter of its models")


def _sections(state: TrainingState) -> tuple[dict[str, torch.nn.Module], dict[str, Any]]:
    models = state.objects("model")
    for name, model in models.items():
        if not isinstance(model, torch.nn.Module):
            raise IncompatibleState(f"model {name or '(unnamed)'} is not a torch.nn.Module")
    return models, state.objects("optimizer")


def _wrap(state: TrainingState, kind: str, states: dict[str, Any]) -> Any:
    return states if state.is_named(kind) else states[""]


def capture(state: TrainingState, rank: int) -> dict[str, Any]:
    """This rank's part of a distributed checkpoint: sharded model/optimizer state, shared and per-rank sections."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    models, optimizers = _sections(state)
    tree: dict[str, Any] = {}
    if models:
        tree["model"] = _wrap(state, "model", {n: get_model_state_dict(m) for n, m in models.items()})
    if optimizers:
        tree["optimizer"] = _wrap(
            state,
            "optimizer",
            {n: get_optimizer_state_dict(_owner(models, o), o) for n, o in optimizers.items()},
        )
    full = state.capture([s for s in state.sections() if s in _SHARED or s in _PER_RANK_SECTIONS])
    for kind in _SHARED:
        if kind in full:
            tree[kind] = full[kind]
    record = state.classes()
    if record:
        tree[CLASSES] = record
    mine = {k: full[k] for k in _PER_RANK_SECTIONS if k in full}
    if mine:
        tree[PER_RANK] = {str(rank): mine}
    return tree


def save(
    bank: Bank, tree: dict[str, Any], group: Any, **writer_options: Any
) -> tuple[str, CheckpointInfo | None]:
    """Save every rank's ``tree`` as one checkpoint through DCP; (its id, its info on rank 0 else None)."""
    from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

    from ..dcp import SavePlanner, Writer, saved_id

    # On failure the writer gives up this rank's part (unless the coordinator may have committed it).
    with Writer(bank, **writer_options) as writer:
        md = dcp_save(tree, storage_writer=writer, planner=SavePlanner(), process_group=group)
    return saved_id(md), writer.info


def pick(
    bank: Bank, ctx: Distributed, ref: str | None, run: str, init_from: str | None
) -> tuple[str | None, str | None]:
    """(checkpoint to restore, or None; else the ``init_from`` one, or None), as rank 0 resolves them."""

    def find() -> tuple[str | None, str | None, str]:
        # Errors travel as text: a rank 0 that raised here would leave the others waiting for it.
        try:
            return bank.resolve(ref or f"{run}@latest"), None, ""
        except CheckpointNotFound as e:
            if ref is not None:
                return None, None, str(e)
        try:
            return None, None if init_from is None else bank.resolve(init_from), ""
        except WeightbankError as e:
            return None, None, str(e)

    cid, init, error = ctx.broadcast(find() if ctx.rank == 0 else (None, None, ""))
    if error:
        raise CheckpointNotFound(str(ref or init_from), detail=error)
    return cid, init


def restore(
    state: TrainingState, bank: Bank, cid: str, ctx: Distributed, parts: Sequence[str] | None = None
) -> tuple[Any, list[str]]:
    """Restore ``state`` (its ``parts``, default all) on this rank from ``cid``; (saved manager state, notes).

    The model and optimizer sections go through DCP (resharded to this job),
    the others are read from the manifest. A checkpoint holding a bare model
    state dict (no sections) restores ``parts=("model",)`` of a single model.
    """
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )
    from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

    from ..dcp import LoadPlanner, Reader

    ck = bank.checkpoint(cid)
    cid, m = ck.id, ck.manifest
    top = {str(k): node for k, node in dict_items(m.tree) or []}
    sections = [s for s in state.sections() if parts is None or s in parts]
    bare = list(sections) == ["model"] and "model" not in top and not state.is_named("model")
    missing = [s for s in sections if s not in _PER_RANK_SECTIONS and s not in top and not bare]
    if missing:
        raise IncompatibleState(
            f"checkpoint {cid[:12]} has no {', '.join(missing)} section(s) (it holds {sorted(top)})", missing
        )
    models, optimizers = _sections(state)
    models = models if "model" in sections else {}
    optimizers = optimizers if "optimizer" in sections else {}
    if CLASSES in top:
        # A restore into an optimizer or scheduler of another class is refused before anything is loaded.
        state.check_classes(ck.tree_value(top[CLASSES]), sections)
    target: dict[str, Any] = {}
    if models:
        target["model"] = {n: get_model_state_dict(mod) for n, mod in models.items()}
    if optimizers:
        target["optimizer"] = {
            n: get_optimizer_state_dict(_owner(models, o), o) for n, o in optimizers.items()
        }
    if target:
        shaped = {k: _wrap(state, k, v) for k, v in target.items()}
        reader, planner = Reader(bank, cid), LoadPlanner()
        with warnings.catch_warnings():
            # Alone, DCP warns that it runs without a process group: that is the point.
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp_load(
                shaped["model"] if bare else shaped,
                storage_reader=reader,
                planner=planner,
                process_group=ctx.decide_group,
                no_dist=ctx.decide_group is None,
            )
        loaded = {k: v if state.is_named(k) else {"": v} for k, v in shaped.items()}
        for n, mod in models.items():
            set_model_state_dict(mod, loaded["model"][n])
        for n, o in optimizers.items():
            set_optimizer_state_dict(_owner(models, o), o, loaded["optimizer"][n])
    small = {k: ck.tree_value(top[k]) for k in _SHARED if k in top and k in sections}
    notes = _per_rank(state, ck, top, ctx, [s for s in sections if s in _PER_RANK_SECTIONS], small)
    state.load(small, parts=[k for k in sections if k in small], strict=False)
    manager = ck.tree_value(top["manager"]) if "manager" in top and parts is None else None
    for note in notes:
        warnings.warn(note, UserWarning, stacklevel=3)
    return manager, notes


def _per_rank(
    state: TrainingState,
    ck: Checkpoint,
    top: dict[str, Any],
    ctx: Distributed,
    wanted: list[str],
    into: dict[str, Any],
) -> list[str]:
    """Read this rank's own sections into ``into`` (or rank 0's data position); notes on what is missing."""
    if not wanted:
        return []
    ranks = {str(k): node for k, node in dict_items(top[PER_RANK]) or []} if PER_RANK in top else {}
    cid = ck.id
    dcp_meta = ck.manifest.decoded_meta().get("dcp")
    saved_world = int(dcp_meta.get("world_size", len(ranks))) if isinstance(dcp_meta, dict) else len(ranks)
    notes = []
    own = ranks.get(str(ctx.rank))
    if own is not None:
        into.update({k: v for k, v in ck.tree_value(own).items() if k in wanted})
    else:
        base = ck.tree_value(ranks["0"]) if "0" in ranks else {}
        if "data" in wanted and "data" in base:
            into["data"] = base["data"]
        lost = [s for s in wanted if s not in into]
        notes.append(
            f"rank {ctx.rank}: checkpoint {cid[:12]} was saved by {saved_world} rank(s) and holds no state of"
            f" this rank: {', '.join(lost) or 'nothing else'} not restored"
            + ("; the data position is rank 0's, converted to this world size" if "data" in into else "")
        )
    if ctx.rank == 0 and saved_world > ctx.world:
        notes.append(
            f"checkpoint {cid[:12]} was saved by {saved_world} ranks and is restored on {ctx.world}: the"
            f" per-rank state (RNG, extras) of ranks {ctx.world}..{saved_world - 1} is not used"
        )
    return notes


class DistributedJob:
    """The :class:`~weightbank.training.job.Job` of one rank: rank 0 leads and decides, every rank writes.

    Example:
        >>> job = DistributedJob(Distributed.alone())
        >>> job.leader, job.retains
        (True, False)
    """

    retains = False  # a rollback restores from the bank: every rank must load the same checkpoint

    def __init__(self, ctx: Distributed) -> None:
        self.ctx = ctx
        self.leader = ctx.rank == 0

    def agree(self, decide: Callable[[], Decision], signalled: bool) -> tuple[Decision, bool]:
        value, flag = self.ctx.agree(lambda: decide().to_json(), signalled)
        return Decision.from_json(value), flag

    def broadcast(self, value: Any) -> Any:
        return self.ctx.broadcast(value)

    def any_rank(self, flag: bool) -> bool:
        return self.ctx.any_rank(flag)

    def pick(
        self, bank: Bank, ref: str | None, run: str, init_from: str | None
    ) -> tuple[str | None, str | None]:
        return pick(bank, self.ctx, ref, run, init_from)

    def capture(self, state: TrainingState) -> dict[str, Any]:
        return capture(state, self.ctx.rank)

    def save(self, bank: Bank, tree: Any, options: Mapping[str, Any]) -> tuple[str, CheckpointInfo | None]:
        return save(bank, tree, self.ctx.save_group, **options)

    def restore(
        self, state: TrainingState, bank: Bank, cid: str, parts: Sequence[str] | None = None
    ) -> tuple[Any, list[str]]:
        return restore(state, bank, cid, self.ctx, parts=parts)
