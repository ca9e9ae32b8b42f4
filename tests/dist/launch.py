"""Run a function on every rank of a CPU/gloo process group (torch.multiprocessing, spawn), with a deadline.

Each rank joins the group through a FileStore in a fresh directory (no TCP
port to pick), runs ``fn(rank, world, *args)`` and writes what it returns as
JSON (or the error it raised) next to the store. :func:`run_ranks` kills
whatever is still running at the deadline, so a hung collective fails the
test instead of hanging it; a rank that kills itself shows as a negative
exit code.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp

#: Collectives give up after this long (a dead peer usually fails them at once; this is the backstop).
PG_TIMEOUT = 60.0


@dataclass
class RankResult:
    rank: int
    exitcode: int | None
    value: Any = None
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.exitcode == 0 and not self.error


def _entry(fn: Callable[..., Any], rank: int, world: int, workdir: str, args: tuple[Any, ...]) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    out = Path(workdir) / f"rank{rank}.json"
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{workdir}/store",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=PG_TIMEOUT),
        )
        value = fn(rank, world, *args)
        dist.barrier()
        dist.destroy_process_group()
    except BaseException as e:
        out.write_text(json.dumps({"error": f"{type(e).__name__}: {e}\n{traceback.format_exc()}"}))
        os._exit(3)  # a failed collective may leave gloo threads behind that block a clean exit
    out.write_text(json.dumps({"value": value}))


def run_ranks(
    fn: Callable[..., Any], world: int, workdir: Path, *args: Any, timeout: float = 240.0
) -> list[RankResult]:
    """Run ``fn`` on ``world`` ranks; every rank's exit code and returned value (or error)."""
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in workdir.glob("rank*.json"):
        stale.unlink()
    store = workdir / "store"
    if store.exists():
        store.unlink()
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_entry, args=(fn, r, world, str(workdir), args)) for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join(10)
    results = []
    for r, p in enumerate(procs):
        res = RankResult(r, p.exitcode)
        path = workdir / f"rank{r}.json"
        if path.exists():
            obj = json.loads(path.read_text())
            res.value, res.error = obj.get("value"), obj.get("error", "")
        elif p.exitcode is None or p.exitcode > 0:
            res.error = f"rank {r} left no result (exit code {p.exitcode})"
        results.append(res)
    return results


def expect_ok(results: list[RankResult]) -> list[Any]:
    """The ranks' values; fails with every rank's error if any rank failed."""
    bad = [r for r in results if not r.ok]
    assert not bad, "\n".join(f"rank {r.rank} (exit {r.exitcode}): {r.error}" for r in bad)
    return [r.value for r in results]
