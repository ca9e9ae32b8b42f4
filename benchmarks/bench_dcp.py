"""Benchmark DCP with weightbank as storage against DCP's own FileSystemWriter/Reader, same sharded state.

Run with ``.venv/bin/python benchmarks/bench_dcp.py`` (``--quick`` for a smoke
run). Two CPU ranks (gloo, torch.multiprocessing) hold a sharded training
state — ``--layers`` float32 matrices of 2048×2048 sharded by rows
(``Shard(0)``), a replicated embedding and a few values, ~``--layers`` × 16 MiB
in all — and save it with ``dcp.save``:

* ``FileSystemWriter`` (DCP's default storage: one file per rank, fsynced),
* ``wb.dcp.Writer`` with ``codec="raw"`` (hashed, deduplicated, packed, fsynced),
* ``wb.dcp.Writer`` with ``codec="auto"`` (byte planes + zstd),
* ``wb.dcp.Writer`` raw again on the unchanged state (everything deduplicated),

then loads each back with ``dcp.load`` into a template sharded the other way
(``Shard(1)``, so every load reshards): ``FileSystemReader`` vs
``wb.dcp.Reader``. Arms are interleaved (A B C D A B C D ...) over
``--repeats`` rounds into fresh directories; the tables give medians of the
wall time on rank 0 between barriers, and weightbank's speed relative to DCP's
own storage (DCP's time / weightbank's: above 1 is faster, as in the other
benchmarks). It runs twice: on the local disk (where page-cache writeback of
other work on the machine makes single runs noisy) and on tmpfs, where only
CPU work remains (hashing, packing, decoding vs pickling). Loads read from
the page cache (the data was just written).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import psutil
import torch

from bench_common import tree_bytes, write_section  # a sibling module of this script

BEGIN, END = "<!-- dcp:begin -->", "<!-- dcp:end -->"
ARMS = ("fs", "wb-raw", "wb-auto", "wb-raw-again")
DIM = 2048


def _state(mesh: Any, layers: int, placement: Any, fill: bool) -> dict[str, Any]:
    from torch.distributed.tensor import Replicate, distribute_tensor

    g = torch.Generator().manual_seed(0)
    model: dict[str, Any] = {}
    for i in range(layers):
        w = torch.randn(DIM, DIM, generator=g) * 0.02 if fill else torch.zeros(DIM, DIM)
        model[f"layers.{i}.weight"] = distribute_tensor(w, mesh, [placement])
    emb = torch.randn(1024, 512, generator=g) * 0.02 if fill else torch.zeros(1024, 512)
    model["embed.weight"] = distribute_tensor(emb, mesh, [Replicate()])
    return {"model": model, "step": 1000 if fill else 0, "lr": [3e-4] if fill else [0.0]}


def _rank_main(rank: int, world: int, root: str, layers: int, repeats: int, out: str) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard

    import weightbank as wb

    dist.init_process_group(
        "gloo", init_method=f"file://{root}/store", rank=rank, world_size=world, timeout=timedelta(minutes=10)
    )
    mesh = init_device_mesh("cpu", (world,))
    state = _state(mesh, layers, Shard(0), fill=True)
    times: dict[str, list[float]] = {f"save {a}": [] for a in ARMS} | {f"load {a}": [] for a in ARMS[:3]}
    sizes: dict[str, int] = {}

    def timed(label: str, fn: Any, *args: Any, **kwargs: Any) -> None:
        dist.barrier()
        t0 = time.perf_counter()
        fn(*args, **kwargs)
        dist.barrier()
        times[label].append(time.perf_counter() - t0)

    for r in range(repeats):
        base = Path(root) / f"round{r}"
        paths = {a: base / a for a in ARMS[:3]}
        if rank == 0:
            for a in ("wb-raw", "wb-auto"):
                wb.open(paths[a])
        dist.barrier()
        raw, auto = wb.open(paths["wb-raw"]), wb.open(paths["wb-auto"])
        timed("save fs", dcp.save, state, storage_writer=dcp.FileSystemWriter(paths["fs"]))
        timed("save wb-raw", dcp.save, state, storage_writer=wb.dcp.Writer(raw, run="b", step=1, codec="raw"))
        timed(
            "save wb-auto", dcp.save, state, storage_writer=wb.dcp.Writer(auto, run="b", step=1, codec="auto")
        )
        again = wb.dcp.Writer(raw, run="b", step=2, codec="raw")
        timed("save wb-raw-again", dcp.save, state, storage_writer=again)
        readers: dict[str, Any] = {
            "fs": dcp.FileSystemReader(paths["fs"]),
            "wb-raw": wb.dcp.Reader(raw, "b@1"),
            "wb-auto": wb.dcp.Reader(auto, "b@1"),
        }
        for arm, reader in readers.items():
            target = _state(mesh, layers, Shard(1), fill=False)
            timed(f"load {arm}", dcp.load, target, storage_reader=reader)
            # a resharded load must give back the very bits that were saved
            for name, t in target["model"].items():
                if not torch.equal(t.full_tensor(), state["model"][name].full_tensor()):
                    raise AssertionError(f"{arm}: {name} differs after the load")
        if rank == 0:
            sizes = {
                a: tree_bytes(paths[a] / "packs") if a != "fs" else tree_bytes(paths[a]) for a in ARMS[:3]
            }
            shutil.rmtree(base)
        dist.barrier()
    if rank == 0:
        Path(out).write_text(json.dumps({"times": times, "sizes": sizes}))
    dist.barrier()
    dist.destroy_process_group()


def _measure(where: Path, layers: int, repeats: int) -> dict[str, Any]:
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory(dir=where) as tmp:
        out = Path(tmp) / "result.json"
        mp.start_processes(
            _rank_main, args=(2, tmp, layers, repeats, str(out)), nprocs=2, join=True, start_method="spawn"
        )
        result: dict[str, Any] = json.loads(out.read_text())
    return result


def _rows(result: dict[str, Any], total: int) -> list[tuple[str, str, str, str]]:
    med = {k: statistics.median(v) for k, v in result["times"].items()}
    sizes: dict[str, int] = result["sizes"]
    rows: list[tuple[str, str, str, str]] = []
    for arm, label in (
        ("fs", "DCP FileSystemWriter"),
        ("wb-raw", "wb.dcp.Writer, codec raw"),
        ("wb-auto", "wb.dcp.Writer, codec auto"),
        ("wb-raw-again", "wb.dcp.Writer raw, unchanged re-save"),
    ):
        t = med[f"save {arm}"]
        stored = f"{sizes[arm] / 2**20:.0f} MiB" if arm in sizes else "+0 MiB (dedup)"
        rows.append(
            (
                f"save, {label}",
                f"{t:.2f} s",
                f"{total / t / 2**20:.0f} MiB/s",
                f"{med['save fs'] / t:.2f}× · {stored}",
            )
        )
    for arm, label in (
        ("fs", "DCP FileSystemReader"),
        ("wb-raw", "wb.dcp.Reader, raw"),
        ("wb-auto", "wb.dcp.Reader, auto"),
    ):
        t = med[f"load {arm}"]
        rows.append(
            (
                f"load (reshard), {label}",
                f"{t:.2f} s",
                f"{total / t / 2**20:.0f} MiB/s",
                f"{med['load fs'] / t:.2f}×",
            )
        )
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="a small state and one round (no RESULTS.md)")
    ap.add_argument("--layers", type=int, default=32, help="2048×2048 float32 matrices (16 MiB each)")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    layers, repeats = (2, 1) if args.quick else (args.layers, args.repeats)
    total = layers * DIM * DIM * 4 + 1024 * 512 * 4
    places = [("local disk (ext4, page cache)", Path(__file__).parent)]
    if Path("/dev/shm").is_dir():
        places.append(("tmpfs (/dev/shm): no I/O, CPU cost only", Path("/dev/shm")))
    tables: list[str] = []
    for title, where in places:
        rows = _rows(_measure(where, layers, repeats), total)
        width = max(len(r[0]) for r in rows)
        print(f"-- {title}")
        for a, b, c, d in rows:
            print(f"{a.ljust(width)}  {b:>8}  {c:>10}  {d}")
        tables += [
            f"**{title}**",
            "",
            "| arm | time | throughput | speed vs DCP's own (its time / ours; > 1 = faster) · stored |",
            "|---|---|---|---|",
            *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
            "",
        ]
    if not args.quick:
        load = ", ".join(f"{x:.2f}" for x in psutil.getloadavg())
        section = "\n".join(
            [
                BEGIN,
                "## DCP storage: weightbank vs FileSystemWriter",
                "",
                f"Generated by `benchmarks/bench_dcp.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())};"
                f" {psutil.cpu_count()} CPUs, torch {torch.__version__}, load average after: {load}.",
                f"2 ranks (gloo), {total / 2**20:.0f} MiB of float32 state: {layers} × 2048² matrices"
                f" `Shard(0)` + a replicated 2 MiB embedding; loads reshard into `Shard(1)`;"
                f" median of {repeats} interleaved rounds, wall time on rank 0 between barriers.",
                "",
                *tables,
                END,
            ]
        )
        write_section(Path(__file__).parent / "RESULTS.md", section + "\n", BEGIN, END)


if __name__ == "__main__":
    main()
