"""What each rank runs in the distributed tests (imported by spawned processes, so module-level).

The state: DTensors sharded by rows (``Shard(0)``, uneven at world size 4),
by columns (``Shard(1)``, several chunks per shard), a replicated DTensor, a
plain tensor (a replicated module's parameter), an optimizer-like section
with a 0-d step tensor and ``param_groups``, and plain values (int, str, nan,
a tuple). Every process builds the same full tensors from a fixed seed, so a
rank can check what it loaded bit for bit.
"""

from __future__ import annotations

import math
import os
import signal
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Placement, Replicate, Shard, distribute_tensor

import weightbank as wb

CHUNK = 4096  # small chunks: shards span several, so region reads are exercised

SAVE_PLACEMENTS: dict[str, Placement | None] = {
    "model.rows": Shard(0),
    "model.cols": Shard(1),
    "model.big": Shard(1),
    "model.rep": Replicate(),
    "model.plain": None,
    "optim.state.rows.exp_avg": Shard(0),
    "optim.state.rows.step": None,
}
#: Loads use other placements than saves, so every load reshards (even at the same world size).
LOAD_PLACEMENTS: dict[str, Placement | None] = {
    "model.rows": Shard(1),
    "model.cols": Shard(0),
    "model.big": Shard(0),
    "model.rep": Shard(0),
    "model.plain": None,
    "optim.state.rows.exp_avg": Replicate(),
    "optim.state.rows.step": None,
}


def full_tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return {
        "model.rows": torch.randn(10, 6, generator=g),
        "model.cols": torch.randn(4, 9, generator=g).to(torch.bfloat16),
        "model.big": torch.randn(48, 40, generator=g),
        "model.rep": torch.randn(5, generator=g),
        "model.plain": torch.randn(3, 3, generator=g, dtype=torch.float64),
        "optim.state.rows.exp_avg": torch.randn(10, 6, generator=g),
        "optim.state.rows.step": torch.tensor(7.0),
    }


def values() -> dict[str, Any]:
    return {
        "param_groups": [{"lr": 0.1, "betas": (0.9, 0.999), "params": ["rows"]}],
        "step": 7,
        "tag": "w",
        "nan": math.nan,
    }


def _set(tree: dict[str, Any], fqn: str, value: Any) -> None:
    *head, last = fqn.split(".")
    for key in head:
        tree = tree.setdefault(key, {})
    tree[last] = value


def build_state(mesh: DeviceMesh, placements: dict[str, Placement | None], fill: bool) -> dict[str, Any]:
    """The state dict with each tensor placed as asked; ``fill=False`` gives zeros (a load target)."""
    state: dict[str, Any] = {}
    for fqn, full in full_tensors().items():
        t = full if fill else torch.zeros_like(full)
        p = placements[fqn]
        _set(state, fqn, t if p is None else distribute_tensor(t, mesh, [p]))
    v = values()
    state["optim"]["param_groups"] = (
        v["param_groups"] if fill else [{"lr": 0.0, "betas": (0.0, 0.0), "params": []}]
    )
    for key in ("step", "tag", "nan"):
        state[key] = v[key] if fill else None
    return state


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def mismatches(state: dict[str, Any]) -> list[str]:
    """Keys whose loaded tensor (gathered whole) or value differs from the original, bit for bit."""
    bad = []
    flat = _flat(state)
    for fqn, want in full_tensors().items():
        got = flat[fqn]
        got = got.full_tensor() if isinstance(got, DTensor) else got
        if (
            got.dtype != want.dtype
            or got.shape != want.shape
            or not torch.equal(got.view(-1).view(torch.uint8), want.view(-1).view(torch.uint8))
        ):
            bad.append(fqn)
    v = values()
    if state["optim"]["param_groups"] != v["param_groups"]:
        bad.append(f"param_groups={state['optim']['param_groups']}")
    if state["step"] != 7 or state["tag"] != "w" or not math.isnan(state["nan"]):
        bad.append(f"values={state['step'], state['tag'], state['nan']}")
    return bad


def _mesh(world: int) -> DeviceMesh:
    return init_device_mesh("cpu", (world,))


def save(rank: int, world: int, bank_dir: str, run: str, step: int, codec: str) -> dict[str, Any]:
    """Save the state through wb.dcp.Writer; what this rank wrote and the committed id."""
    bank = wb.open(bank_dir)
    state = build_state(_mesh(world), SAVE_PLACEMENTS, fill=True)
    writer = wb.dcp.Writer(bank, run=run, step=step, codec=codec, chunk_size=CHUNK, tags=[f"{run}-tag"])
    md = dcp.save(state, storage_writer=writer, planner=wb.dcp.SavePlanner())
    stats = writer.part.stats if writer.part is not None else None
    committed = writer.info if isinstance(writer.info, wb.SaveResult) else None  # the coordinator's commit
    return {
        "id": wb.dcp.saved_id(md),
        "written": stats.written_bytes if stats else 0,
        "reused": stats.reused_bytes if stats else 0,
        "committed": committed.id if committed is not None else None,
        "committed_written": committed.save_stats.written_bytes if committed is not None else None,
    }


def load(rank: int, world: int, bank_dir: str, refs: list[str]) -> dict[str, list[str]]:
    """Load each ref resharded into other placements at this world size; the keys that came out wrong."""
    bank = wb.open(bank_dir)
    mesh = _mesh(world)
    out = {}
    for ref in refs:
        state = build_state(mesh, LOAD_PLACEMENTS, fill=False)
        dcp.load(state, storage_reader=wb.dcp.Reader(bank, ref), planner=wb.dcp.LoadPlanner())
        out[ref] = mismatches(state)
    return out


def load_default_planner(rank: int, world: int, bank_dir: str, ref: str) -> list[str]:
    """DCP's stock DefaultLoadPlanner works too (values set without its pickle path)."""
    bank = wb.open(bank_dir)
    state = build_state(_mesh(world), LOAD_PLACEMENTS, fill=False)
    dcp.load(state, storage_reader=wb.dcp.Reader(bank, ref))
    return mismatches(state)


class KillingWriter(wb.dcp.Writer):
    """Dies (SIGKILL) inside write_data on one rank, after its part is durable and its lease held."""

    def __init__(self, *args: Any, victim: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.victim = victim

    def write_data(self, plan: Any, planner: Any) -> Any:
        fut = super().write_data(plan, planner)
        if self.rank == self.victim:
            Path(os.environ["WB_TEST_MARK"]).write_text(self.part.save_id if self.part else "")
            os.kill(os.getpid(), signal.SIGKILL)
        return fut


def save_and_die(rank: int, world: int, bank_dir: str, victim: int, mark: str) -> str:
    os.environ["WB_TEST_MARK"] = mark
    bank = wb.open(bank_dir)
    state = build_state(_mesh(world), SAVE_PLACEMENTS, fill=True)
    writer = KillingWriter(bank, run="crash", step=1, victim=victim, chunk_size=CHUNK, tags=["crash"])
    try:
        dcp.save(state, storage_writer=writer)
    except (Exception, CheckpointException) as e:  # the survivors must fail, not hang and not commit
        return f"failed: {type(e).__name__}"
    return "saved"


def save_with_a_bad_value(rank: int, world: int, bank_dir: str, victim: int, via: str) -> dict[str, Any]:
    """Save where ``victim``'s write_data fails (an unstorable value) after the other ranks wrote their parts.

    ``via="dcp"``: ``dcp.save`` inside ``with wb.dcp.Writer(...)``; ``via="manager"``: the distributed
    CheckpointManager's save function. What this rank saw, and the leases left once every rank is done.
    """
    from weightbank.training.distributed import save as manager_save

    bank = wb.open(bank_dir)
    state = build_state(_mesh(world), SAVE_PLACEMENTS, fill=True)
    state["ranks"] = {str(rank): {"extra": object() if rank == victim else rank}}
    error = ""
    try:
        if via == "dcp":
            with wb.dcp.Writer(bank, run="bad", step=1, chunk_size=CHUNK) as writer:
                dcp.save(state, storage_writer=writer, planner=wb.dcp.SavePlanner())
        else:
            manager_save(bank, state, None, run="bad", step=1, chunk_size=CHUNK)
    except (Exception, CheckpointException) as e:
        error = f"{type(e).__name__}: {e}"
    dist.barrier()  # every rank has cleaned up
    return {"error": error, "leases": [i.key for i in bank.storage.list("leases/")]}


def manager_messages(rank: int, world: int) -> dict[str, Any]:
    """The manager's own collectives (agree, broadcast): JSON in uint8 tensors, never the pickling ones."""
    from weightbank.training.distributed import Distributed

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the manager must not use a pickling collective")

    dist.all_gather_object = refuse
    dist.broadcast_object_list = refuse
    ctx = Distributed(timeout=60)
    long = {"reason": "x" * 5000, "rollbacks": [1, 2, 3], "loss": math.inf}
    decision, flagged = ctx.agree(lambda: long if rank == 0 else None, flag=rank == world - 1)
    quiet, _ = ctx.agree(lambda: ("save", True), flag=False)
    told = ctx.broadcast(("r@3", None) if rank == 0 else ("wrong", rank))
    refused = []
    for attempt in (lambda: ctx.broadcast(object()), lambda: ctx.agree(lambda: {"fn": print}, flag=False)):
        try:
            attempt()
        except wb.InvalidState as e:  # on every rank, and nobody hangs
            refused.append(str(e))
    after = ctx.broadcast(rank)  # the group is still in step
    return {
        "decision": decision == long,
        "flagged": flagged,
        "quiet": quiet,
        "told": told,
        "refused": refused,
        "after": after,
    }


def world_size() -> int:
    return dist.get_world_size()


# -- the distributed CheckpointManager ----------------------------------------------------------
def _digest(t: torch.Tensor) -> str:
    import hashlib

    t = t.to_local() if isinstance(t, DTensor) else t
    return hashlib.sha256(
        t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    ).hexdigest()[:16]


def _fingerprint(model: torch.nn.Module, opt: torch.optim.Optimizer, loader: Any) -> dict[str, Any]:
    """This rank's share of the training state, bit for bit (local shards, optimizer state, RNG, data)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    msd, osd = get_state_dict(model, opt)
    out: dict[str, Any] = {}
    for k, v in msd.items():
        assert isinstance(v, torch.Tensor), k  # a model's state dict holds tensors (DTensors here) only
        out[f"model.{k}"] = _digest(v)
    assert isinstance(osd, dict)  # one optimizer: one state dict, not a list of them
    opt_state = osd["state"]
    assert isinstance(opt_state, dict)
    for pk, st in opt_state.items():
        assert isinstance(st, dict), pk
        out.update({f"optim.{pk}.{k}": _digest(v) for k, v in st.items() if isinstance(v, torch.Tensor)})
    out["rng"] = _digest(torch.get_rng_state())
    out["data"] = loader.state_dict()
    return out


def train(
    rank: int,
    world: int,
    bank_dir: str,
    total: int,
    kill_at: int | None,
    fsdp: bool,
    improve: bool = False,
    nan_at: int | None = None,
) -> dict[str, Any]:
    """A small training run under the distributed CheckpointManager; optionally SIGKILL rank 1 at a step.

    ``improve`` adds ``OnImprovement("loss")``: every rank reports its own loss, so only rank 0's
    decision keeps the ranks saving together. ``nan_at``: rank 0 alone reports a NaN loss once, at
    that step; its guard's rollback must take every rank back.
    """
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    if fsdp:
        fully_shard(model, mesh=_mesh(world))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(5)
    dataset = [(torch.randn(8, generator=g), torch.randn(4, generator=g)) for _ in range(40)]
    loader = wb.ResumableLoader(dataset, batch_size=4, shuffle=True, seed=7, rank=rank, world_size=world)
    torch.manual_seed(100 + rank)  # each rank's own noise stream, which a resume must restore
    state = wb.TrainingState(model=model, optimizer=opt, data=loader)
    bank = wb.open(bank_dir)
    save: list[wb.SavePolicy] = [wb.Every(steps=3), *([wb.OnImprovement("loss")] if improve else [])]
    guard = wb.Guard(nan=True) if nan_at is not None else None
    mgr = wb.CheckpointManager(
        bank, run="dist", save=save, keep=[wb.LastN(2)], guard=guard, signals=(), collective_timeout=30
    )
    step = mgr.restore(state)
    started = step

    def batches() -> Any:
        while True:
            yield from loader

    it = batches()
    saved: list[int] = []
    while step < total:
        x, y = next(it)
        loss = torch.nn.functional.mse_loss(model(x + 0.01 * torch.randn(x.shape)), y)
        loss.backward()
        if not fsdp:  # a replicated module: average the gradients by hand (what DDP does)
            for p in model.parameters():
                assert p.grad is not None
                dist.all_reduce(p.grad)
                p.grad /= world
        opt.step()
        opt.zero_grad()
        reported = float(loss.detach())
        if step == nan_at and rank == 0 and not mgr.rollbacks:
            reported = math.nan
        out = mgr.step(step, state, metrics={"loss": reported})
        if out.saved is not None:
            saved.append(out.saved.step)
        if kill_at is not None and step == kill_at and rank == 1:
            mgr.wait()
            os.kill(os.getpid(), signal.SIGKILL)
        step = out.next_step
    mgr.close()
    rollbacks = [(rb.step, rb.restored_step) for rb in mgr.rollbacks]
    return {
        "started": started,
        "notes": mgr.restore_notes,
        "rollbacks": rollbacks,
        "saved": saved,
        **_fingerprint(model, opt, loader),
    }


def _shard(model: torch.nn.Module) -> torch.Tensor:
    """This rank's local shard of the first layer's weight (an FSDP2 DTensor)."""
    weight = model.get_parameter("0.weight")
    assert isinstance(weight, DTensor)
    return weight.to_local()


def poisoned(rank: int, world: int, bank_dir: str) -> dict[str, Any]:
    """FSDP2 under a guarded manager; rank 1 alone writes NaN into its shard at a save step (loss finite).

    Issue 11, item 9 in a distributed job: every rank must refuse that save together (one DCP save,
    no rank writing while another refuses) and every rank must roll back past it.
    """
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    fully_shard(model, mesh=_mesh(world))
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    state = wb.TrainingState(model=model, optimizer=opt, rng=False)
    bank = wb.open(bank_dir)
    mgr = wb.CheckpointManager(
        bank, run="dist", save=wb.Every(steps=2), guard=wb.Guard(), signals=(), collective_timeout=30
    )
    step, refused = 0, ""
    while step < 6:
        loss = model(torch.randn(4, 8)).pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        if step == 3 and rank == 1 and not mgr.rollbacks:
            with torch.no_grad():
                _shard(model)[0, 0] = math.nan
        out = mgr.step(step, state, metrics={"loss": 1.0})
        if out.saved is not None and out.saved.step == 4 and not refused:
            err = out.saved.exception()
            refused = "" if err is None else f"{type(err).__name__}: {err}"
        step = out.next_step
    mgr.close()
    local = _shard(model)
    return {
        "refused": refused,
        "rollbacks": [(rb.step, rb.restored_step, rb.source) for rb in mgr.rollbacks],
        "finite": bool(torch.isfinite(local).all()),
    }
