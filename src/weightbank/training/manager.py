"""CheckpointManager: policy-driven async saves, exact resume, automatic rollback, for one training run.

The loop::

    mgr = wb.CheckpointManager(bank, run="tts", save=wb.Every(steps=500),
                               keep=[wb.LastN(3), wb.BestN("val_loss", 2)], guard=wb.Guard(spike=5.0))
    state = wb.TrainingState(model=model, optimizer=opt, scheduler=sched, data=loader)
    step = mgr.restore(state)               # steps already done: 0 for a fresh run
    while step < total:
        loss = train_one_step(next(batches))
        out = mgr.step(step, state, metrics={"loss": loss})
        if out.stop:
            break
        step = out.next_step                # step + 1, or earlier after a rollback
    mgr.close()

``step`` passed to :meth:`CheckpointManager.step` is the 0-based index of the
step just finished; its checkpoint records ``step + 1`` (the steps done), which
is also what :meth:`restore` returns — the index to run next.

What ``step()`` does, in order: re-raise a failed background save; ask the
guard (divergence → rollback, no save); observe early stopping; ask the save
policies; if a save is due, wait for room (``max_inflight``), snapshot into
staging buffers and hand the write to the background thread. After a save
commits, the background thread moves the ``<run>.best.<metric>`` tags and
prunes what no keep rule keeps (never before the new checkpoint is
committed). Every checkpoint carries the policies', guard's and early
stopping's memory, so a resumed run takes the same decisions.

In a ``torch.distributed`` job every rank runs the same loop: rank 0 decides,
every rank writes its shards, rank 0 commits (see
:mod:`weightbank.training.distributed`).

Example:
    >>> import torch, weightbank as wb
    >>> bank = wb.open("memory://"); model = torch.nn.Linear(2, 1)
    >>> state = wb.TrainingState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1))
    >>> with wb.CheckpointManager(bank, run="r", save=wb.Every(steps=2), signals=()) as mgr:
    ...     for step in range(mgr.restore(state), 4):
    ...         out = mgr.step(step, state, metrics={"loss": 1.0})
    >>> [c.step for c in bank.log("r")]
    [4, 2]
"""

from __future__ import annotations

import re
import signal
import sys
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from types import FrameType, TracebackType
from typing import Any

import torch

from ..bank.bank import AUTO, Bank
from ..bank.environment import capture_env
from ..bank.results import CheckpointInfo
from ..errors import CheckpointNotFound, TrainingDiverged
from .distributed import Distributed
from .distributed import capture as dist_capture
from .distributed import pick as dist_pick
from .distributed import restore as dist_restore
from .distributed import save as dist_save
from .guard import Guard
from .policies import (
    BestN,
    EarlyStopping,
    Every,
    KeepPolicy,
    OnImprovement,
    SavePolicy,
    improved,
    metric_value,
    to_keep,
)
from .results import Rollback, StepOutcome
from .saver import AsyncSaver, SaveHandle
from .staging import Snapshot, StagingPool
from .state import TrainingState

__all__ = ["CheckpointManager"]

_TAG_UNSAFE = re.compile(r"[^A-Za-z0-9_.+=,-]")


def _distributed(asked: bool | None, timeout: float | None) -> Distributed | None:
    """The job this manager runs in: None for a single process."""
    if asked is False:
        return None
    if asked is None:
        dist = sys.modules.get("torch.distributed")
        if dist is None or not (dist.is_available() and dist.is_initialized()):
            return None
    return Distributed(timeout)


def _clean_metrics(metrics: Mapping[str, Any] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in (metrics or {}).items():
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.detach().item()
        elif hasattr(v, "item") and callable(v.item) and not isinstance(v, (list, dict, str)):
            v = v.item()  # numpy scalars
        out[str(k)] = v
    return out


class CheckpointManager:
    """Saves, prunes, restores and rolls back one run's training state in a bank (see the module docstring).

    Args:
        bank: the bank to save into.
        run: the run's name (checkpoints are ``run@<step>``, ``run@latest``).
        save: when to save — a policy or a list (any one saying yes saves).
        keep: what to keep — rules combined by union; empty keeps everything.
        guard: divergence detection and automatic rollback (None: off).
        early_stopping: tells the loop to stop (``StepOutcome.stop``).
        max_inflight: saves pending at once before ``step()`` waits.
        init_from: a ref in another run to start a fresh run from (its model
            weights, or ``init_parts``); the first checkpoint's parent is it.
        config, meta: stored with every checkpoint (hyper-parameters, notes).
        data_fingerprint: recorded in every checkpoint's meta.
        codec: the bank codec for saves.
        best_tags: keep a ``<run>.best.<metric>`` tag on the best checkpoint
            of every monitored metric (from BestN, OnImprovement, EarlyStopping).
        signals: signals meaning "preempted": finish the step, save, and exit
            (``SystemExit(0)``) or, with ``exit_on_signal=False``, stop.
            Handlers are installed only from the main thread; ``()`` for none.
        distributed: run as one rank of a ``torch.distributed`` job (every
            rank makes the same calls; sharded saves and resharding restores).
            None: whenever a process group is initialized.
        collective_timeout: seconds the manager's own collectives wait for
            the other ranks (None: torch's default).
    """

    def __init__(
        self,
        bank: Bank,
        run: str = "main",
        *,
        save: SavePolicy | Sequence[SavePolicy] | None = None,
        keep: Sequence[KeepPolicy] = (),
        guard: Guard | None = None,
        early_stopping: EarlyStopping | None = None,
        max_inflight: int = 1,
        init_from: str | None = None,
        init_parts: Sequence[str] = ("model",),
        config: Mapping[str, Any] | None = None,
        meta: Mapping[str, Any] | None = None,
        data_fingerprint: str | None = None,
        codec: str = "raw",
        best_tags: bool = True,
        signals: Iterable[int] = (signal.SIGTERM, signal.SIGUSR1),
        exit_on_signal: bool = True,
        distributed: bool | None = None,
        collective_timeout: float | None = None,
    ) -> None:
        bank.events(run)  # validates the run name before any training happens
        # The bank probes git (subprocesses) once per working directory for checkpoint metadata. Do it
        # here, in the caller's thread: a DataLoader worker forked while the background thread is
        # inside subprocess creation inherits the pipe that thread then waits on forever.
        capture_env()
        self.bank = bank
        self.run = run
        if save is None:
            save = [Every(steps=1000)]
        self.save_policies: list[SavePolicy] = [save] if isinstance(save, SavePolicy) else list(save)
        self.keep = list(keep)
        self.guard = guard
        self.early_stopping = early_stopping
        self.init_from = init_from
        self.init_parts = tuple(init_parts)
        self.config = dict(config or {})
        self.meta = dict(meta or {})
        if data_fingerprint is not None:
            self.meta["data_fingerprint"] = data_fingerprint
        self.codec = codec
        self.rollbacks: list[Rollback] = []
        self._monitored = self._monitored_metrics() if best_tags else {}
        self._best: dict[str, float | None] = {}
        self._saver = AsyncSaver(max_inflight)
        # One slot per save in flight, plus the retained last good state when a guard may roll back.
        self._pool = StagingPool(max_inflight + (1 if guard is not None else 0))
        self._retained: Snapshot | None = None
        self._parent: Any = AUTO
        self._closed = False
        self._signalled: int | None = None
        self._exit_on_signal = exit_on_signal
        self._previous_handlers: dict[int, Any] = {}
        self.restore_notes: list[str] = []
        self._dist = _distributed(distributed, collective_timeout)
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous_handlers[sig] = signal.signal(sig, self._on_signal)

    def __repr__(self) -> str:
        return f"CheckpointManager({self.bank.url!r}, run={self.run!r})"

    def _monitored_metrics(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for p in [*self.save_policies, *self.keep, self.early_stopping]:
            if isinstance(p, (OnImprovement, BestN, EarlyStopping)):
                out.setdefault(p.metric, p.mode)
        return out

    def best_tag(self, metric: str) -> str:
        """The name of the tag kept on the best checkpoint for ``metric`` (``<run>.best.<metric>``).

        Example:
            >>> import weightbank as wb
            >>> wb.CheckpointManager(wb.open("memory://"), run="tts", signals=()).best_tag("val/loss")
            'tts.best.val_loss'
        """
        return f"{self.run}.best.{_TAG_UNSAFE.sub('_', metric)}"

    # -- restore -----------------------------------------------------------------------
    def restore(self, state: TrainingState, ref: str | None = None) -> int:
        """Restore ``state`` from ``ref`` (default: the run's latest checkpoint) and return the steps done.

        A run without checkpoints starts fresh (0) — from ``init_from``'s
        weights when given.

        Example:
            >>> import torch, weightbank as wb
            >>> bank = wb.open("memory://"); state = wb.TrainingState(model=torch.nn.Linear(1, 1))
            >>> wb.CheckpointManager(bank, run="new", signals=()).restore(state)
            0
        """
        self._raise_failures()
        if self._dist is not None:
            return self._restore_dist(state, ref)
        if ref is None:
            try:
                cid = self.bank.resolve(f"{self.run}@latest")
            except CheckpointNotFound:
                if self.init_from is not None:
                    init = self.bank.resolve(self.init_from)
                    state.load(self.bank.load(init), parts=self.init_parts)
                    self._parent = init
                return 0
        else:
            cid = self.bank.resolve(ref)
        if "dcp" in self.bank.show(cid).info.meta:
            # Saved through DCP (a distributed job): load it the same way, as the only rank.
            return self._restored(dist_restore(state, self.bank, cid, Distributed.alone()), cid)
        tree = self.bank.load(cid)
        state.load(tree)
        manager = tree.get("manager") if isinstance(tree, Mapping) else None
        self._load_manager_state(manager)
        if isinstance(manager, Mapping) and isinstance(manager.get("step"), int):
            return int(manager["step"])
        step = self.bank.show(cid).info.step
        return step or 0

    def _restore_dist(self, state: TrainingState, ref: str | None) -> int:
        """``restore`` on every rank: rank 0 picks the checkpoint, every rank loads its share."""
        assert self._dist is not None
        cid, init = dist_pick(self.bank, self._dist, ref, self.run, self.init_from)
        if cid is None:
            if init is not None:
                _, self.restore_notes = dist_restore(
                    state, self.bank, init, self._dist, parts=self.init_parts
                )
                self._parent = init
            return 0
        return self._restored(dist_restore(state, self.bank, cid, self._dist), cid)

    def _restored(self, result: tuple[Any, list[str]], cid: str) -> int:
        """Take a distributed restore's manager state and notes; the steps done."""
        manager, self.restore_notes = result
        self._load_manager_state(manager)
        if isinstance(manager, Mapping) and isinstance(manager.get("step"), int):
            return int(manager["step"])
        return self.bank.show(cid).info.step or 0

    def _manager_state(self, done: int) -> dict[str, Any]:
        return {
            "step": done,
            "save": [p.state_dict() for p in self.save_policies],
            "guard": None if self.guard is None else self.guard.state_dict(),
            "early_stopping": None if self.early_stopping is None else self.early_stopping.state_dict(),
        }

    def _load_manager_state(self, ms: Any) -> None:
        if not isinstance(ms, Mapping):
            return
        saved = ms.get("save")
        if isinstance(saved, list) and len(saved) == len(self.save_policies):
            for p, s in zip(self.save_policies, saved, strict=True):
                p.load_state_dict(s)
        if self.guard is not None and isinstance(ms.get("guard"), Mapping):
            self.guard.load_state_dict(ms["guard"])
        if self.early_stopping is not None and isinstance(ms.get("early_stopping"), Mapping):
            self.early_stopping.load_state_dict(ms["early_stopping"])

    # -- the loop ------------------------------------------------------------------------
    def step(self, step: int, state: TrainingState, metrics: Mapping[str, Any] | None = None) -> StepOutcome:
        """Report that step ``step`` (0-based) finished; save, roll back or stop as the policies say.

        Blocks only to re-raise a failed save, for back-pressure, and for the
        snapshot copy when a save is due. Metrics are numbers (0-d tensors are
        converted with ``.item()``) stored with the checkpoint.

        Example:
            >>> import torch, weightbank as wb
            >>> bank = wb.open("memory://"); state = wb.TrainingState(model=torch.nn.Linear(1, 1))
            >>> mgr = wb.CheckpointManager(bank, run="r", save=wb.Every(steps=1), signals=())
            >>> out = mgr.step(0, state, {"loss": 0.5}); out.saved.wait().step, out.next_step
            (1, 1)
            >>> mgr.close()
        """
        self._check_open()
        self._raise_failures()
        done = step + 1
        m = _clean_metrics(metrics)
        if self._dist is None:
            (reason, stop, due, rollbacks), signalled = self._decide(done, m), self._signalled is not None
        else:
            (reason, stop, due, rollbacks), signalled = self._dist.agree(
                partial(self._decide, done, m), self._signalled is not None
            )
        if reason is not None:
            if rollbacks == []:  # rank 0's guard refused another rollback
                raise TrainingDiverged(done, reason, list(self.guard.rollbacks) if self.guard else [])
            if rollbacks is not None and self.guard is not None:
                self.guard.rollbacks = rollbacks  # rank 0's guard allowed it
            rb = self._rollback(done, state, reason)
            return StepOutcome(step=done, next_step=rb.restored_step, rollback=rb, reason=reason)
        handle = None
        if signalled:
            return self._preempt(done, state, m)
        if due:
            handle = self._save(done, state, m, trigger="policy")
        if stop:
            assert self.early_stopping is not None
            self._finish_early_stop()
            es = self.early_stopping
            return StepOutcome(
                step=done,
                next_step=done,
                saved=handle,
                stop=True,
                reason=f"early stopping: no {es.metric} improvement for {es.patience} evaluations",
            )
        return StepOutcome(step=done, next_step=done, saved=handle)

    def _decide(self, done: int, m: dict[str, Any]) -> tuple[str | None, bool, bool, list[int] | None]:
        """(divergence reason, stop, save due, rollbacks) — on rank 0 only in a distributed job.

        In a distributed job the guard's permission for a rollback is asked
        here too, so every rank learns it: ``rollbacks`` is then the guard's
        list after allowing it, or ``[]`` when it refused (TrainingDiverged).
        """
        if self.guard is not None:
            reason = self.guard.check(m)
            if reason is not None:
                if self._dist is None:
                    return reason, False, False, None
                try:
                    self.guard.allow_rollback(done, reason)
                except TrainingDiverged:
                    return reason, False, False, []
                return reason, False, False, list(self.guard.rollbacks)
        stop = self.early_stopping is not None and self.early_stopping.observe(m)
        now = time.monotonic()
        due = [p.should_save(done, m, now) for p in self.save_policies]
        return None, stop, any(due), None

    def save_now(
        self,
        step: int,
        state: TrainingState,
        metrics: Mapping[str, Any] | None = None,
        *,
        tags: Iterable[str] = (),
        message: str = "",
    ) -> SaveHandle[CheckpointInfo]:
        """Save now (after step ``step``, 0-based), whatever the policies say; returns the handle.

        Example:
            >>> import torch, weightbank as wb
            >>> bank = wb.open("memory://"); state = wb.TrainingState(model=torch.nn.Linear(1, 1))
            >>> with wb.CheckpointManager(bank, run="r", signals=()) as mgr:
            ...     info = mgr.save_now(9, state, tags=["candidate"]).wait()
            >>> info.step, info.tags
            (10, ('candidate',))
        """
        self._check_open()
        self._raise_failures()
        return self._save(
            step + 1, state, _clean_metrics(metrics), trigger="save_now", tags=tags, message=message
        )

    def wait(self) -> None:
        """Block until every save in flight is committed; re-raise a failure."""
        self._saver.wait_all()
        self._raise_failures()

    def close(self) -> None:
        """Wait for the last save, restore signal handlers, stop the background thread; re-raise a failure."""
        if self._closed:
            return
        self._closed = True
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()
        self._pool.retain(None)
        self._retained = None
        self._saver.close()

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception as err:
            # The body's exception wins; the save failure is attached, not lost.
            add_note = getattr(exc, "add_note", None)
            if add_note is not None:
                add_note(f"while closing the checkpoint manager, a save also failed: {err!r}")

    # -- internals -------------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise ValueError("the checkpoint manager is closed")

    def _raise_failures(self) -> None:
        self._saver.raise_failures()

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signalled = signum

    def _save(
        self,
        done: int,
        state: TrainingState,
        metrics: dict[str, Any],
        *,
        trigger: str,
        tags: Iterable[str] = (),
        message: str = "",
    ) -> SaveHandle[CheckpointInfo]:
        t0 = time.perf_counter()
        self._saver.wait_for_room()
        while not self._pool.free():  # the retained slot plus max_inflight: only a failed save gets here
            self._saver.wait_all()
        now = time.monotonic()
        for p in self.save_policies:
            p.saved(done, now)
        if self._dist is None:
            tree = state.capture()
            tree["manager"] = self._manager_state(done)
        else:
            tree = dist_capture(state, self._dist.rank)
            if self._dist.rank == 0:  # rank 0's policies decide: only its memory is saved
                tree["manager"] = self._manager_state(done)
        snapshot = self._pool.stage(tree)
        if self.guard is not None and self._dist is None:
            self._pool.retain(snapshot)
            self._retained = snapshot
        meta = {**self.meta, "trigger": trigger}
        data = state.data
        if data is not None and isinstance(getattr(data, "seed", None), int):
            meta.setdefault("data_seed", data.seed)
        meta.setdefault("torch_seed", torch.initial_seed())
        job = partial(self._write, snapshot, done, metrics, list(tags), message, self._parent, meta)
        self._parent = AUTO
        blocked = time.perf_counter() - t0
        return self._saver.submit(job, step=done, blocked_seconds=blocked)

    def _write(
        self,
        snapshot: Snapshot,
        done: int,
        metrics: dict[str, Any],
        tags: list[str],
        message: str,
        parent: Any,
        meta: dict[str, Any],
    ) -> CheckpointInfo:
        """The background job: write the snapshot, then tags and pruning (only after the commit).

        In a distributed job every rank runs it at once (one DCP save); rank 0 commits, tags and prunes.
        """
        options: dict[str, Any] = {"run": self.run, "step": done, "metrics": metrics, "config": self.config}
        options.update(meta=meta, tags=tags, message=message, parent=parent, codec=self.codec)
        try:
            snapshot.ready()
            if self._dist is None:
                info: CheckpointInfo | None = self.bank.save(snapshot.tree, **options)
                assert info is not None
                cid = info.id
            else:
                cid, info = dist_save(self.bank, snapshot.tree, self._dist.save_group, **options)
        finally:
            self._pool.release(snapshot.slot)
        snapshot.checkpoint = cid
        if info is None:  # not rank 0: the commit, its tags and the pruning are rank 0's
            return self.bank.show(cid).info
        self._update_best_tags(info)
        if self.keep:
            self._prune(protect={info.id})
        return info

    def _update_best_tags(self, info: CheckpointInfo) -> None:
        for metric, mode in self._monitored.items():
            value = metric_value(info.metrics, metric)
            if value is None:
                continue
            tag = self.best_tag(metric)
            if metric not in self._best:
                self._best[metric] = self._tagged_value(tag, metric)
            if improved(value, self._best[metric], 0.0, "min" if mode == "min" else "max"):
                self.bank.tag(tag, info.id, why=f"best {metric}={value:g} at step {info.step}")
                self._best[metric] = value

    def _tagged_value(self, tag: str, metric: str) -> float | None:
        try:
            return metric_value(self.bank.show(tag).info.metrics, metric)
        except CheckpointNotFound:
            return None

    def _prune(self, protect: set[str]) -> None:
        infos = self.bank.log(self.run)
        if self._retained is not None and self._retained.checkpoint:
            protect = protect | {self._retained.checkpoint}
        keep = to_keep(infos, self.keep, time.time(), protect)
        for c in infos:
            if c.id not in keep and not c.tags:
                self.bank.delete(c.id, why=f"retention of run {self.run}")

    def _rollback(self, done: int, state: TrainingState, reason: str) -> Rollback:
        assert self.guard is not None
        guard = self.guard
        if self._dist is None:
            guard.allow_rollback(done, reason)  # in a distributed job rank 0 asked it already
        rollbacks = list(guard.rollbacks)
        self.wait()  # the snapshot to restore may still be on its way to the bank
        data_to = state.data_position()
        snapshot = self._retained
        if snapshot is not None and snapshot.checkpoint is not None:
            cid, tree, source = snapshot.checkpoint, snapshot.tree, "memory"
            state.load(tree)  # copies out of the snapshot: the retained buffers stay intact
            manager = tree.get("manager", {}) if isinstance(tree, Mapping) else {}
        else:
            try:
                latest = self.bank.resolve(f"{self.run}@latest")
            except CheckpointNotFound:
                latest = None
            if self._dist is not None:
                latest = self._dist.broadcast(latest)
            if latest is None:
                raise TrainingDiverged(done, reason, rollbacks, detail="no checkpoint to roll back to")
            cid, source = latest, "bank"
            if self._dist is None:
                tree = self.bank.load(cid)
                state.load(tree)
                manager = tree.get("manager", {}) if isinstance(tree, Mapping) else {}
            else:
                manager, self.restore_notes = dist_restore(state, self.bank, cid, self._dist)
                manager = manager if isinstance(manager, Mapping) else {}
        restored_step = int(manager.get("step", 0))
        self._load_manager_state(manager)
        guard.rollbacks = rollbacks
        data_from = state.data_position()
        state.set_data_position(data_to)  # skip the batches that led here
        if guard.lr_scale != 1.0:
            state.scale_lr(guard.lr_scale)
        rb = Rollback(
            step=done,
            reason=reason,
            restored=cid,
            restored_step=restored_step,
            source="memory" if source == "memory" else "bank",
            data_from=data_from,
            data_to=data_to,
            lr_scale=guard.lr_scale,
        )
        self._event(
            "rollback",
            step=done,
            checkpoint=cid,
            data={
                "reason": reason,
                "restored_step": restored_step,
                "skipped_steps": rb.skipped_steps,
                "source": source,
                "data_from": data_from,
                "data_to": data_to,
                "lr_scale": guard.lr_scale,
            },
        )
        self.rollbacks.append(rb)
        # Persist the rolled-back state (data skipped, LR scaled, rollback counted) so that a crash
        # from here resumes exactly where this process goes on.
        self._save(
            restored_step,
            state,
            {},
            trigger="rollback",
            message=f"rollback at step {done} ({reason}) to step {restored_step}",
        )
        return rb

    def _preempt(self, done: int, state: TrainingState, metrics: dict[str, Any]) -> StepOutcome:
        signum = self._signalled
        name = signal.Signals(signum).name if signum is not None else "signal"
        handle = self._save(done, state, metrics, trigger="signal", message=f"preempted by {name}")
        info = handle.wait()
        self._event("preempted", step=done, checkpoint=info.id, data={"signal": name})
        self.close()
        if self._exit_on_signal:
            raise SystemExit(0)
        return StepOutcome(step=done, next_step=done, saved=handle, stop=True, reason=f"preempted by {name}")

    def _event(self, kind: str, **kw: Any) -> None:
        if self._dist is None or self._dist.rank == 0:  # one record per event, not one per rank
            self.bank.record_event(self.run, kind, **kw)

    def _finish_early_stop(self) -> None:
        self.wait()
        es = self.early_stopping
        assert es is not None
        if self._dist is not None and self._dist.rank != 0:
            return  # rank 0 moves the tag
        try:
            best = self.bank.resolve(f"{self.run}@best:{es.metric}:{es.mode}")
        except CheckpointNotFound:
            return  # no checkpoint recorded the metric: nothing to tag
        tag = self.best_tag(es.metric)
        try:
            current = self.bank.resolve(tag)
        except CheckpointNotFound:
            current = None
        if current != best:
            self.bank.tag(tag, best, why=f"early stopping on {es.metric}")
