"""The child-process side of the crash, concurrency and gc-safety tests.

Run as ``python _child.py MODE ARGS...`` (see :func:`tests.bank.faults.spawn_child`).
A child reports what it committed on stdout, one flushed line per event, so a
parent that SIGKILLs it knows what must have survived:

``sweep SCENARIO JOBS.json``
    For each ``[bank_dir, kill_at, torn, publish_torn]`` job, fork a worker that
    runs SCENARIO on that bank through a FaultStorage that SIGKILLs the worker at
    storage operation ``kill_at``; print ``result <json>`` with each worker's fate.
    One interpreter (torch imported once) serves every kill point.
``loop BANK SEED``
    Save, tag, roll back, prune and gc in a loop until killed.
``saver BANK RUN STEPS``
    After ``go`` on stdin, save each step (comma-separated) of RUN.
``tagger BANK TAG COUNT EXPECT TARGETS...``
    After ``go`` on stdin, fork one worker process per TARGETS argument (ids,
    comma-separated), all at once; each moves TAG COUNT times over its ids.
    EXPECT is ``-`` for unconditional moves, else the id to expect.
``slow-save BANK RUN STEP DELAY STALL WAIT [GATE]``
    Save with every pack write DELAY seconds slow; print ``writing`` when the
    first pack opens (the save has chosen which chunks to reuse by then). With
    STALL=1, print ``durable`` just before the manifest write and hang there;
    with WAIT=1, start only after ``go`` on stdin. With a GATE path, every pack
    write waits until that file exists: the parent decides when the save may
    go on, so "it was in flight while X happened" never depends on speed.
"""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import weightbank as wb
from tests.bank.faults import CHUNK, SCENARIOS, FaultStorage, make_state
from weightbank.bank.environment import capture_env
from weightbank.storage import LocalStorage


def say(*parts: object) -> None:
    """One line to stdout in one write: atomic on a pipe, so forked workers never interleave."""
    os.write(1, (" ".join(str(p) for p in parts) + "\n").encode())


def wait_go() -> None:
    say("ready")
    line = sys.stdin.readline()
    if line.strip() != "go":
        sys.exit(f"expected 'go' on stdin, got {line!r}")


def sweep(scenario: str, jobs_file: str) -> None:
    jobs = json.loads(Path(jobs_file).read_text())
    run = SCENARIOS[scenario]
    capture_env()  # warm the git lookup cache once, before forking
    results: list[dict[str, Any]] = []
    for bank_dir, kill_at, torn, publish_torn in jobs:
        pid = os.fork()
        if pid == 0:  # the worker: run until the fault wrapper kills it
            code = 0
            try:
                storage = FaultStorage(
                    LocalStorage(bank_dir), kill_at=kill_at, torn=torn, publish_torn=publish_torn
                )
                run(wb.Bank(storage, workers=2))
            except BaseException as e:  # report, do not hide: the parent fails on it
                sys.stderr.write(f"worker kill_at={kill_at}: {type(e).__name__}: {e}\n")
                code = 3
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.WIFSIGNALED(status):
            results.append({"dir": bank_dir, "pid": pid, "signal": os.WTERMSIG(status)})
        else:
            results.append({"dir": bank_dir, "pid": pid, "exit": os.WEXITSTATUS(status)})
    say("result", json.dumps(results))


def loop(bank_dir: str, seed: int) -> None:
    """Save/tag/rollback/prune/gc forever, announcing each result (and each deletion before it happens)."""
    rng = random.Random(seed)
    bank = wb.open(bank_dir, create=False)
    say("ready")
    while True:
        step = max((c.step or 0 for c in bank.log()), default=-1) + 1
        info = bank.save(make_state("loop", step), run="loop", step=step, tags=["latest"], chunk_size=CHUNK)
        say("saved", info.id)
        if rng.random() < 0.5:
            say("tagged", repr(bank.tag("prod", info.id, why="promote").at))
        if rng.random() < 0.3:
            # Roll back only onto a checkpoint that still exists: rollback does not check.
            try:
                previous = bank.resolve("prod@{1}")
            except (wb.CheckpointNotFound, wb.NoHistory):
                previous = ""
            if previous in {c.id for c in bank.log()}:
                say("tagged", repr(bank.rollback("prod").at))
        if rng.random() < 0.3:
            doomed = bank.prune(run="loop", keep_last=3, dry_run=True).deleted
            say("deleting", *doomed)
            bank.prune(run="loop", keep_last=3)
            say("pruned")
        if rng.random() < 0.4:
            say("gc", len(bank.gc(grace=0).packs_deleted))


def saver(bank_dir: str, run: str, steps: str) -> None:
    bank = wb.open(bank_dir, create=False)
    wait_go()
    for step in (int(s) for s in steps.split(",")):
        info = bank.save(make_state(run, step), run=run, step=step, chunk_size=CHUNK)
        say("saved", info.id, run, step)


def tagger(bank_dir: str, tag: str, count: str, expect: str, *targets: str) -> None:
    """Fork one worker per TARGETS argument, all at once after ``go``; each moves TAG COUNT times."""

    def work(ids: list[str]) -> None:
        bank = wb.open(bank_dir, create=False)
        for i in range(int(count)):
            kwargs = {} if expect == "-" else {"expect": expect}
            try:
                ev = bank.tag(tag, ids[i % len(ids)], why=f"pid {os.getpid()} #{i}", **kwargs)
            except wb.ConcurrentUpdate:
                say("conflict")
            else:
                say("ok", json.dumps({"new": ev.new, "old": ev.old, "at": ev.at, "why": ev.why}))

    capture_env()
    wait_go()
    pids = []
    for ids in targets:
        pid = os.fork()
        if pid == 0:  # a worker process: its own bank, its own storage handles
            code = 0
            try:
                work(ids.split(","))
            except BaseException as e:
                sys.stderr.write(f"worker {os.getpid()}: {type(e).__name__}: {e}\n")
                code = 3
            os._exit(code)
        pids.append(pid)
    failed = [pid for pid in pids if os.waitpid(pid, 0)[1] != 0]
    if failed:
        sys.exit(f"tagger workers failed: {failed}")


def slow_save(
    bank_dir: str, run: str, step: str, delay: str, stall: str, wait: str = "0", gate: str = ""
) -> None:
    announced = False
    if wait == "1":
        wait_go()

    def on_op(n: int, name: str, key: str) -> None:
        nonlocal announced
        if name == "open_writer" and key.startswith("packs/") and not announced:
            announced = True
            say("writing")
        if gate and key.startswith("packs/") and name in ("write", "writer.write", "writer.commit"):
            deadline = time.monotonic() + 300  # the parent opens the gate; this only bounds a broken test
            while not os.path.exists(gate):
                if time.monotonic() > deadline:
                    sys.exit(f"gate {gate} never opened")
                time.sleep(0.01)
        if stall == "1" and name == "write" and key.startswith("manifests/"):
            say("durable")
            time.sleep(600)  # the parent SIGKILLs us here

    storage = FaultStorage(
        LocalStorage(bank_dir), write_delay=float(delay), delay_prefix="packs/", on_op=on_op
    )
    bank = wb.Bank(storage, workers=2)
    info = bank.save(make_state(run, int(step)), run=run, step=int(step), chunk_size=CHUNK)
    assert info.save_stats is not None
    say("saved", info.id, info.save_stats.reused_chunks, info.save_stats.new_chunks)


def main() -> None:
    signal.signal(signal.SIGPIPE, signal.SIG_DFL)
    mode, args = sys.argv[1], sys.argv[2:]
    modes: dict[str, Callable[..., None]] = {
        "sweep": sweep,
        "loop": loop,
        "saver": saver,
        "tagger": tagger,
        "slow-save": slow_save,
    }
    if mode == "loop":
        loop(args[0], int(args[1]))
    else:
        modes[mode](*args)


if __name__ == "__main__":
    main()
