"""The child-process side of ``bench_scale.py``: the banks' recipe, the build workers, and one measured call.

Run by ``bench_scale.py`` with this interpreter, never by hand. Two modes:

* ``build``: one build worker saves its runs' checkpoints into a bank through
  the public library (``Bank.save``, ``Bank.tag``, ``Bank.delete``), following
  a plan the parent wrote as JSON, and writes its rates back as JSON.
* ``op``: a fresh process imports weightbank, notes its RSS, opens the bank
  (through :class:`~weightbank.storage.CountingStorage` with ``--count``),
  makes one call (``load``, ``log``, ``cli-log``, ``tags``, ``cli-tags``,
  ``resolve``, ``save``, ``delete1pct``, ``gc``) and writes what it measured
  as JSON: the open and the call's wall time, the RSS high-water mark above
  the RSS after ``import weightbank``, and with ``--count`` the storage
  requests by method (and, on S3 with ``--wire``, the HTTP requests).

The recipe (:func:`state_at`, :func:`val_loss`) is here so that the parent,
the build workers and the ``save`` call agree on every state: 50 float32
tensors of 16 values per checkpoint; step 0 is all new, each later step
changes 1 to 3 tensors, so every save dedups the other 47-49.
"""

from __future__ import annotations

import contextlib
import inspect
import io
import json
import resource
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any


def _status_kib(field_name: str) -> int | None:
    """A ``VmRSS``/``VmHWM`` line of ``/proc/self/status``, in KiB (None off Linux)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field_name + ":"):
                return int(line.split()[1])
    return None


def _reset_peak() -> bool:
    """Reset the RSS high-water mark to the current RSS (``/proc/self/clear_refs``); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# Measured before anything heavy is imported: the baseline every peak is reported above.
_T_START = time.perf_counter()
import torch  # noqa: E402 - imported by weightbank anyway; named here for the recipe

import weightbank as wb  # noqa: E402

IMPORT_S = time.perf_counter() - _T_START
RSS_AFTER_IMPORT_KIB = _status_kib("VmRSS") or 0
PEAK_RESET = _reset_peak()

from weightbank.bank.marker import init_storage  # noqa: E402
from weightbank.errors import IncompatibleState  # noqa: E402
from weightbank.storage import CountingStorage, open_storage  # noqa: E402

#: Tensors per checkpoint, and values per tensor (float32).
TENSORS = 50
NUMEL = 16
#: Layout of a built bank; bump it when the recipe or plan changes, so old builds are not reused.
RECIPE = 1


# -- the recipe ----------------------------------------------------------------------------------
def changed_at(step: int) -> set[int]:
    """The tensors a run's checkpoint at ``step`` changes from the one before (every one at step 0)."""
    if step == 0:
        return set(range(TENSORS))
    return {(step * 7 + k * 17) % TENSORS for k in range(1 + step % 3)}


def _tensor(run: str, index: int, version: int) -> torch.Tensor:
    seed = zlib.crc32(f"{run}/{index}/{version}".encode())
    return torch.randn(NUMEL, generator=torch.Generator().manual_seed(seed))


class Recipe:
    """One run's states in step order: ``next_state()`` is step 0, then 1, ... (versions kept incrementally)."""

    def __init__(self, run: str) -> None:
        self.run = run
        self.step = -1
        self.versions = [0] * TENSORS
        self.state: dict[str, torch.Tensor] = {}

    def advance(self) -> set[int]:
        """Step on without making tensors; return the indices that changed."""
        self.step += 1
        changed = changed_at(self.step)
        for i in changed:
            self.versions[i] += 1
        return changed

    def next_state(self) -> dict[str, torch.Tensor]:
        for i in self.advance():
            self.state[f"layers.{i:02d}.weight"] = _tensor(self.run, i, self.versions[i])
        return dict(self.state)


def state_at(run: str, step: int) -> dict[str, torch.Tensor]:
    """The state a run saves at ``step`` (replays the versions only: O(step) integer work, then 50 tensors)."""
    recipe = Recipe(run)
    for _ in range(step + 1):
        recipe.advance()
    return {f"layers.{i:02d}.weight": _tensor(run, i, v) for i, v in enumerate(recipe.versions)}


def val_loss(run: str, step: int) -> float:
    """A falling, noisy val_loss, the same in every process."""
    noise = zlib.crc32(f"{run}:{step}".encode()) / 2**32
    return round(2.0 / (1.0 + step / 50.0) + 0.2 * noise, 6)


# -- opening -------------------------------------------------------------------------------------
def open_bank(url: str, options: dict[str, Any] | None, counting: CountingStorage | None = None) -> wb.Bank:
    """The bank at ``url`` with no disk cache; through ``counting`` when given (it wraps the storage).

    ``weightbank.open`` takes a URL, not a storage, so a counted bank is opened the way it opens
    one: the format marker checked by ``init_storage``, then ``Bank`` (given the layout version
    the marker states, where this weightbank's ``Bank`` takes one).
    """
    if counting is None:
        return wb.open(url, create=False, storage_options=options or None, cache=False)
    version = init_storage(counting, create=False)
    if isinstance(version, int) and "version" in inspect.signature(wb.Bank).parameters:
        return wb.Bank(counting, cache=False, version=version)  # type: ignore[call-arg, unused-ignore]
    return wb.Bank(counting, cache=False)


class Wire:
    """HTTP requests of an S3 backend, counted at its request paths (``_op``, ``_get``, ``put_ref``).

    Bench-only instrumentation of private methods, as ``bench_s3.meter`` does; ``ok`` is False when
    the backend has no such paths (not S3, or they were renamed) and nothing is counted.
    """

    def __init__(self, storage: Any) -> None:
        self.requests = 0
        op, get, put_ref = (getattr(storage, n, None) for n in ("_op", "_get", "put_ref"))
        self.ok = op is not None and get is not None and put_ref is not None
        if not self.ok:
            return

        def counted_op(method: str, key: str, **kwargs: Any) -> Any:
            self.requests += 1
            return op(method, key, **kwargs)

        def counted_get(key: str, rng: str | None = None) -> Any:
            self.requests += 1
            return get(key, rng)

        def counted_put_ref(key: str, data: bytes, expect: str | None) -> Any:
            self.requests += 1  # a conditional put goes straight to the client, past _op
            return put_ref(key, data, expect)

        storage._op, storage._get, storage.put_ref = counted_op, counted_get, counted_put_ref


# -- the build worker ----------------------------------------------------------------------------
def build(plan: dict[str, Any]) -> dict[str, Any]:
    """Save this worker's runs step by step, moving its tags and deleting as the plan says.

    ``plan``: ``url``, ``options``, ``runs`` {run: saves}, ``deletes`` {run: [save index, ...]}
    (after that save, delete the run's checkpoint ``lag`` saves back, or the nearest older untagged
    one), ``tags`` (moved every ``tag_every`` saves of this worker to its newest checkpoint, and once
    at the end), ``lag``.
    """
    bank = open_bank(plan["url"], plan.get("options"))
    recipes = {run: Recipe(run) for run in plan["runs"]}
    ids: dict[str, list[str | None]] = {run: [] for run in plan["runs"]}
    deletes = {run: set(v) for run, v in plan["deletes"].items()}
    saved = deleted = moves = 0
    newest = ""
    t0 = time.perf_counter()
    marks: list[tuple[int, float]] = [(0, 0.0)]
    longest = max(plan["runs"].values())
    for index in range(longest):
        for run, saves in plan["runs"].items():
            if index >= saves:
                continue
            state = recipes[run].next_state()
            info = bank.save(state, run=run, step=index, metrics={"val_loss": val_loss(run, index)})
            ids[run].append(info.id)
            newest = info.id
            saved += 1
            if saved % 100 == 0:
                marks.append((saved, time.perf_counter() - t0))
            if index in deletes.get(run, ()):
                deleted += _delete_one(bank, ids[run], index - plan["lag"])
            if plan["tags"] and saved % plan["tag_every"] == 0:
                for name in plan["tags"]:
                    bank.tag(name, newest, why=f"promote {run}@{index}")
                    moves += 1
    for name in plan["tags"]:
        if newest:
            bank.tag(name, newest, why="end of build")
            moves += 1
    seconds = time.perf_counter() - t0
    marks.append((saved, seconds))
    bank.close()
    return {"saved": saved, "deleted": deleted, "tag_moves": moves, "seconds": seconds, "marks": marks}


def _delete_one(bank: wb.Bank, run_ids: list[str | None], start: int) -> int:
    """Delete the run's checkpoint at save index ``start`` or the nearest older live, untagged one."""
    for i in range(max(start, 0), -1, -1):
        cid = run_ids[i]
        if cid is None:
            continue
        try:
            bank.delete(cid, why="bench prune")
        except IncompatibleState:
            continue  # tagged: try an older one
        run_ids[i] = None
        return 1
    return 0


# -- one measured call ---------------------------------------------------------------------------
def _manifest_ids(bank: wb.Bank) -> list[str]:
    """Committed checkpoint ids, from a listing (not timed; no catalog is built)."""
    out = []
    for info in bank.storage.list("manifests/"):
        name = info.key.rsplit("/", 1)[-1]
        if name.endswith(".json"):
            out.append(name[: -len(".json")])
    return sorted(out)


def _cli(args: list[str], path: str, make_bank: Callable[[], wb.Bank]) -> None:
    """``weightbank ARGS --bank PATH`` in this process, its bank opened by ``make_bank`` (so a counted one counts).

    Bench-only: the CLI opens its bank through ``cli.common.open_bank`` (``open_existing``), which
    this replaces for the call. Output is discarded; a failure is raised with its stderr.
    """
    from weightbank.cli import common
    from weightbank.cli.main import app

    def opener(path: str, *, create: bool = True, **kwargs: Any) -> wb.Bank:
        return make_bank()

    out, err = io.StringIO(), io.StringIO()
    common.open_bank = opener  # type: ignore[assignment]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = app([*args, "--bank", path], standalone_mode=False)
        except SystemExit as e:
            rc = e.code
    if rc not in (None, 0):
        raise SystemExit(f"weightbank {' '.join(args)} exited {rc}:\n{err.getvalue()}")


def run_op(op: str, url: str, options: dict[str, Any] | None, args: dict[str, Any]) -> dict[str, Any]:
    """Open the bank, make the call ``op``, and return what was measured.

    ``open_s``/``open_counts`` are the open (the format marker); ``call_s``/``counts`` the call
    alone, its setup (the state to save, the ids to delete) done before. A CLI call opens its
    own bank, so its counts include that open.
    """
    counting: CountingStorage | None = None
    wire: Wire | None = None
    if args.get("count"):
        inner = open_storage(url, options or None)
        if args.get("wire"):
            wire = Wire(inner)
        counting = CountingStorage(inner)
    t0 = time.perf_counter()
    bank = open_bank(url, options, counting)
    open_s = time.perf_counter() - t0
    out: dict[str, Any] = {"op": op, "import_s": IMPORT_S, "open_s": open_s}
    out["rss_import_kib"] = RSS_AFTER_IMPORT_KIB
    if counting is not None:
        out["open_counts"] = {k: v for k, v in counting.counts().items() if v}
    if wire is not None and wire.ok:
        out["open_http_requests"] = wire.requests
    ids = _manifest_ids(bank) if op == "delete1pct" else []
    state = state_at(args["run"], args.get("state_step", args["step"])) if op == "save" else {}
    if op.startswith("cli-"):
        import weightbank.cli.main  # noqa: F401 - the CLI's imports (typer, rich) are not the call
    if counting is not None:
        counting.reset()
    if wire is not None:
        wire.requests = 0
    if PEAK_RESET:
        _reset_peak()  # the peak of the call: the setup above is not counted (it is small anyway)
    t1 = time.perf_counter()
    if op == "load":
        out["tensors"] = len(bank.load("prod"))
    elif op == "log":
        # log(limit=) where this weightbank has it; else the whole log, cut (what `log -n` did).
        limited = "limit" in inspect.signature(bank.log).parameters
        out["rows"] = len(bank.log(limit=20) if limited else bank.log()[:20])  # type: ignore[call-arg, unused-ignore]
    elif op == "cli-log":
        _cli(["log", "-n", "20"], url, lambda: open_bank(url, options, counting))
    elif op == "tags":
        out["tags"] = len(bank.tags())
    elif op == "cli-tags":
        _cli(["tags"], url, lambda: open_bank(url, options, counting))
    elif op == "resolve":
        out["id"] = bank.resolve(f"{args['run']}@best:val_loss")[:12]
    elif op == "save":
        run, step = args["run"], args["step"]
        info = bank.save(state, run=run, step=step, metrics={"val_loss": val_loss(run, step)})
        out["packs_written"] = info.save_stats.packs
        out["new_chunks"] = info.save_stats.new_chunks
        out["parent_is_latest"] = info.parent == args.get("parent")
    elif op == "delete1pct":
        out["deleted"] = _delete_some(bank, ids, max(1, len(ids) // 100))
    elif op == "gc":
        report = bank.gc(grace=0)
        out["packs_deleted"] = len(report.packs_deleted)
        out["bytes_freed"] = report.bytes_freed
    else:
        raise SystemExit(f"unknown op {op!r}")
    out["call_s"] = time.perf_counter() - t1
    if counting is not None:
        out["counts"] = {k: v for k, v in counting.counts().items() if v}
        out["requests"] = counting.total()
    if wire is not None and wire.ok:
        out["http_requests"] = wire.requests
    hwm = _status_kib("VmHWM") if PEAK_RESET else None
    if hwm is not None:
        out["peak_extra_kib"] = hwm - RSS_AFTER_IMPORT_KIB
    else:  # the process's whole peak (import included): an upper bound
        out["peak_extra_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - RSS_AFTER_IMPORT_KIB
    bank.close()
    return out


def _delete_some(bank: wb.Bank, ids: list[str], want: int) -> int:
    """Delete ``want`` untagged checkpoints, spread evenly over ``ids``."""
    done = 0
    stride = max(1, len(ids) // want)
    for cid in ids[::stride] + ids:
        if done == want:
            break
        with contextlib.suppress(IncompatibleState, wb.CheckpointNotFound):  # tagged, or deleted already
            bank.delete(cid, why="bench: prune 1%")
            done += 1
    return done


def main(argv: list[str]) -> int:
    mode, spec_path, out_path = argv[0], Path(argv[1]), Path(argv[2])
    spec = json.loads(spec_path.read_text())
    if mode == "build":
        result = build(spec)
    elif mode == "op":
        result = run_op(spec["op"], spec["url"], spec.get("options"), spec)
    else:
        raise SystemExit(f"usage: {Path(__file__).name} build|op SPEC.json OUT.json")
    out_path.write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
