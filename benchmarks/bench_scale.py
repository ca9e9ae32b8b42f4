"""Scale benchmark (#12): what a call costs as the bank grows from 10 to 100,000 checkpoints.

Run with ``.venv/bin/python benchmarks/bench_scale.py`` (sizes 10, 100, 1,000) or
``--sizes 10,100,1000,10000,100000`` for the full run; ``--label TEXT`` records
the result in ``benchmarks/RESULTS.md`` as a subsection ``TEXT (commit …)`` of
"Scale (#12)" (between ``<!-- scale:begin -->`` and ``<!-- scale:end -->``;
other subsections and other benchmarks' sections are kept). Without
``--label`` nothing is written.

Banks. One per size under ``benchmarks/_work/scale/n<N>/``, built through the
public library by ``bench_scale_child.py build`` workers (processes, each
saving its own runs, ``--workers``): 4 runs, every checkpoint 50 float32
tensors of 16 values of which 1-3 change per save (the rest dedup), a
``val_loss`` metric, the tags ``prod``, ``staging``, ``canary``, ``nightly``
moved to a worker's newest checkpoint every ``--tag-every`` of its saves (and
at the end), and 1% of the checkpoints deleted along the way, so a bank of N
holds N live checkpoints; the build ends with ``gc(grace=0)``. A built bank is
reused while its ``built.json`` matches the recipe and size (``--rebuild``
forces a new one), so re-measuring is cheap.

Calls. Each one in a fresh process (``bench_scale_child.py op``), timed after
``import weightbank``: open + ``load("prod")``; ``log()[:20]`` and the CLI's
``weightbank log -n 20`` (in that process, so its requests are counted; the
installed ``weightbank`` command is also timed as a whole process); ``tags()``
and ``weightbank tags``; ``resolve("run0@best:val_loss")``; one ``save`` of
run0's next state (parent: run0's newest); deleting 1% of the checkpoints,
then ``gc(grace=0)``. The save and the delete + gc run on a hard-linked clone
of the bank made fresh for each process (a bank never rewrites a file in
place), so the built bank is never changed. Per call: the median over
``--repeats`` processes of the call's wall time and of the whole process's,
the RSS high-water mark above the RSS right after ``import weightbank``
(``VmHWM``, reset through ``/proc/self/clear_refs`` just before the call), and,
from one more process that opens the bank through
:class:`weightbank.storage.CountingStorage`, its storage requests by method
(that wrapper maps no files, so a local bank is asked for every byte the way
a remote one is). ``--seaweed`` repeats the counts on a real SeaweedFS server
(``tests/s3server.py``) for sizes up to 1,000, with the HTTP requests too.

Targets (from #12), checked between the largest and the smallest size run:
load, log -n 20 and resolve within 1.25× and under 0.5 s; save within 1.25×;
a load's requests the same at every size; a save's requests minus the packs
it commits the same at every size; resolving one ref at most 200 MiB above
the import; gc's time and peak memory growing at most linearly (each size
step: ratio ≤ 1.25 × the size ratio). A ``repack`` section runs when
``Bank.repack`` exists. Missed targets are reported, not raised: exit 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import hashlib
import itertools
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

import weightbank as wb
from bench_bank import git_commit, machine_info  # sibling modules of this script
from bench_common import tree_bytes
from weightbank.bank.layout import manifest_key, segment_key
from weightbank.format import stored
from weightbank.format.hashing import digest
from weightbank.format.jsonsafe import encode
from weightbank.format.manifest import COMPACT_FORMAT

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
WORK = HERE / "_work" / "scale"
RESULTS = HERE / "RESULTS.md"
CHILD = HERE / "bench_scale_child.py"
MiB = 1 << 20

BEGIN, END = "<!-- scale:begin -->", "<!-- scale:end -->"
#: Layout of a built bank (bench_scale_child's recipe, the plan): bump it when either changes, so
#: banks built the old way are not reused.
RECIPE = 1
TAGS = ("prod", "staging", "canary", "nightly")
RUN = "run0"  #: the run resolve and save use

#: Calls, in the order measured and shown: (name, what is shown).
OPS = (
    ("load", 'open + `load("prod")` (50 tensors)'),
    ("log", "`bank.log()[:20]`"),
    ("cli-log", "`weightbank log -n 20`"),
    ("tags", "`bank.tags()`"),
    ("cli-tags", "`weightbank tags`"),
    ("resolve", "`resolve(run0@best:val_loss)`"),
    ("save", "`save` of run0's next state"),
    ("delete1pct", "delete 1% of the checkpoints"),
    ("gc", "`gc(grace=0)` after deleting 1%"),
)
MUTATING = {"save", "delete1pct", "gc"}
#: Calls whose wall time must stay within FLAT_RATIO; of those, the ones also under FAST_S.
FLAT_RATIO, FAST_S = 1.25, 0.5
FLAT_OPS = {"load", "log", "cli-log", "resolve", "save"}
FAST_OPS = {"load", "log", "cli-log", "resolve"}
RESOLVE_PEAK_MIB = 200
#: The installed command of each CLI call, timed as a whole process.
CLI_ARGS = {"cli-log": ["log", "-n", "20"], "cli-tags": ["tags"]}


# -- building ------------------------------------------------------------------------------------
def split(total: int, parts: int) -> list[int]:
    """``total`` in ``parts`` near-equal pieces, the larger first."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def make_plan(n: int, runs: int, workers: int, tag_every: int, lag: int = 25) -> dict[str, Any]:
    """Who saves what: run r saves live_r + deleted_r checkpoints and deletes deleted_r along the way."""
    names = [f"run{i}" for i in range(runs)]
    live = dict(zip(names, split(n, runs), strict=True))
    dels = dict(zip(names, split(n // 100, runs), strict=True))
    saves = {r: live[r] + dels[r] for r in names}
    deletes = {r: [(k + 1) * saves[r] // (dels[r] + 1) for k in range(dels[r])] for r in names}
    per_worker = []
    for w in range(workers):
        mine = names[w::workers]
        per_worker.append(
            {
                "runs": {r: saves[r] for r in mine},
                "deletes": {r: deletes[r] for r in mine},
                "tags": list(TAGS[w::workers]),
                "tag_every": tag_every,
                "lag": lag,
            }
        )
    return {"n": n, "runs": runs, "saves": saves, "workers": per_worker}


def child(mode: str, spec: dict[str, Any], env: dict[str, str] | None = None) -> tuple[dict[str, Any], float]:
    """Run ``bench_scale_child.py MODE`` on ``spec``; return its JSON result and the process's wall time."""
    with tempfile.TemporaryDirectory(prefix="wb-scale-") as tmp:
        spec_path, out_path = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        spec_path.write_text(json.dumps(spec))
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, str(CHILD), mode, str(spec_path), str(out_path)],
            capture_output=True,
            text=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
            check=False,
        )
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(
                f"{CHILD.name} {mode} {spec.get('op', '')} failed ({proc.returncode}):\n{proc.stderr}"
            )
        return json.loads(out_path.read_text()), wall


def build_bank(
    url: str, options: dict[str, Any] | None, plan: dict[str, Any], log: Any = print
) -> dict[str, Any]:
    """Create the bank at ``url`` and fill it by the plan with parallel build workers; return the build stats."""
    wb.open(url, storage_options=options or None, cache=False).close()
    t0 = time.perf_counter()
    specs = [{**w, "url": url, "options": options} for w in plan["workers"]]
    procs = []
    tmp = Path(tempfile.mkdtemp(prefix="wb-scale-build-"))
    try:
        for i, spec in enumerate(specs):
            (tmp / f"{i}.json").write_text(json.dumps(spec))
            procs.append(
                subprocess.Popen(
                    [sys.executable, str(CHILD), "build", str(tmp / f"{i}.json"), str(tmp / f"{i}.out")],
                    stderr=subprocess.PIPE,
                    text=True,
                    env={**os.environ, "OMP_NUM_THREADS": "1"},
                )
            )
        for i, p in enumerate(procs):
            _, err = p.communicate()
            if p.returncode != 0:
                raise SystemExit(f"build worker {i} failed ({p.returncode}):\n{err}")
        results = [json.loads((tmp / f"{i}.out").read_text()) for i in range(len(procs))]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = time.perf_counter() - t0
    with wb.open(url, create=False, storage_options=options or None, cache=False) as bank:
        tagged = {t.target for t in bank.tags()}
        live = bank.log()
        # A planned delete finds every candidate tagged only in tiny banks; make up for it here.
        spare = [c.id for c in reversed(live) if c.id not in tagged and c.step not in (None, 0)]
        for cid in spare[: max(0, len(live) - plan["n"])]:
            bank.delete(cid, why="bench prune")
        t1 = time.perf_counter()
        bank.gc(grace=0)
        gc_s = time.perf_counter() - t1
        live = bank.log()
        latest = {r: bank.resolve(f"{r}@latest") for r in plan["saves"]}
        history = len(bank.tag_history("prod"))
    saved = sum(r["saved"] for r in results)
    return {
        "recipe": RECIPE,
        "n": plan["n"],
        "runs": plan["runs"],
        "tag_every": plan["workers"][0]["tag_every"],
        "live": len(live),
        "saved": saved,
        "deleted": sum(r["deleted"] for r in results),
        "tag_moves": sum(r["tag_moves"] for r in results),
        "prod_history": history,
        "workers": len(results),
        "seconds": seconds,
        "gc_s": gc_s,
        "saves_per_s": saved / seconds if seconds else 0.0,
        "worker_marks": [r["marks"] for r in results],
        "next_step": plan["saves"][RUN],
        "latest": latest,
    }


def _wanted(n: int, args: argparse.Namespace) -> dict[str, Any]:
    """What a built bank's ``built.json`` must say for the bank to be reused."""
    return {"recipe": RECIPE, "n": n, "runs": args.runs, "tag_every": args.tag_every, "layout": args.layout}


def _reusable(
    n: int, path: Path, marker: Path, want: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any] | None:
    """The built bank's record if it matches ``want`` and holds ``n`` checkpoints (None: build again)."""
    if not marker.exists() or not path.is_dir() or args.rebuild:
        return None
    built: dict[str, Any] = json.loads(marker.read_text())
    if not all(built.get(k) == v for k, v in want.items()) or built.get("live") != n:
        return None
    built["reused"] = True
    return built


def local_bank(n: int, args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """The built bank of ``n`` checkpoints on disk: reused if its marker matches, else built now."""
    home = WORK / f"n{n}"
    path, marker = home / "bank", home / "built.json"
    found = _reusable(n, path, marker, _wanted(n, args), args)
    if found is not None:
        print(f"[n={n:,}] reusing the bank built by {found['commit'][:12]} ({path})", flush=True)
        return path, found
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    workers = max(1, min(args.runs, args.workers))
    print(f"[n={n:,}] building with {workers} worker process(es) …", flush=True)
    built = build_bank(str(path), None, make_plan(n, args.runs, workers, args.tag_every))
    built.update(layout=args.layout, commit=args.commit)
    print(
        f"[n={n:,}] built: {built['saved']:,} saves in {built['seconds']:.1f} s "
        f"({built['saves_per_s']:.1f}/s), {built['live']:,} live, prod history {built['prod_history']}",
        flush=True,
    )
    marker.write_text(json.dumps(built, indent=1))
    built["reused"] = False
    return path, built


def synth_bank(n: int, args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    """A bank of ``n`` checkpoints made from the built ``--synth-base`` bank without saving each one.

    Building a 100,000-checkpoint bank save by save takes hours here (#12 allows generating it
    "directly through the library"): the base bank is cloned (hard links), each run gets
    ``n - base`` more checkpoints whose manifests are the run's newest one with a new step,
    parent, time and ``val_loss`` (so they share its chunks: tiny states), written straight into
    ``manifests/``; then ``repair_index()`` builds the catalog index from every manifest (the
    path an upgrade takes), the tags move to run0's newest, 1% of the new checkpoints are deleted
    through the library, and the bank is compacted and collected.
    """
    home = WORK / f"n{n}"
    path, marker = home / "bank", home / "built.json"
    want = {**_wanted(n, args), "synth_base": args.synth_base}
    found = _reusable(n, path, marker, want, args)
    if found is not None:
        print(f"[n={n:,}] reusing the synthesized bank ({path})", flush=True)
        return path, found
    base_path, base = local_bank(args.synth_base, args)
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    shutil.copytree(base_path, path, copy_function=os.link)
    print(f"[n={n:,}] synthesizing from the {args.synth_base:,}-checkpoint bank …", flush=True)
    t0 = time.perf_counter()
    runs = sorted(base["latest"])
    extra = n - int(base["live"])
    made: dict[str, list[str]] = {r: [] for r in runs}
    synth_id = uuid.uuid4().hex  # names the segments the synthesized manifests share, if any
    with wb.open(path, create=False, cache=False) as bank:
        now = time.time()
        for r, k in zip(runs, split(int(extra * 1.0102) + 1, len(runs)), strict=True):
            tmpl = bank._catalog.get(base["latest"][r])
            step, prev = (tmpl.step or 0) + 1, base["latest"][r]
            for j in range(k):
                loss = 0.5 + 0.4 * math.sin(0.37 * step + len(r))
                m = dataclasses.replace(
                    tmpl,
                    step=step,
                    parent=prev,
                    created=now + j * 1e-3,
                    metrics=encode({"val_loss": loss}, "metrics"),
                )
                if m.format >= COMPACT_FORMAT:  # what a save writes: content + location head, zstd
                    draft = stored.encode(m)
                    keys = {h: segment_key(synth_id, h) for h in draft.segments}
                    for h, text in draft.segments.items():
                        seg = path / keys[h]
                        if not seg.exists():
                            seg.parent.mkdir(parents=True, exist_ok=True)
                            seg.write_bytes(stored.seal_segment(text))
                    data, cid = draft.object(keys), draft.cid
                else:
                    data = m.to_bytes()
                    cid = digest(data)
                target = path / manifest_key(cid)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)  # no fsync: a benchmark fixture, not a save
                made[r].append(cid)
                step, prev = step + 1, cid
        wrote_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        bank.repair_index()
        index_s = time.perf_counter() - t1
        newest = made[RUN][-1]
        for name in TAGS:
            bank.tag(name, newest, why="synthesized")
        doomed = [cid for r in runs for cid in made[r][:-1:100]]
        live_now = int(base["live"]) + sum(len(v) for v in made.values())
        for cid in doomed[: max(0, live_now - n)]:
            bank.delete(cid, why="bench prune")
        bank.compact()
        bank.gc(grace=0)
        live = len(bank.log())
        latest = {r: bank.resolve(f"{r}@latest") for r in runs}
        history = len(bank.tag_history("prod"))
    built = {
        **base,
        **want,
        "live": live,
        "saved": int(base["saved"]),
        "synthesized": sum(len(v) for v in made.values()),
        "seconds": time.perf_counter() - t0,
        "synth_write_s": wrote_s,
        "synth_index_s": index_s,
        "saves_per_s": 0.0,
        "next_step": int(bank_step(latest[RUN], path)) + 1,
        # The newest checkpoints are copies of the base's newest content: "the run's next state"
        # is the one after that content (the step it is saved at is next_step).
        "state_step": int(base.get("state_step", base["next_step"])),
        "latest": latest,
        "prod_history": history,
        "commit": args.commit,
    }
    print(
        f"[n={n:,}] synthesized {built['synthesized']:,} manifests in {wrote_s:.1f} s, index rebuilt in"
        f" {index_s:.1f} s, {live:,} live",
        flush=True,
    )
    marker.write_text(json.dumps(built, indent=1))
    built["reused"] = False
    return path, built


def bank_step(cid: str, path: Path) -> int:
    with wb.open(path, create=False, cache=False) as bank:
        return int(bank.info(cid).step or 0)


def layout_version() -> int:
    """The bank layout version this weightbank writes (its format marker's ``version``)."""
    with tempfile.TemporaryDirectory(prefix="wb-scale-") as tmp:
        wb.open(Path(tmp) / "bank").close()
        return int(json.loads((Path(tmp) / "bank" / "weightbank.json").read_text())["version"])


def code_source() -> str:
    """Where the weightbank measured was imported from: this checkout's src/, or another tree."""
    src = Path(wb.__file__).resolve().parent
    return (
        "this checkout's src/"
        if src == REPO / "src" / "weightbank"
        else str(src.parent.relative_to(REPO) if src.is_relative_to(REPO) else src.parent)
    )


@contextmanager
def clone(path: Path) -> Iterator[Path]:
    """A hard-linked copy of the bank at ``path`` (its scratch and lock files left out), removed afterwards.

    Safe because a bank never rewrites a file in place: every write is a new file renamed into
    place, every delete an unlink, so the original's files are never changed through the clone.
    """
    dest = path.parent / f"clone-{uuid.uuid4().hex[:8]}"
    try:
        for root, dirs, files in os.walk(path):
            rel = Path(root).relative_to(path)
            if rel.parts[:1] == ("tmp",):
                dirs[:] = []
                continue
            (dest / rel).mkdir(parents=True, exist_ok=True)
            for f in files:
                if f != ".lock":
                    os.link(Path(root) / f, dest / rel / f)
        yield dest
    finally:
        shutil.rmtree(dest, ignore_errors=True)


# -- measuring -----------------------------------------------------------------------------------
@dataclass
class Sample:
    """What the processes of one call on one bank measured."""

    call_s: list[float] = field(default_factory=list)
    process_s: list[float] = field(default_factory=list)
    peak_kib: list[int] = field(default_factory=list)
    command_s: list[float] = field(default_factory=list)  #: the installed CLI, as a whole process
    counted: dict[str, Any] = field(default_factory=dict)  #: the CountingStorage process's result
    wire: dict[str, Any] = field(default_factory=dict)  #: the SeaweedFS counting process's result


def med(values: list[float] | list[int]) -> float | None:
    return statistics.median(values) if values else None


def op_spec(op: str, url: str, built: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {
        "op": op,
        "url": url,
        "run": RUN,
        "step": built["next_step"],
        "state_step": built.get("state_step", built["next_step"]),
        "parent": built["latest"][RUN],
        **extra,
    }


def call_seconds(op: str, result: dict[str, Any]) -> float:
    """The timed part: the call, plus the open for a load (the target is open + load)."""
    return float(result["call_s"]) + (float(result["open_s"]) if op == "load" else 0.0)


def measure_one(op: str, path: Path, built: dict[str, Any], sample: Sample, count: bool) -> None:
    """One fresh process making ``op`` on the bank at ``path`` (on a fresh clone for a mutating call)."""
    if op == "gc":
        with clone(path) as scratch:
            child("op", op_spec("delete1pct", str(scratch), built))  # the setup gc cleans up after
            result, wall = child("op", op_spec(op, str(scratch), built, count=count))
    elif op in MUTATING:
        with clone(path) as scratch:
            result, wall = child("op", op_spec(op, str(scratch), built, count=count))
    else:
        result, wall = child("op", op_spec(op, str(path), built, count=count))
    if count:
        sample.counted = result
        return
    sample.call_s.append(call_seconds(op, result))
    sample.process_s.append(wall)
    sample.peak_kib.append(int(result["peak_extra_kib"]))
    if op in CLI_ARGS:
        command = Path(sys.executable).with_name("weightbank")
        t0 = time.perf_counter()
        proc = subprocess.run(
            [str(command), *CLI_ARGS[op], "--bank", str(path)], capture_output=True, text=True, check=False
        )
        if proc.returncode != 0:
            raise SystemExit(f"weightbank {' '.join(CLI_ARGS[op])} failed:\n{proc.stderr}")
        sample.command_s.append(time.perf_counter() - t0)


def measure(banks: dict[int, tuple[Path, dict[str, Any]]], repeats: int) -> dict[str, dict[int, Sample]]:
    """Every call on every bank: ``repeats`` timed processes each (sizes interleaved), then one counted."""
    samples = {op: {n: Sample() for n in banks} for op, _ in OPS}
    for rep in range(repeats):
        for n, (path, built) in banks.items():
            print(f"[measure] repeat {rep + 1}/{repeats}, n={n:,} …", flush=True)
            for op, _ in OPS:
                measure_one(op, path, built, samples[op][n], count=False)
    for n, (path, built) in banks.items():
        print(f"[measure] counting requests, n={n:,} …", flush=True)
        for op, _ in OPS:
            measure_one(op, path, built, samples[op][n], count=True)
    return samples


def measure_seaweed(sizes: list[int], args: argparse.Namespace) -> dict[str, dict[int, Sample]]:
    """Request counts (storage calls and HTTP requests) on a real SeaweedFS server, for sizes ≤ 1,000."""
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    from tests.s3server import SeaweedServer, s3_environment

    os.environ.update(s3_environment())
    samples: dict[str, dict[int, Sample]] = {op: {} for op, _ in OPS}
    with SeaweedServer() as srv:
        srv.create_bucket("wbscale")
        options = srv.storage_options()
        for n in sizes:
            url = f"s3://wbscale/n{n}-{uuid.uuid4().hex[:8]}"
            workers = max(1, min(args.runs, args.workers))
            print(f"[seaweed] building n={n:,} on {url} …", flush=True)
            built = build_bank(url, options, make_plan(n, args.runs, workers, args.tag_every))
            print(
                f"[seaweed] built n={n:,} in {built['seconds']:.1f} s ({built['saves_per_s']:.1f}/s)",
                flush=True,
            )
            # In order, on the bank itself (a throwaway): the save, then the delete and gc, come last.
            for op, _ in OPS:
                result, _wall = child("op", op_spec(op, url, built, count=True, wire=True, options=options))
                samples[op][n] = Sample(wire=result)
    return samples


# -- repack --------------------------------------------------------------------------------------
def state_digest(state: dict[str, torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(state):
        t = state[name].contiguous()
        h.update(name.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class _WrittenBytes:
    """A storage wrapper that adds up the bytes of every write (objects, streamed packs, refs)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.written = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def write(self, key: str, data: bytes | memoryview) -> None:
        self.written += len(data)
        self.inner.write(key, data)

    def put_ref(self, key: str, data: bytes, expect: str | None) -> str:
        self.written += len(data)
        return str(self.inner.put_ref(key, data, expect))

    def open_writer(self, key: str) -> Any:
        writer, outer = self.inner.open_writer(key), self

        class _W:
            def write(self, data: bytes | memoryview) -> None:
                outer.written += len(data)
                writer.write(data)

            def commit(self) -> None:
                writer.commit()

            def abort(self) -> None:
                writer.abort()

        return _W()


def bench_resave(
    tensors: int = 100, chunks_each: int = 100, chunk_size: int = 256
) -> tuple[list[str], list[str]]:
    """An unchanged re-save of a state with 10,000 chunks: every byte the save writes (≤ 64 KiB)."""
    from weightbank.storage.local import LocalStorage

    path = WORK / "resave" / "bank"
    shutil.rmtree(path.parent, ignore_errors=True)
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(5)
    numel = chunks_each * chunk_size // 4
    state = {f"layers.{i}.weight": torch.randn(numel, generator=gen) for i in range(tensors)}
    lines = [
        "| codec | chunks | first save wrote | unchanged re-save wrote | target | result |",
        "|---|---|---|---|---|---|",
    ]
    misses = []
    for codec in ("raw", "auto"):
        counted = _WrittenBytes(LocalStorage(str(path / codec)))
        wb.bank.marker.init_storage(counted, create=True)  # type: ignore[arg-type]
        bank = wb.Bank(counted)  # type: ignore[arg-type]
        first = bank.save(state, run="r", step=0, codec=codec, chunk_size=chunk_size)
        wrote_first, counted.written = counted.written, 0
        bank.save(state, run="r", step=1, codec=codec, chunk_size=chunk_size)
        again = counted.written
        n = len(bank.checkpoint(first.id).manifest.chunks)
        ok = again <= 64 << 10
        lines.append(
            f"| {codec} | {n:,} | {wrote_first / MiB:.2f} MiB | {again / 1024:.1f} KiB | ≤ 64 KiB | {pf(ok)} |"
        )
        if not ok:
            misses.append(f"unchanged re-save ({codec}): {again / 1024:.1f} KiB")
    return lines, misses


def bench_repack(pairs: int = 24, numel: int = 16384) -> tuple[list[str], list[str]]:
    """Half of every pack dead, then ``repack``: stored bytes vs live bytes, ids, bit-exact loads."""
    if not hasattr(wb.Bank, "repack"):
        return ["skipped: `Bank.repack` does not exist yet."], []
    path = WORK / "repack" / "bank"
    shutil.rmtree(path.parent, ignore_errors=True)
    lines: list[str] = []
    misses: list[str] = []
    with wb.open(path) as bank:
        gen = torch.Generator().manual_seed(12)
        doomed = []
        for i in range(pairs):
            a, b = torch.randn(numel, generator=gen), torch.randn(numel, generator=gen)
            # One pack holding a_i and b_i; keep_i reuses a_i (writes no pack); deleting src_i kills b_i.
            doomed.append(bank.save({"a": a, "b": b}, run="src", step=i, codec="raw").id)
            bank.save({"a": a}, run="keep", step=i, codec="raw")
        for cid in doomed:
            bank.delete(cid, why="bench: half of every pack dead")
        bank.gc(grace=0)
        live = {c.id: c for c in bank.log()}
        live_bytes = sum(
            {t.content_key: t.stored_bytes for cid in live for t in bank.show(cid).tensors}.values()
        )
        digests = {cid: state_digest(bank.load(cid)) for cid in live}
        before = tree_bytes(path / "packs")
        t0 = time.perf_counter()
        bank.repack()
        repack_s = time.perf_counter() - t0
        bank.gc(grace=0)
        after_bytes = tree_bytes(path / "packs")
    with wb.open(path, create=False) as bank:
        ids_after = {c.id for c in bank.log()}
        exact = all(state_digest(bank.load(cid)) == d for cid, d in digests.items())
    ratio = after_bytes / live_bytes if live_bytes else float("nan")
    ok_bytes, ok_ids = ratio <= 1.05, ids_after == set(live)
    lines += [
        "| measurement | value | target | result |",
        "|---|---|---|---|",
        f"| live checkpoints | {len(live)} (each pack half dead: {pairs} packs) |  |  |",
        f"| pack bytes before repack | {before / MiB:.2f} MiB |  |  |",
        f"| live bytes | {live_bytes / MiB:.2f} MiB |  |  |",
        f"| pack bytes after repack + gc | {after_bytes / MiB:.2f} MiB ({ratio:.3f}× live) | ≤ 1.05× | {pf(ok_bytes)} |",
        f"| repack time | {repack_s:.2f} s |  |  |",
        f"| every id unchanged | {ok_ids} | True | {pf(ok_ids)} |",
        f"| every checkpoint loads bit-exact | {exact} | True | {pf(exact)} |",
    ]
    misses += [
        m
        for m, ok in (
            ("repack: stored bytes", ok_bytes),
            ("repack: ids", ok_ids),
            ("repack: bit-exact", exact),
        )
        if not ok
    ]
    return lines, misses


# -- reporting -----------------------------------------------------------------------------------
def pf(ok: bool | None) -> str:
    return "" if ok is None else ("PASS" if ok else "**FAIL**")


def fmt_s(v: float | None) -> str:
    return "" if v is None else (f"{v * 1e3:.1f} ms" if v < 1 else f"{v:.2f} s")


def fmt_mib(kib: float | None) -> str:
    return "" if kib is None else f"{kib / 1024:.1f} MiB"


def ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None or b <= 0 else a / b


def fmt_ratio(r: float | None) -> str:
    return "" if r is None else f"{r:.2f}×"


def counts_text(result: dict[str, Any], op: str) -> str:
    """``total (method n, …)``: the call's requests; a load's include its open (the format marker)."""
    counts = dict(result.get("counts", {}))
    if op == "load":
        for k, v in result.get("open_counts", {}).items():
            counts[k] = counts.get(k, 0) + v
    total = sum(counts.values())
    inner = ", ".join(f"{k} {v:,}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1]))
    return f"{total:,} ({inner})" if inner else str(total)


def requests_of(result: dict[str, Any], op: str) -> int | None:
    if "counts" not in result:
        return None
    extra = sum(result.get("open_counts", {}).values()) if op == "load" else 0
    return int(sum(result["counts"].values())) + extra


def op_table(op: str, title: str, sizes: list[int], per_n: dict[int, Sample]) -> tuple[list[str], list[str]]:
    """One call's markdown table: a row per measurement, a column per size, then the ratio and the target."""
    lo, hi = sizes[0], sizes[-1]
    span = f"{hi:,}/{lo:,}"
    head = ["measurement", *(f"{n:,}" for n in sizes), span, "target", "result"]
    rows: list[list[str]] = []
    misses: list[str] = []

    def add(label: str, shown: list[str], r: float | None, target: str, ok: bool | None) -> None:
        rows.append([label, *shown, fmt_ratio(r), target, pf(ok)])
        if ok is False:
            misses.append(f"{title}: {label} — {target}")

    calls = [med(per_n[n].call_s) for n in sizes]
    r = ratio(calls[-1], calls[0])
    target, ok = "", None
    if op in FLAT_OPS and r is not None and calls[-1] is not None:
        target = f"≤ {FLAT_RATIO}×" + (f", < {FAST_S} s" if op in FAST_OPS else "")
        ok = r <= FLAT_RATIO and (op not in FAST_OPS or calls[-1] < FAST_S)
    if op == "gc":
        target, ok = gc_linear(sizes, calls, floor=0.001)
    add("call wall time (median)", [fmt_s(v) for v in calls], r, target, ok)
    procs = [med(per_n[n].process_s) for n in sizes]
    add("process wall time (median)", [fmt_s(v) for v in procs], ratio(procs[-1], procs[0]), "", None)
    if op in CLI_ARGS:
        cmd = [med(per_n[n].command_s) for n in sizes]
        add(
            "installed `weightbank` command, process",
            [fmt_s(v) for v in cmd],
            ratio(cmd[-1], cmd[0]),
            "",
            None,
        )
    peaks = [med(per_n[n].peak_kib) for n in sizes]
    target, ok = "", None
    if op == "resolve" and peaks[-1] is not None:
        target, ok = f"≤ {RESOLVE_PEAK_MIB} MiB (at 100,000)", peaks[-1] / 1024 <= RESOLVE_PEAK_MIB
    if op == "gc":
        target, ok = gc_linear(sizes, peaks, floor=1024)
    add(
        "peak RSS above `import weightbank`",
        [fmt_mib(v) for v in peaks],
        ratio(peaks[-1], peaks[0]),
        target,
        ok,
    )
    reqs = [requests_of(per_n[n].counted, op) for n in sizes]
    target, ok = "", None
    if op == "load" and None not in reqs:
        target, ok = "the same at every size", len(set(reqs)) == 1
    add(
        "storage requests",
        [counts_text(per_n[n].counted, op) for n in sizes],
        ratio(reqs[-1], reqs[0]),
        target,
        ok,
    )
    if op == "save":
        commits = [per_n[n].counted.get("counts", {}).get("commit", 0) for n in sizes]
        packs = [per_n[n].counted.get("packs_written") for n in sizes]
        rest = [None if q is None else q - c for q, c in zip(reqs, commits, strict=True)]
        add("packs written", [str(p) for p in packs], None, "", None)
        ok = None if None in rest else len(set(rest)) == 1
        add(
            "requests − pack commits",
            [str(x) for x in rest],
            ratio(rest[-1], rest[0]),
            "the same at every size",
            ok,
        )
    text = [
        f"**{title}**",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "---|" * len(head),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]
    return text, misses


def gc_linear(sizes: list[int], values: list[float | None], floor: float) -> tuple[str, bool | None]:
    """At most linear growth: every size step's ratio ≤ 1.25 × the size ratio (values below ``floor`` count as it)."""
    if None in values or len(sizes) < 2:
        return "", None
    steps = list(zip(sizes, [max(float(v or 0), floor) for v in values], strict=True))
    ok = all(b <= FLAT_RATIO * (n2 / n1) * a for (n1, a), (n2, b) in itertools.pairwise(steps))
    return "≤ linear (each size step ≤ 1.25 × its size ratio)", ok


def build_table(banks: dict[int, tuple[Path, dict[str, Any]]]) -> list[str]:
    out = [
        "| checkpoints | saves | workers | build time | saves/s | first 100 saves/s (worker 0) | last 100 saves/s (worker 0) | prod history | built at |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for n, (_, b) in banks.items():
        marks = b["worker_marks"][0]
        first = last = ""
        if len(marks) >= 3:
            (s0, t0), (s1, t1) = marks[0], marks[1]
            first = f"{(s1 - s0) / (t1 - t0):.1f}" if t1 > t0 else ""
            (s2, t2), (s3, t3) = marks[-3], marks[-2]
            last = f"{(s3 - s2) / (t3 - t2):.1f}" if t3 > t2 else ""
        reused = " (reused)" if b.get("reused") else ""
        out.append(
            f"| {n:,} | {b['saved']:,} | {b['workers']} | {b['seconds']:.1f} s{reused} | {b['saves_per_s']:.1f} "
            f"| {first} | {last} | {b['prod_history']} | `{b['commit'][:12]}` |"
        )
    return out


def seaweed_table(sizes: list[int], samples: dict[str, dict[int, Sample]]) -> tuple[list[str], list[str]]:
    head = ["call", *(f"{n:,}" for n in sizes), "target", "result"]
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    misses = []
    for op, title in OPS:
        cells, totals = [], []
        for n in sizes:
            res = samples[op][n].wire
            http = res.get("http_requests")
            if http is not None and op == "load":  # a load's count includes its open, as above
                http += res.get("open_http_requests", 0)
            totals.append(http)
            cells.append(f"{requests_of(res, op)} calls, {'?' if http is None else http} HTTP")
        target, ok = "", None
        if op == "load":
            target, ok = "HTTP requests the same at every size", len(set(totals)) == 1
            if not ok:
                misses.append(f"SeaweedFS: {title} — {target}")
        out.append(f"| {title} | " + " | ".join(cells) + f" | {target} | {pf(ok)} |")
    return out, misses


def record(path: Path, label: str, body: list[str]) -> None:
    """Put ``body`` under ``### LABEL`` inside the Scale (#12) section, replacing only that subsection."""
    slug = "".join(c if c.isalnum() else "-" for c in label.lower()).strip("-")[:40]
    sub_begin, sub_end = f"<!-- scale:{slug}:begin -->", f"<!-- scale:{slug}:end -->"
    sub = "\n".join([sub_begin, *body, sub_end])
    text = path.read_text() if path.exists() else "# weightbank benchmark results\n"
    if BEGIN not in text or END not in text:
        text = text.rstrip("\n") + f"\n\n{BEGIN}\n## Scale (#12)\n\n{END}\n"
    before, rest = text.split(BEGIN, 1)
    section, after = rest.split(END, 1)
    if sub_begin in section and sub_end in section:
        head, tail = section.split(sub_begin, 1)
        section = head + sub + tail.split(sub_end, 1)[1]
    else:
        section = section.rstrip("\n") + "\n\n" + sub + "\n"
    path.write_text(before + BEGIN + section.rstrip("\n") + "\n" + END + after)


# -- main ----------------------------------------------------------------------------------------
def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--sizes", default="10,100,1000", help="bank sizes, comma-separated (default 10,100,1000)")
    p.add_argument(
        "--repeats", type=int, default=3, help="timed fresh processes per call and size (default 3)"
    )
    p.add_argument("--runs", type=int, default=4, help="runs per bank (default 4)")
    p.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="build processes (default: cores)"
    )
    p.add_argument(
        "--tag-every", type=int, default=200, help="a worker moves its tags every N saves (default 200)"
    )
    p.add_argument("--rebuild", action="store_true", help="build the banks again even if built ones match")
    p.add_argument(
        "--build-max",
        type=int,
        default=20_000,
        help="sizes above this are synthesized from the --synth-base bank (default 20,000)",
    )
    p.add_argument(
        "--synth-base", type=int, default=10_000, help="the built bank a synthesized one grows from"
    )
    p.add_argument("--seaweed", action="store_true", help="also count requests on SeaweedFS (sizes ≤ 1,000)")
    p.add_argument("--no-repack", action="store_true", help="skip the repack section")
    p.add_argument(
        "--calls",
        default=None,
        help="measure only these calls, comma-separated (of: " + ", ".join(op for op, _ in OPS) + ")",
    )
    p.add_argument("--label", default=None, help="record in RESULTS.md as a subsection with this title")
    p.add_argument(
        "--note", default=None, help="a paragraph recorded with the results (how the code was set up)"
    )
    p.add_argument(
        "--commit",
        default=None,
        help="the commit of the weightbank measured, when it is not this checkout's "
        "(e.g. a `git archive` of an older commit put first on PYTHONPATH); default: this checkout's",
    )
    p.add_argument(
        "--results", type=Path, default=RESULTS, help="markdown file --label writes (default RESULTS.md)"
    )
    args = p.parse_args(argv)
    args.sizes = sorted({int(s.replace("_", "")) for s in args.sizes.split(",") if s.strip()})
    args.commit = args.commit or git_commit()
    args.layout = layout_version()
    return args


def main(argv: list[str]) -> int:
    global OPS
    args = parse_args(argv)
    if args.calls:
        wanted = {c.strip() for c in args.calls.split(",") if c.strip()}
        unknown = wanted - {op for op, _ in OPS}
        if unknown:
            raise SystemExit(f"unknown call(s): {', '.join(sorted(unknown))}")
        OPS = tuple((op, title) for op, title in OPS if op in wanted)
    started, load_before = time.time(), os.getloadavg()
    print(
        f"weightbank {wb.__version__} from {code_source()} (commit {args.commit[:12]}), bank layout {args.layout}"
    )
    banks = {n: (synth_bank(n, args) if n > args.build_max else local_bank(n, args)) for n in args.sizes}
    samples = measure(banks, args.repeats)
    out: list[str] = []
    misses: list[str] = []
    for op, title in OPS:
        text, miss = op_table(op, title, args.sizes, samples[op])
        out += [*text, ""]
        misses += miss
    sea: list[str] = []
    if args.seaweed:
        small = [n for n in args.sizes if n <= 1000]
        sea_samples = measure_seaweed(small, args)
        sea, miss = seaweed_table(small, sea_samples)
        misses += miss
    repack, miss = ([], []) if args.no_repack else bench_repack()
    misses += miss
    resave, miss = bench_resave()
    misses += miss
    load_after = os.getloadavg()
    for line in out:
        print(line)
    if sea:
        print("\nSeaweedFS requests (one counting process per call):\n")
        print("\n".join(sea))
    if repack:
        print("\nrepack:\n")
        print("\n".join(repack))
    print("\nunchanged re-save of 10,000 chunks:\n")
    print("\n".join(resave))
    print("\nbuilds:\n")
    print("\n".join(build_table(banks)))
    print()
    if misses:
        print(f"MISSED {len(misses)} target(s):")
        for m in misses:
            print(f"  - {m}")
    else:
        print("All targets met.")
    if args.label:
        commit = args.commit
        source = code_source()
        env = "" if source == "this checkout's src/" else f"PYTHONPATH={source} "
        info = {
            **machine_info(),
            "weightbank imported from": source,
            "bank layout version": str(args.layout),
        }
        when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        cmd = env + " ".join([".venv/bin/python benchmarks/bench_scale.py", *(shlex.quote(a) for a in argv)])
        body = [
            f"### {args.label} (commit `{commit[:12]}`)",
            "",
            f"Generated by `{cmd}` on {when} in {time.time() - started:.0f} s.",
            "",
            *([args.note, ""] if args.note else []),
            *(f"- {k}: {v}" for k, v in info.items()),
            f"- load average (1/5/15 min) before: {', '.join(f'{x:.2f}' for x in load_before)}; "
            f"after: {', '.join(f'{x:.2f}' for x in load_after)}",
            f"- banks: {args.runs} runs, 50 float32 tensors × 16 values per checkpoint (1-3 changed per save), "
            f"tags {', '.join(TAGS)} moved every {args.tag_every} saves of a build worker, 1% deleted while "
            "building, then gc; calls in fresh processes, median of "
            f"{args.repeats}; requests from one more process through `CountingStorage`",
            "",
            "Build:",
            "",
            *build_table(banks),
            "",
            *out,
        ]
        if sea:
            body += [
                "**SeaweedFS: storage calls and HTTP requests (one counting process per call)**",
                "",
                *sea,
                "",
            ]
        if repack:
            body += ["**repack (half of every pack dead)**", "", *repack, ""]
        body += ["**unchanged re-save of a state with 10,000 chunks: bytes written**", "", *resave, ""]
        body += (
            [f"Missed ({len(misses)}):", "", *(f"- {m}" for m in misses)] if misses else ["All targets met."]
        )
        record(args.results, args.label, body)
        print(f"\nrecorded under '{args.label}' in {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
