"""Benchmark the training checkpoint manager: loop stall per save, throughput overhead, host memory.

Run with ``.venv/bin/python benchmarks/bench_training.py`` (``--quick`` for a
smoke run). A small transformer (token embedding, 4 encoder layers,
d_model 192, ~2.5 M parameters; with AdamW state a ~29 MiB checkpoint) trains
on random tokens (batch 8 × 32) on CPU, into a bank on local disk.

What is measured, in one run:

* **blocked per save**: the time ``mgr.step`` blocks the training loop on a
  step that saves (async: back-pressure + snapshot copy into the reused
  staging buffers) vs a synchronous save of the same state (capture + clone +
  ``bank.save`` until committed), median over ``--saves`` saves each. Target:
  async ≤ 10% of sync.
* **throughput overhead**: steps/s with the manager saving every ~30 s of
  training vs no checkpointing, arms interleaved (A B A B) to spread machine
  noise, each ``--duration`` seconds. Target ≤ 3%.
* **host memory over 1000 saves** of a small state (Linear 64×64 + Adam)
  with ``Every(steps=1)`` and ``LastN(2)``: peak RSS, and RSS growth after a
  100-save warm-up (bank on tmpfs when available: this is about memory).

Missed targets are reported, not raised; the script exits 0.
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import psutil
import torch
from torch import nn

import weightbank as wb
from bench_common import write_section  # a sibling module of this script
from weightbank.training.state import clone_tree

BEGIN, END = "<!-- training:begin -->", "<!-- training:end -->"

VOCAB, SEQ, BATCH = 2000, 32, 8


class SmallTransformer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 192)
        layer = nn.TransformerEncoderLayer(192, 4, 768, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 4, enable_nested_tensor=False)
        self.head = nn.Linear(192, VOCAB)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.head(self.encoder(self.embed(x)))
        return out


def make() -> tuple[nn.Module, torch.optim.Optimizer, wb.TrainingState]:
    torch.manual_seed(0)
    model = SmallTransformer()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, opt, wb.TrainingState(model=model, optimizer=opt)


def train_step(model: nn.Module, opt: torch.optim.Optimizer) -> float:
    x = torch.randint(0, VOCAB, (BATCH, SEQ))
    loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.detach().item()


def bench_blocked(root: Path, saves: int) -> dict[str, float]:
    model, opt, state = make()
    train_step(model, opt)
    bank = wb.open(root / "blocked")
    sync = []
    for i in range(saves):
        train_step(model, opt)
        t0 = time.perf_counter()
        bank.save(clone_tree(state.capture()), run="sync", step=i)
        sync.append(time.perf_counter() - t0)
    blocked = []
    with wb.CheckpointManager(bank, run="async", save=wb.Every(steps=1), signals=()) as mgr:
        for i in range(saves):
            train_step(model, opt)
            train_step(model, opt)  # room for the previous save to land, like a real save interval
            mgr.wait()
            out = mgr.step(i, state, {})
            assert out.saved is not None
            blocked.append(out.saved.blocked_seconds)
    nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values()) * 3
    return {"sync": statistics.median(sync), "async": statistics.median(blocked), "bytes": nbytes}


def bench_throughput(root: Path, duration: float, save_every_s: float) -> dict[str, float]:
    model, opt, state = make()
    for _ in range(3):
        train_step(model, opt)
    t0 = time.perf_counter()
    for _ in range(5):
        train_step(model, opt)
    step_s = (time.perf_counter() - t0) / 5
    every = max(1, round(save_every_s / step_s))
    steps = max(every + 1, round(duration / step_s))
    bank = wb.open(root / "throughput")
    rates: dict[str, list[float]] = {"off": [], "on": []}
    saves = 0
    for rep in range(2):
        for arm in ("off", "on"):
            t0 = time.perf_counter()
            if arm == "off":
                for _ in range(steps):
                    train_step(model, opt)
            else:
                with wb.CheckpointManager(
                    bank, run=f"tp{rep}", save=wb.Every(steps=every), keep=[wb.LastN(2)], signals=()
                ) as mgr:
                    for i in range(steps):
                        train_step(model, opt)
                        saves += mgr.step(i, state, {}).saved is not None
            rates[arm].append(steps / (time.perf_counter() - t0))
    off, on = statistics.median(rates["off"]), statistics.median(rates["on"])
    return {"off": off, "on": on, "overhead": 1 - on / off, "every": every, "step_s": step_s, "saves": saves}


def _rss_peak() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return psutil.Process().memory_info().rss


def bench_rss(saves: int) -> dict[str, float]:
    shm = Path("/dev/shm")
    root = Path(tempfile.mkdtemp(dir=shm if shm.is_dir() else None, prefix="wb-bench-"))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 8))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        state = wb.TrainingState(model=model, optimizer=opt)
        bank = wb.open(root / "bank")
        proc = psutil.Process()
        with wb.CheckpointManager(
            bank, run="r", save=wb.Every(steps=1), keep=[wb.LastN(2)], guard=wb.Guard(), signals=()
        ) as mgr:
            start = 0
            t0 = time.perf_counter()
            for step in range(100 + saves):
                if step == 100:
                    mgr.wait()
                    gc.collect()
                    start = proc.memory_info().rss
                loss = model(torch.randn(8, 64)).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                mgr.step(step, state, {"loss": loss.detach().item()})
            mgr.wait()
            gc.collect()
            end = proc.memory_info().rss
            seconds = time.perf_counter() - t0
            staged = mgr._pool.nbytes
        return {"start": start, "end": end, "peak": _rss_peak(), "staged": staged, "seconds": seconds}
    finally:
        torch.set_num_threads(threads)
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="short smoke run")
    ap.add_argument("--saves", type=int, default=None, help="saves for the blocked-time comparison")
    ap.add_argument("--duration", type=float, default=None, help="seconds per throughput arm")
    ap.add_argument("--save-every", type=float, default=30.0, help="seconds of training between saves")
    args = ap.parse_args()
    saves = args.saves or (3 if args.quick else 10)
    duration = args.duration or (10.0 if args.quick else 75.0)
    save_every = 4.0 if args.quick else args.save_every
    print(f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads, {psutil.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent) as tmp:
        root = Path(tmp)
        b = bench_blocked(root, saves)
        t = bench_throughput(root, duration, save_every)
    r = bench_rss(200 if args.quick else 1000)
    ratio = b["async"] / b["sync"]
    rows: list[tuple[str, str, str]] = [
        ("checkpoint size (model + AdamW)", f"{b['bytes'] / 2**20:.1f} MiB", ""),
        ("sync save, loop blocked (median)", f"{b['sync'] * 1e3:.1f} ms", ""),
        (
            "async save, loop blocked (median)",
            f"{b['async'] * 1e3:.1f} ms",
            f"{ratio:.1%} of sync (target ≤ 10%)",
        ),
        ("step time", f"{t['step_s'] * 1e3:.1f} ms", f"save every {t['every']} steps (~{save_every:g} s)"),
        ("throughput, no checkpoints", f"{t['off']:.2f} steps/s", ""),
        ("throughput, with manager", f"{t['on']:.2f} steps/s", f"overhead {t['overhead']:.1%} (target ≤ 3%)"),
        ("saves during throughput runs", f"{t['saves']:.0f}", ""),
        (
            f"RSS after warm-up → after {200 if args.quick else 1000} saves",
            f"{r['start'] / 2**20:.1f} → {r['end'] / 2**20:.1f} MiB",
            f"growth {(r['end'] - r['start']) / 2**20:+.1f} MiB; staging {r['staged'] / 1024:.0f} KiB",
        ),
        (
            "peak RSS of the process (VmHWM)",
            f"{r['peak'] / 2**20:.1f} MiB",
            f"{r['seconds']:.1f} s for the saves",
        ),
    ]
    width = max(len(a) for a, _, _ in rows)
    for a, v, note in rows:
        print(f"{a.ljust(width)}  {v:>18}  {note}")
    if not args.quick:
        load = ", ".join(f"{x:.2f}" for x in psutil.getloadavg())
        section = "\n".join(
            [
                BEGIN,
                "## Training",
                "",
                f"Generated by `benchmarks/bench_training.py` on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())};"
                f" {psutil.cpu_count()} CPUs, torch {torch.__version__}, load average after: {load}.",
                "",
                "| measurement | value | note |",
                "|---|---|---|",
                *[f"| {a} | {v} | {note} |" for a, v, note in rows],
                END,
            ]
        )
        write_section(Path(__file__).parent / "RESULTS.md", section + "\n", BEGIN, END)


if __name__ == "__main__":
    main()
