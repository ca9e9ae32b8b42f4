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
guard (divergence, or a staged state it refused as not finite → rollback, no
save); observe early stopping; ask the save policies; if a save is due, wait
for room (``max_inflight``), snapshot into staging buffers and hand the write
to the background thread (:mod:`~weightbank.training.pipeline`), which checks
the staged state, writes it, then moves the ``<run>.best.<metric>`` tags and
prunes (:mod:`~weightbank.training.keeping`). Every checkpoint carries the
policies', guard's and early stopping's memory, so a resumed run takes the same
decisions. A step's outcome is a :class:`~weightbank.training.job.Decision`
taken by the :class:`~weightbank.training.job.Job`'s leader: the only process,
or rank 0 of a ``torch.distributed`` job, where every rank runs the same loop
and writes its shards (:mod:`weightbank.training.distributed`).

Resuming a run into a state without a data position (a plain ``DataLoader``
left out of the ``TrainingState``) warns once (:class:`DataPositionWarning`,
naming ``ResumableLoader``); a damaged tag record stops pruning (and the moves
of a best tag with that record) and warns once per tag, at the next ``step``,
``wait`` or ``close`` (:class:`DamagedTagWarning`), while training goes on;
``config=``/``meta=`` are checked when given (integer keys become strings:
:mod:`weightbank.training.metadata`).

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

import signal
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from functools import partial
from types import FrameType, TracebackType
from typing import Any, Literal

import torch

from ..bank.bank import AUTO, Auto, Bank
from ..bank.environment import warm_up
from ..bank.layout import check_new_name
from ..bank.results import CheckpointInfo
from ..bank.retention import BestN, KeepPolicy
from ..errors import AlreadyClosed, InvalidArgument, TrainingDiverged
from .data import DataPositionWarning, warn_no_position
from .guard import Guard
from .job import Decision, choose_job
from .keeping import DamagedTagWarning, Keeper
from .metadata import clean_metrics, json_metadata
from .pipeline import SavePipeline
from .policies import EarlyStopping, Every, OnImprovement, SavePolicy
from .results import Rollback, StepOutcome
from .saver import SaveHandle
from .state import TrainingState

__all__ = ["CheckpointManager", "DamagedTagWarning", "DataPositionWarning", "RekeySkipped"]


class RekeySkipped(UserWarning):
    """A save committed, but its rekey (``CheckpointManager(rekey=True)``) could not run."""


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
        config, meta: stored with every checkpoint (hyper-parameters, notes);
            checked here: InvalidState names a key JSON cannot hold, integer
            keys are stored as strings (not a lossless round trip).
        data_fingerprint: recorded in every checkpoint's meta.
        codec: the bank codec for saves (``"raw"``: the fastest save; ``"auto"``:
            compressed, each save a delta against the last).
        rekey: with ``codec="auto"`` (the default there; None: on exactly
            then), each save is its run's keyframe and its parent becomes a
            reverse delta against it (:meth:`~weightbank.Bank.rekey`, in the
            save thread): a resume or rollback to the newest loads no delta
            chain, the chain cost falls on older checkpoints nobody loads, and
            retention that deletes old checkpoints frees their bytes (with
            forward chains newer checkpoints still need them). The save itself
            writes the new checkpoint's changed chunks standalone, so the
            rekey codes only the reverse delta. ``False``: forward deltas, the
            cheapest save. A rekey that cannot run (another repack holds the
            lock) is skipped with a RekeySkipped warning; the save stands.
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
        rekey: bool | None = None,
        best_tags: bool = True,
        signals: Iterable[int] = (signal.SIGTERM, signal.SIGUSR1),
        exit_on_signal: bool = True,
        distributed: bool | None = None,
        collective_timeout: float | None = None,
    ) -> None:
        if run not in bank.runs():  # before any training happens (a run made before id-like names
            check_new_name("run", run)  # were refused goes on)
        warm_up()  # git is probed here, in the caller's thread, never first from the save thread
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
        self.config = json_metadata(config, "config")
        self.meta = json_metadata(meta, "meta")
        if data_fingerprint is not None:
            self.meta["data_fingerprint"] = data_fingerprint
        if rekey and codec != "auto":
            raise InvalidArgument("rekey", rekey, "a rekey turns delta chains around: it needs codec='auto'")
        self.codec = codec
        self.rekey = codec == "auto" if rekey is None else bool(rekey)
        self.rollbacks: list[Rollback] = []
        self._job = choose_job(distributed, collective_timeout)
        self._saves = SavePipeline(bank, self._job, guard, max_inflight)
        monitored = self._monitored_metrics() if best_tags else {}
        self._keeper = Keeper(bank, run, keep=self.keep, monitored=monitored, protected=self._saves.protected)
        self._saves.after_commit = self._after_commit
        self._parent: str | Auto = AUTO
        self._closed = False
        self._signalled: int | None = None
        self._exit_on_signal = exit_on_signal
        self._previous_handlers: dict[int, Any] = {}
        self._lr_checked: TrainingState | None = None
        self._warned_data = False
        self.restore_notes: list[str] = []
        if threading.current_thread() is threading.main_thread():
            for sig in signals:
                self._previous_handlers[sig] = signal.signal(sig, self._on_signal)

    def _after_commit(self, info: CheckpointInfo) -> None:
        """Best tags and pruning, then the rekey (in the save thread, on the leader)."""
        self._keeper.after_commit(info)
        if not self.rekey:
            return
        try:
            self.bank.rekey(info.id)
        except Exception as e:  # the save has committed: a failed rekey must not fail it
            self._keeper.note(
                RekeySkipped(
                    f"checkpoint {info.id[:12]} was saved but not rekeyed ({e}): it loads as fast, but its"
                    " parent stays a keyframe (more bytes than a reverse delta)"
                )
            )

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
        return self._keeper.tag(metric)

    # -- restore -----------------------------------------------------------------------
    def restore(self, state: TrainingState, ref: str | None = None) -> int:
        """Restore ``state`` from ``ref`` (default: the run's latest checkpoint) and return the steps done.

        A run without checkpoints starts fresh (0) — from ``init_from``'s
        weights when given. Nothing of ``state`` changes when the checkpoint
        does not fit it (IncompatibleState). Resuming a run (steps done > 0)
        into a state without a data object warns once (DataPositionWarning).

        Example:
            >>> import torch, weightbank as wb
            >>> bank = wb.open("memory://"); state = wb.TrainingState(model=torch.nn.Linear(1, 1))
            >>> wb.CheckpointManager(bank, run="new", signals=()).restore(state)
            0
        """
        self._raise_failures()
        self._check_lr(state)
        cid, init = self._job.pick(self.bank, ref, self.run, self.init_from)
        if cid is None:
            if init is not None:
                _, self.restore_notes = self._job.restore(state, self.bank, init, self.init_parts)
                self._parent = init
            return 0
        manager, self.restore_notes = self._job.restore(state, self.bank, cid)
        self._load_manager_state(manager)
        if isinstance(manager, Mapping) and isinstance(manager.get("step"), int):
            done = int(manager["step"])
        else:
            done = self.bank.info(cid).step or 0
        if done > 0 and state.data is None and not self._warned_data:
            self._warned_data = True
            warn_no_position(self.run, done, stacklevel=3)
        return done

    def _check_lr(self, state: TrainingState) -> None:
        """Refuse ``Guard(lr_scale=...)`` before training when a scheduler's rates cannot be scaled."""
        if self.guard is None or self.guard.lr_scale == 1.0 or state is self._lr_checked:
            return
        state.check_scalable(self.guard.lr_scale)
        self._lr_checked = state

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
        converted with ``.item()``) stored with the checkpoint; one JSON
        cannot hold raises InvalidState here, naming it.

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
        self._check_lr(state)
        done = step + 1
        m = clean_metrics(metrics)
        decision, signalled = self._job.agree(partial(self._decide, done, m), self._signalled is not None)
        if decision.diverged:
            if decision.refused:
                raise TrainingDiverged(done, decision.diverged, decision.rollbacks, detail=decision.refused)
            rb = self._rollback(done, state, decision)
            return StepOutcome(step=done, next_step=rb.restored_step, rollback=rb, reason=decision.diverged)
        if signalled:
            return self._preempt(done, state, m)
        handle = self._save(done, state, m, trigger="policy") if decision.save else None
        if decision.stop and self.early_stopping is not None:
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

    def _decide(self, done: int, m: dict[str, Any]) -> Decision:
        """What this step does — on the leader only (every other process follows it).

        A rollback is counted against the guard's budget here, so every
        process learns whether it is allowed and the guard's list after it.
        """
        guard = self.guard
        if guard is not None:
            rejected = self._saves.rejected
            reason = rejected[1] if rejected is not None else guard.check(m)
            if reason:
                refused = guard.refusal(done)
                if refused:
                    recent = tuple(s for s in guard.rollbacks if done - s < guard.within)
                    return Decision(diverged=reason, refused=refused, rollbacks=recent)
                guard.allow_rollback(done, reason)
                return Decision(diverged=reason, rollbacks=tuple(guard.rollbacks))
        stop = self.early_stopping is not None and self.early_stopping.observe(m)
        now = time.monotonic()
        due = [p.should_save(done, m, now) for p in self.save_policies]
        return Decision(stop=stop, save=any(due))

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
            step + 1, state, clean_metrics(metrics), trigger="save_now", tags=tags, message=message
        )

    def wait(self) -> None:
        """Block until every save in flight is committed; re-raise a failure.

        A save the guard refused (its state was not finite) is not a failure
        here: the next ``step()`` rolls back.
        """
        self._saves.wait()
        self._keeper.warn_pending(stacklevel=2)  # what the commits skipped (a damaged tag record)

    def close(self) -> None:
        """Wait for the last save, restore signal handlers, stop the background thread; re-raise a failure.

        If the guard refused the last staged state and no step rolled back
        since, that is raised too (TrainingDiverged): the run ended on a state
        that was not saved.
        """
        if self._closed:
            return
        self._closed = True
        for sig, handler in self._previous_handlers.items():
            signal.signal(sig, handler)
        self._previous_handlers.clear()
        try:
            self._saves.close()
        finally:
            self._keeper.warn_pending(stacklevel=2)

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
            raise AlreadyClosed("checkpoint manager")

    def _raise_failures(self) -> None:
        self._keeper.warn_pending(stacklevel=3)  # called by public methods: blame their caller
        self._saves.raise_failures()

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
        resave_of: str | None = None,
    ) -> SaveHandle[CheckpointInfo]:
        t0 = time.perf_counter()
        self._saves.make_room()
        now = time.monotonic()
        for p in self.save_policies:
            p.saved(done, now)
        tree = self._job.capture(state)
        if self._job.leader:  # the leader's policies decide: only its memory is saved
            tree["manager"] = self._manager_state(done)
        meta = {**self.meta, "trigger": trigger}
        if resave_of is not None:  # `run@<step>` then names the original, not this copy
            meta["resave_of"] = resave_of
        data = state.data
        if data is not None and isinstance(getattr(data, "seed", None), int):
            meta.setdefault("data_seed", data.seed)
        meta.setdefault("torch_seed", torch.initial_seed())
        options: dict[str, Any] = {"run": self.run, "step": done, "metrics": metrics, "config": self.config}
        options.update(meta=meta, tags=list(tags), message=message, parent=self._parent, codec=self.codec)
        if self.rekey:  # the rekey makes it the keyframe: its changed chunks are written standalone
            options["keyframe_every"] = 1
        self._parent = AUTO
        return self._saves.submit(tree, done, options, started=t0)

    def _rollback(self, done: int, state: TrainingState, decision: Decision) -> Rollback:
        guard, reason = self.guard, decision.diverged
        if guard is None:  # only a guard decides to roll back
            raise TrainingDiverged(done, reason, detail="no guard to roll back with")
        rollbacks = list(decision.rollbacks)
        self._saves.wait()  # the snapshot to restore may still be on its way to the bank
        self._saves.rejected = None
        data_to = state.data_position()
        snapshot = self._saves.retained
        source: Literal["memory", "bank"]
        if snapshot is not None and snapshot.checkpoint is not None:
            cid, source = snapshot.checkpoint, "memory"
            state.load(snapshot.tree)  # copies out of the snapshot: the retained buffers stay intact
            manager: Any = snapshot.tree.get("manager") if isinstance(snapshot.tree, Mapping) else None
        else:
            found = self._job.broadcast(guard.newest_good(self.bank, self.run) if self._job.leader else None)
            if found is None:
                raise TrainingDiverged(
                    done, reason, rollbacks, detail="no checkpoint to roll back to (none the guard accepts)"
                )
            cid, source = str(found), "bank"
            manager, self.restore_notes = self._job.restore(state, self.bank, cid)
        manager = manager if isinstance(manager, Mapping) else {}
        restored_step = int(manager.get("step", 0))
        self._load_manager_state(manager)
        guard.rollbacks = rollbacks
        data_from = state.data_position()
        state.set_data_position(data_to)  # skip the batches that led here
        if guard.lr_scale != 1.0:
            state.scale_lr(guard.lr_scale)
        rb = Rollback(done, reason, cid, restored_step, source, data_from, data_to, guard.lr_scale)
        data = {"reason": reason, "restored_step": restored_step, "skipped_steps": rb.skipped_steps}
        data.update(source=source, data_from=data_from, data_to=data_to, lr_scale=guard.lr_scale)
        self._event("rollback", step=done, checkpoint=cid, data=data)
        self.rollbacks.append(rb)
        # Persist the rolled-back state (data skipped, LR scaled, rollback counted) so that a crash
        # from here resumes exactly where this process goes on. It re-saves what it restored (its
        # parent), at that step: `run@<step>` passes over it for the original.
        self._parent = cid
        message = f"rollback at step {done} ({reason}) to step {restored_step}"
        self._save(restored_step, state, {}, trigger="rollback", message=message, resave_of=cid)
        return rb

    def _preempt(self, done: int, state: TrainingState, metrics: dict[str, Any]) -> StepOutcome:
        signum = self._signalled
        name = signal.Signals(signum).name if signum is not None else "signal"
        handle = self._save(done, state, metrics, trigger="signal", message=f"preempted by {name}")
        data: dict[str, Any] = {"signal": name}
        try:
            checkpoint: str | None = handle.wait().id
        except TrainingDiverged as e:  # the guard refused the state: the newest good checkpoint stands
            checkpoint, self._saves.rejected = None, None
            data["not_saved"] = e.reason
        self._event("preempted", step=done, checkpoint=checkpoint, data=data)
        self.close()
        if self._exit_on_signal:
            raise SystemExit(0)
        return StepOutcome(step=done, next_step=done, saved=handle, stop=True, reason=f"preempted by {name}")

    def _event(self, kind: str, **kw: Any) -> None:
        if self._job.leader:  # one record per event, not one per rank
            self.bank.record_event(self.run, kind, **kw)

    def _finish_early_stop(self) -> None:
        self.wait()
        es = self.early_stopping
        if es is not None and self._job.leader:  # the leader moves the tag
            self._keeper.tag_best(es.metric, es.mode, why=f"early stopping on {es.metric}")
