"""Fault injection and invariant checks shared by the crash, concurrency and gc-safety tests.

* :class:`FaultStorage` wraps a real backend and, at a chosen storage operation,
  SIGKILLs its own process (optionally after a torn write), raises OSError after
  N writes, or slows writes down — the picture is torchsnapshot's fault tests.
* :func:`make_state` gives every ``(run, step)`` one deterministic state, so a
  parent can recompute what a killed child saved and compare bit for bit.
* :func:`check_bank` asserts everything a crash must never break: no partial
  checkpoint visible, every committed checkpoint loads bit-exact, verify is ok,
  tags point at committed checkpoints with a well-formed history, and gc
  afterwards leaves a clean bank.
* :func:`spawn_child` / :class:`Children` run ``_child.py`` (the child-process
  side of the tests) with ``sys.executable``; :data:`SCENARIOS` are the bank
  calls the kill sweeps cut short at every storage operation.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

import weightbank as wb
from weightbank.bank.layout import LEASES, MANIFESTS, PACKS, TAGS, manifest_id_from_key
from weightbank.storage.base import ObjectInfo, ObjectWriter, RefValue, Storage, StorageProperties

__all__ = [
    "CHILD",
    "CHUNK",
    "SCENARIOS",
    "WRITE_OPS",
    "Children",
    "FaultStorage",
    "assert_same_state",
    "build_base",
    "check_bank",
    "check_tag_history",
    "dead_pid",
    "die",
    "finish",
    "make_state",
    "read_line",
    "spawn_child",
    "tag_names",
]

#: Chunk size the tests save with: small, so a few hundred KiB of state is many chunks.
CHUNK = 64 * 1024

#: The child-process script (run with ``sys.executable``).
CHILD = Path(__file__).with_name("_child.py")

#: Storage operations that write bytes (what ``fail_after_writes`` counts).
WRITE_OPS = frozenset({"write", "writer.write", "writer.commit", "put_ref"})

_HEX_ID = re.compile(r"^[0-9a-f]{64}$")


# -- deterministic states ------------------------------------------------------------------------


def _randn(n: int, seed: int) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def make_state(run: str, step: int) -> dict[str, Any]:
    """The state every test saves as ``(run, step)``: ~0.5 MiB, 11 chunks of :data:`CHUNK`.

    ``shared`` is the same in every checkpoint of every run, ``run`` the same
    within a run, ``slow`` changes every third step and ``fresh`` every step,
    so consecutive saves reuse most chunks (across processes too) and still
    write a few new ones.
    """
    base = zlib.crc32(run.encode())
    return {
        "shared": _randn(50_000, 1),
        "run": _randn(20_000, base),
        "slow": _randn(30_000, base * 7 + step // 3),
        "fresh": _randn(40_000, base * 13 + step + 1).to(torch.bfloat16),
        "counts": torch.arange(step + 1, dtype=torch.int64),
        "meta": {"run": run, "step": step},
    }


def _bits(t: torch.Tensor) -> bytes:
    return bytes(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def assert_same_state(got: Any, want: Any, where: str = "state") -> None:
    """Bit-exact equality of two state trees (tensors by dtype, shape and bytes)."""
    if isinstance(want, torch.Tensor):
        assert isinstance(got, torch.Tensor), f"{where}: expected a tensor, got {type(got).__name__}"
        assert got.dtype == want.dtype and got.shape == want.shape, f"{where}: dtype/shape differ"
        assert _bits(got) == _bits(want), f"{where}: bytes differ"
    elif isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), f"{where}: keys differ"
        for k in want:
            assert_same_state(got[k], want[k], f"{where}.{k}")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


# -- the fault-injecting backend -----------------------------------------------------------------


def die() -> None:
    """SIGKILL this process: no finally blocks, no atexit, no flushing — a real crash."""
    os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(60)  # pragma: no cover - the signal is delivered before this returns


class _FaultWriter:
    def __init__(self, outer: FaultStorage, key: str, inner: ObjectWriter) -> None:
        self._outer = outer
        self._key = key
        self._inner = inner

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        self._outer._before("writer.write", self._key, torn=lambda: self._inner.write(view[: len(view) // 2]))
        self._inner.write(data)

    def commit(self) -> None:
        self._outer._before("writer.commit", self._key)
        self._inner.commit()

    def abort(self) -> None:
        self._outer._before("writer.abort", self._key)
        self._inner.abort()


class FaultStorage:
    """A :class:`~weightbank.storage.base.Storage` around a real backend that misbehaves on cue.

    Every call (and every ``ObjectWriter`` call) is one numbered operation,
    recorded in :attr:`ops` as ``(name, key)``.

    * ``kill_at=N``: SIGKILL this process just before operation N runs. With
      ``torn=True`` a data write at N first writes half its bytes the way a
      crash would leave them (into an uncommitted writer, so an atomic backend
      keeps them invisible); with ``publish_torn=True`` the half object is made
      visible under its key instead — a backend that breaks the atomicity
      contract, or a disk that lost the tail of a file.
    * ``fail_after_writes=N``: the first N byte-writing operations
      (:data:`WRITE_OPS`) succeed, every later one raises ``OSError(EIO)``.
    * ``write_delay``: sleep that long before each write operation on a key
      starting with ``delay_prefix`` (a slow disk or upload).
    * ``on_op(n, name, key)``: called before operation n (for handshakes with a parent).
    """

    def __init__(
        self,
        inner: Storage,
        *,
        kill_at: int | None = None,
        torn: bool = False,
        publish_torn: bool = False,
        fail_after_writes: int | None = None,
        write_delay: float = 0.0,
        delay_prefix: str = "",
        on_op: Callable[[int, str, str], None] | None = None,
    ) -> None:
        self.inner = inner
        self.url = inner.url
        # The inner backend's, except that loads never mmap around the wrapper (see local_path).
        self.properties: StorageProperties = dataclasses.replace(inner.properties, local_files=False)
        self.kill_at = kill_at
        self.torn = torn
        self.publish_torn = publish_torn
        self.fail_after_writes = fail_after_writes
        self.write_delay = write_delay
        self.delay_prefix = delay_prefix
        self.on_op = on_op
        self.ops: list[tuple[str, str]] = []
        self.writes = 0
        self.failed = 0
        self._lock = threading.Lock()

    def _before(self, name: str, key: str, torn: Callable[[], None] | None = None) -> None:
        fail = False
        with self._lock:
            self.ops.append((name, key))
            n = len(self.ops)
            if name in WRITE_OPS and self.fail_after_writes is not None:
                if self.writes >= self.fail_after_writes:
                    fail = True
                    self.failed += 1
                else:
                    self.writes += 1
        if self.on_op is not None:
            self.on_op(n, name, key)
        if n == self.kill_at:
            if (self.torn or self.publish_torn) and torn is not None:
                torn()
            die()
        if fail:
            raise OSError(errno.EIO, f"injected fault: {name} of {key} after {self.fail_after_writes} writes")
        if self.write_delay and name in WRITE_OPS and key.startswith(self.delay_prefix):
            time.sleep(self.write_delay)

    def _torn_write(self, key: str, data: bytes | memoryview) -> None:
        half = memoryview(data).cast("B")[: len(memoryview(data).cast("B")) // 2]
        if self.publish_torn:
            self.inner.write(key, half)
        else:
            self.inner.open_writer(key).write(half)

    # -- the Storage protocol ------------------------------------------------------------------------
    def check_refs(self) -> None:
        self.inner.check_refs()  # no I/O worth a fault of its own: not a numbered operation

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        self._before("read", key)
        return self.inner.read(key, offset, length)

    def read_into(self, key: str, offset: int, buf: memoryview) -> int:
        self._before("read_into", key)
        return self.inner.read_into(key, offset, buf)

    def write(self, key: str, data: bytes | memoryview) -> None:
        self._before("write", key, torn=lambda: self._torn_write(key, data))
        self.inner.write(key, data)

    def open_writer(self, key: str) -> ObjectWriter:
        self._before("open_writer", key)
        return _FaultWriter(self, key, self.inner.open_writer(key))

    def exists(self, key: str) -> bool:
        self._before("exists", key)
        return self.inner.exists(key)

    def size(self, key: str) -> int:
        self._before("size", key)
        return self.inner.size(key)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        self._before("list", prefix)
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self._before("delete", key)
        self.inner.delete(key)

    def get_ref(self, key: str) -> RefValue | None:
        self._before("get_ref", key)
        return self.inner.get_ref(key)

    def put_ref(self, key: str, data: bytes, expect: str | None) -> str:
        self._before("put_ref", key)
        return self.inner.put_ref(key, data, expect)

    def list_refs(self, prefix: str) -> Iterator[str]:
        self._before("list_refs", prefix)
        return self.inner.list_refs(prefix)

    def local_path(self, key: str) -> str | None:
        # No mmap shortcut: every byte a load reads goes through the wrapper (and its faults).
        return None

    def sweep_incomplete(self, older_than: float) -> int:
        return self.inner.sweep_incomplete(older_than)

    def close(self) -> None:
        self.inner.close()


# -- invariants ----------------------------------------------------------------------------------


def check_tag_history(bank: wb.Bank, name: str) -> list[dict[str, Any]]:
    """Replay a tag's stored history and check it rebuilds the stored undo stack and target.

    Returns the raw history events.
    """
    ref = bank.storage.get_ref(f"{TAGS}{name}.json")
    assert ref is not None, f"tag {name} has no ref"
    rec = json.loads(ref.data)
    history = rec["history"]
    stack: list[str | None] = []
    assert history, f"tag {name} exists with an empty history"
    for i, ev in enumerate(history):
        assert ev["action"] in ("set", "untag", "rollback"), ev
        assert ev["old"] == (stack[-1] if stack else None), f"{name} event {i}: old does not chain"
        if ev["action"] == "set":
            assert isinstance(ev["new"], str) and _HEX_ID.match(ev["new"]), ev
            stack.append(ev["new"])
        elif ev["action"] == "untag":
            assert ev["new"] is None
            stack.append(None)
        else:
            steps = ev.get("steps", 1)
            assert 1 <= steps < len(stack), ev
            del stack[-steps:]
        assert ev["new"] == stack[-1], f"{name} event {i}: new is not the replayed target"
    assert stack == rec["stack"] and rec["target"] == stack[-1], f"tag {name}: history does not rebuild it"
    assert [e.new for e in bank.tag_history(name)] == [e["new"] for e in history]
    return list(history)


def _listed_manifests(bank: wb.Bank) -> set[str]:
    out = set()
    for info in bank.storage.list(MANIFESTS):
        cid = manifest_id_from_key(info.key)
        assert cid is not None, f"stray object {info.key} under {MANIFESTS}"
        out.add(cid)
    return out


def tag_names(bank: wb.Bank) -> list[str]:
    """Every tag ever created (live or removed)."""
    return sorted(k[len(TAGS) : -len(".json")] for k in bank.storage.list_refs(TAGS))


def check_bank(
    path: str | os.PathLike[str], *, must_have: set[str] | frozenset[str] = frozenset(), gc: bool = True
) -> dict[str, wb.CheckpointInfo]:
    """Assert every crash invariant of the bank at ``path`` and return its checkpoints by id.

    Every listed manifest is a committed checkpoint that loads bit-exact as
    :func:`make_state` of its (run, step); every id in ``must_have`` is one of
    them; verify is ok (orphan packs allowed); every tag points at a committed
    checkpoint and its history replays to its state. With ``gc``, a
    ``gc(grace=0)`` then removes every orphan and stale lease and leaves a bank
    that still passes all of this with no problem at all.
    """
    bank = wb.open(path, create=False)
    try:
        log = {c.id: c for c in bank.log()}
        assert _listed_manifests(bank) == set(log), "a listed manifest is not a loadable checkpoint"
        missing = set(must_have) - set(log)
        assert not missing, f"committed checkpoints lost: {sorted(c[:12] for c in missing)}"
        for cid, info in log.items():
            assert info.step is not None
            assert_same_state(bank.load(cid), make_state(info.run, info.step), f"{info.run}@{info.step}")
        report = bank.verify()
        assert report.ok, report.problems
        for name in tag_names(bank):
            history = check_tag_history(bank, name)
            target = history[-1]["new"]
            assert target is None or target in log, f"tag {name} points at {target[:12]}, not committed"
        if gc:
            bank.gc(grace=0)
            assert not list(bank.storage.list(LEASES)), "gc(grace=0) left a lease of a dead save"
            after = bank.verify()
            assert after.problems == (), after.problems
            assert {c.id for c in bank.log()} == set(log)
            needed = {p for cid in log for p in bank.show(cid).packs}
            packs = {i.key for i in bank.storage.list(PACKS)}
            assert packs == needed, f"orphans left after gc: {sorted(packs - needed)}"
        return log
    finally:
        bank.close()


# -- kill-sweep scenarios -----------------------------------------------------------------------
#
# Each scenario is one sequence of bank calls on the bank :func:`build_base` made;
# a sweep runs it once per storage operation N and kills the worker at N.


def _scenario_save(bank: wb.Bank) -> None:
    bank.save(
        make_state("r", 4), run="r", step=4, tags=["prod", "latest"], chunk_size=CHUNK, metrics={"x": 1}
    )


def _scenario_tag(bank: wb.Bank) -> None:
    bank.tag("prod", "r@2", why="promote")
    bank.rollback("prod", why="undo")
    bank.untag("latest", why="retire")
    bank.rollback("latest", why="restore")
    bank.tag("prod", "r@3", expect="r@1")


def _scenario_gc(bank: wb.Bank) -> None:
    bank.delete("r@0", why="drop")
    bank.prune(run="r", keep_last=1)
    bank.gc(grace=0)


SCENARIOS: dict[str, Callable[[wb.Bank], None]] = {
    "save": _scenario_save,
    "tag": _scenario_tag,
    "gc": _scenario_gc,
}


def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-I", "-S", "-c", "pass"])
    proc.wait()
    return proc.pid


def build_base(path: str | os.PathLike[str]) -> list[str]:
    """A bank the sweeps start from: run ``r`` steps 0-3, prod → r@1 (history r@0, r@1), latest → r@3.

    It also holds what crashed saves leave behind — an orphan pack and the
    stale lease of a dead process — so the gc scenario has work to do.
    Returns the checkpoint ids by step.
    """
    with wb.open(path) as bank:
        ids = [bank.save(make_state("r", s), run="r", step=s, chunk_size=CHUNK).id for s in range(4)]
        bank.tag("prod", ids[0])
        bank.tag("prod", ids[1])
        bank.tag("latest", ids[3])
        save_id = "0dead" + "0" * 19
        lease = {"save": save_id, "host": socket.gethostname(), "pid": dead_pid(), "started": time.time()}
        bank.storage.write(f"{LEASES}{save_id}.json", json.dumps(lease).encode())
        bank.storage.write(f"{PACKS}{save_id[:2]}/{save_id}-0.pack", os.urandom(3000))
    return ids


# -- child processes -----------------------------------------------------------------------------


def spawn_child(
    mode: str, *args: object, stdin: bool = False, cwd: str | None = None
) -> subprocess.Popen[str]:
    """Start ``_child.py MODE ARGS...`` with this interpreter; stdout is a line-buffered text pipe."""
    return subprocess.Popen(
        [sys.executable, str(CHILD), mode, *(str(a) for a in args)],
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},  # children start faster side by side on few cores
    )


class Children:
    """The child processes of one test: any still running at the end are SIGKILLed and reaped."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[str]] = []

    def spawn(
        self, mode: str, *args: object, stdin: bool = False, cwd: str | None = None
    ) -> subprocess.Popen[str]:
        proc = spawn_child(mode, *args, stdin=stdin, cwd=cwd)
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
            proc.wait(timeout=30)


def read_line(proc: subprocess.Popen[str], want: str, timeout: float = 60.0) -> str:
    """Read the child's stdout until a line starting with ``want``; fail with its stderr if it exits."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            _, err = proc.communicate(timeout=10)
            raise AssertionError(f"child exited ({proc.returncode}) before {want!r}:\n{err}")
        if line.startswith(want):
            return line.strip()
    raise AssertionError(f"child did not say {want!r} within {timeout}s")


def finish(proc: subprocess.Popen[str], timeout: float = 120.0) -> list[str]:
    """Wait for a child to exit 0 and return its stdout lines."""
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"child failed ({proc.returncode}):\n{err}"
    return out.splitlines()
