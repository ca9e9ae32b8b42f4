"""A state machine against a plain-Python model: whatever happens to the bank and its index, every ref answers right.

Rules save, re-save (a rollback's copy, meta ``resave_of``), tag, untag, roll
a tag back, delete, prune, ``gc(grace=0)``, compact, damage one index object,
``repair_index`` and restart (a new Bank on the same storage). After every
rule each ref the model knows — tags and ``tag@{1}``, ``run@latest``,
``run@best:m`` (min and max), every ``run@step``, id prefixes — resolves as
the model says, ``log()`` lists the model's ids newest first, and ``runs()``
its runs. A damaged index makes the catalog answer from a listing (the
warning is expected and silenced here) until it is repaired; it never
answers wrong.

The damage rule breaks one index object at a time until a repair: the newest
root (garbled or lost), a log entry still waiting (garbled or lost, the newest
too), garbage past the log's end, a page the newest root names (garbled or
lost: noticed when a query reads it), and harmless ones (an old root, a
folded entry). Harmless damage must leave the index answering; damage the
catalog is sure to notice must make it answer from a listing at once.
"""

from __future__ import annotations

import functools
import math
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import pytest
import torch
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import weightbank as wb
from weightbank.bank.catalog import IndexFallbackWarning
from weightbank.bank.index.store import read_head_state, read_root
from weightbank.bank.index.view import list_gens, list_seqs
from weightbank.bank.layout import log_key, root_key
from weightbank.bank.listing import ScanView
from weightbank.storage.memory import forget

from .indexcheck import drop_ref, garble_ref, referenced_pages, small_pages

#: Let the damage rule delete pages a root names (the catalog notices only when a query reads one).
PAGE_DAMAGE = True
#: Reopen the bank after a repair (once needed: a repaired catalog kept the manifests its listing had read).
REOPEN_AFTER_REPAIR = False

SURE, MAYBE, HARMLESS = "sure", "maybe", "harmless"

RUNS = ("a", "b")
TAGS = ("prod", "dev")
METRICS = st.sampled_from([0.1, 0.2, 0.3, None, math.nan])

Location = tuple[str, dict[str, Any] | None, Callable[[], None]]


@dataclass
class Ckpt:
    cid: str
    run: str
    step: int
    n: int  # commit order (the bank's created order: one process saves one at a time)
    value: float  # what its tensor holds
    metric: float | None
    resave_of: str | None = None


@dataclass
class Model:
    live: dict[str, Ckpt] = field(default_factory=dict)
    next_step: dict[str, int] = field(default_factory=dict)
    tags: dict[str, list[str | None]] = field(default_factory=dict)  # undo stacks
    saves: int = 0
    damaged: bool = False  # the index is broken (until a repair)
    sure: bool = False  # ... in a way the catalog notices before it answers anything

    def run(self, run: str) -> list[Ckpt]:
        return sorted((c for c in self.live.values() if c.run == run), key=lambda c: c.n)

    def latest(self, run: str) -> str:
        rows = self.run(run)
        return rows[-1].cid if rows else "!CheckpointNotFound"

    def best(self, run: str, mode: str) -> str:
        rows = [c for c in self.run(run) if c.metric is not None and math.isfinite(c.metric)]
        if not rows:
            return "!CheckpointNotFound"
        pick = min if mode == "min" else max
        target = pick(c.metric for c in rows)  # type: ignore[type-var]
        return [c for c in rows if c.metric == target][-1].cid  # the newest on ties

    def at_step(self, run: str, step: int) -> str:
        rows = [c for c in self.run(run) if c.step == step]
        if not rows:
            return "!CheckpointNotFound"
        here = {c.cid for c in rows}
        originals = [c for c in rows if c.resave_of not in here]
        return (originals or rows)[-1].cid

    def tag(self, name: str, back: int = 0) -> str:
        stack = self.tags.get(name)
        if stack is None:  # never created: just an unknown ref, unless asked for its history
            return "!TagNotFound" if back else "!CheckpointNotFound"
        if back >= len(stack):
            return "!NoHistory"
        target = stack[-1 - back]
        if target is None:
            return "!TagNotFound"
        return target if target in self.live else "!CheckpointNotFound"

    def live_tags(self) -> set[str]:
        return {s[-1] for s in self.tags.values() if s and s[-1] is not None}

    def expected(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for name in TAGS:
            out[name] = self.tag(name)
            out[f"{name}@{{1}}"] = self.tag(name, 1)
        for run in RUNS:
            out[f"{run}@latest"] = self.latest(run)
            out[f"{run}@best:m"] = self.best(run, "min")
            out[f"{run}@best:m:max"] = self.best(run, "max")
            for step in sorted({c.step for c in self.run(run)} | {self.next_step.get(run, 0)}):
                out[f"{run}@{step}"] = self.at_step(run, step)
        for cid in self.live:
            out[cid[:10]] = cid
        return out


class IndexMachine(RuleBasedStateMachine):
    """One bank, one model; see the module docstring."""

    new_location: ClassVar[Callable[[], Location]]

    def __init__(self) -> None:
        super().__init__()
        self.url, self.options, self.cleanup = type(self).new_location()
        self.bank = wb.open(self.url, storage_options=self.options)
        self.model = Model()
        self.deleted: list[str] = []

    def teardown(self) -> None:
        self.bank.close()
        self.cleanup()

    # -- helpers ---------------------------------------------------------------------------------
    def _save(self, run: str, step: int, metric: float | None, **kw: Any) -> Ckpt:
        self.model.saves += 1
        value = float(self.model.saves)
        metrics = {} if metric is None else {"m": metric}
        info = self.bank.save({"w": torch.full((2,), value)}, run=run, step=step, metrics=metrics, **kw)
        ckpt = Ckpt(info.id, run, step, self.model.saves, value, metric, kw.get("meta", {}).get("resave_of"))
        self.model.live[info.id] = ckpt
        return ckpt

    def _pick(self, data: st.DataObject) -> Ckpt:
        """A live checkpoint, chosen by commit order (ids differ from run to run; the order does not)."""
        return data.draw(st.sampled_from(sorted(self.model.live.values(), key=lambda c: c.n)))

    def _outcome(self, call: Callable[[], object]) -> str:
        try:
            return str(call())
        except wb.WeightbankError as e:
            return f"!{type(e).__name__}"

    # -- rules -----------------------------------------------------------------------------------
    @initialize()
    def first_save(self) -> None:
        self._save("a", 0, 0.2)
        self.model.next_step["a"] = 1
        self.bank.compact()  # a root from the start: every kind of damage is there to choose

    @rule(run=st.sampled_from(RUNS), metric=METRICS)
    def save(self, run: str, metric: float | None) -> None:
        step = self.model.next_step.get(run, 0)
        self.model.next_step[run] = step + 1
        self._save(run, step, metric)

    @precondition(lambda self: self.model.live)
    @rule(data=st.data())
    def resave(self, data: st.DataObject) -> None:
        """What a training rollback writes: the restored state again, at its step, marked."""
        c = self._pick(data)
        self._save(c.run, c.step, None, parent=c.cid, meta={"resave_of": c.cid, "trigger": "rollback"})

    @precondition(lambda self: self.model.live)
    @rule(name=st.sampled_from(TAGS), data=st.data())
    def tag(self, name: str, data: st.DataObject) -> None:
        cid = self._pick(data).cid
        self.bank.tag(name, cid)
        self.model.tags.setdefault(name, []).append(cid)

    @rule(name=st.sampled_from(TAGS))
    def untag(self, name: str) -> None:
        stack = self.model.tags.get(name)
        if not stack or stack[-1] is None:
            return
        self.bank.untag(name)
        stack.append(None)

    @rule(name=st.sampled_from(TAGS))
    def rollback(self, name: str) -> None:
        want = self.model.tag(name, 1)
        got = self._outcome(lambda: self.bank.rollback(name).new)
        assert got == want
        if not want.startswith("!"):
            self.model.tags[name].pop()

    @precondition(lambda self: self.model.live)
    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        cid = self._pick(data).cid
        assert self.bank.delete(cid, force=True) == cid
        del self.model.live[cid]
        self.deleted.append(cid)

    @rule(keep_last=st.integers(1, 4))
    def prune(self, keep_last: int) -> None:
        keep = self.model.live_tags()
        for run in RUNS:
            keep |= {c.cid for c in self.model.run(run)[-keep_last:]}
        doomed = set(self.model.live) - keep
        report = self.bank.prune(keep_last=keep_last)
        assert set(report.deleted) == doomed
        for cid in doomed:
            del self.model.live[cid]
        self.deleted.extend(sorted(doomed))

    @rule()
    def gc(self) -> None:
        self.bank.gc(grace=0)
        for c in sorted(self.model.live.values(), key=lambda c: c.n)[-4:]:
            assert torch.equal(self.bank.load(c.cid)["w"], torch.full((2,), c.value))

    @rule()
    def compact(self) -> None:
        try:
            self.bank.compact()
        except wb.CorruptObject:
            assert self.model.damaged, "compaction failed on a sound index"

    @precondition(lambda self: not self.model.damaged)
    @rule(data=st.data())
    def corrupt_index(self, data: st.DataObject) -> None:
        storage = self.bank.storage
        gens, seqs = list_gens(storage), list_seqs(storage)
        root = read_root(storage, gens[-1]) if gens else None
        upto, held = (root.upto, set(root.held)) if root is not None else (0, set())
        top = max(seqs, default=0)
        waiting = sorted(held | {s for s in seqs if s > upto})
        folded = sorted(s for s in seqs if s <= upto and s not in held)
        # kind -> (what it breaks, how sure the catalog is to notice before it answers)
        kinds: dict[str, tuple[Callable[[], None], str]] = {
            "garbage-past-end": (lambda: garble_ref(storage, log_key(max(top, upto) + 1)), SURE),
        }
        if gens:
            kinds["garble-newest-root"] = (lambda: garble_ref(storage, root_key(gens[-1])), SURE)
            # the root before it may say the same (nothing happened between): noticed only if not
            kinds["delete-newest-root"] = (lambda: drop_ref(storage, root_key(gens[-1])), MAYBE)
        if len(gens) > 1:
            kinds["garble-old-root"] = (lambda: garble_ref(storage, root_key(gens[0])), HARMLESS)
            kinds["delete-old-root"] = (lambda: drop_ref(storage, root_key(gens[0])), HARMLESS)
        if waiting:
            seq = data.draw(st.sampled_from(waiting))
            # A reader takes an entry the head lists as done from the head: then the damage shows
            # only in `verify` (the answers stay exact), else the reader notices at once.
            shadowed = seq in read_head_state(storage).done
            kinds["garble-waiting"] = (lambda: garble_ref(storage, log_key(seq)), MAYBE if shadowed else SURE)
            kinds["delete-waiting"] = (lambda: drop_ref(storage, log_key(seq)), SURE)
        if folded:
            old = data.draw(st.sampled_from(folded))
            kinds["garble-folded"] = (lambda: garble_ref(storage, log_key(old)), HARMLESS)
            kinds["delete-folded"] = (lambda: drop_ref(storage, log_key(old)), HARMLESS)
        pages = sorted(referenced_pages(storage, gens[-1:])) if PAGE_DAMAGE and root is not None else []
        if pages:
            page = data.draw(st.sampled_from(pages))
            # a page is read only by the queries that need it: noticed then, not before
            kinds["delete-page"] = (lambda: storage.delete(page), MAYBE)
            kinds["garble-page"] = (lambda: storage.write(page, b"\x28\xb5\x2f\xfd garbage"), MAYBE)
        kind = data.draw(st.sampled_from(sorted(kinds)))
        event(f"damage: {kind}")
        damage, sure = kinds[kind]
        damage()
        self.model.damaged = sure != HARMLESS
        self.model.sure = sure == SURE
        # A process keeps the roots and entries it already read (they never change once written), so
        # damage done to them afterwards is the next process's to find: that is the one asked.
        self.restart()

    @rule()
    def repair(self) -> None:
        self.bank.repair_index()
        self.model.damaged = self.model.sure = False
        if REOPEN_AFTER_REPAIR:
            self.restart()

    @rule()
    def restart(self) -> None:
        self.bank.close()
        self.bank = wb.open(self.url, create=False, storage_options=self.options)

    # -- invariants ------------------------------------------------------------------------------
    @invariant()
    def answers_are_the_models(self) -> None:
        self.bank._catalog.refresh()
        scanning = isinstance(self.bank._catalog.view(), ScanView)
        if self.model.sure or not self.model.damaged:
            assert scanning == self.model.damaged, f"scanning={scanning}, damage={self.bank._catalog.damage}"
        want = self.model.expected()
        want.update({cid[:10]: "!CheckpointNotFound" for cid in self.deleted})
        got = {ref: self._outcome(functools.partial(self.bank.resolve, ref)) for ref in want}
        assert got == want
        newest_first = sorted(self.model.live.values(), key=lambda c: c.n, reverse=True)
        assert [c.id for c in self.bank.log()] == [c.cid for c in newest_first]
        assert [c.id for c in self.bank.log(limit=3)] == [c.cid for c in newest_first[:3]]
        assert self.bank.runs() == sorted({c.run for c in self.model.live.values()})


def _memory() -> Location:
    name = f"machine-{uuid.uuid4().hex[:12]}"
    return f"memory://{name}", None, lambda: forget(name)


def _local() -> Location:
    path = tempfile.mkdtemp(prefix="wb-machine-")
    return f"{path}/bank", None, lambda: shutil.rmtree(path, ignore_errors=True)


def _run(location: Callable[[], Location], monkeypatch: pytest.MonkeyPatch, **limits: Any) -> None:
    small_pages(monkeypatch, page=3, every=3, recent=5)
    machine = type("Machine", (IndexMachine,), {"new_location": staticmethod(location)})
    with warnings.catch_warnings():
        warnings.simplefilter(
            "ignore", IndexFallbackWarning
        )  # a damaged index may warn; it never answers wrong
        run_state_machine_as_test(
            machine,
            settings=settings(
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
                **limits,
            ),
        )


def test_index_machine_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    _run(_memory, monkeypatch, max_examples=40, stateful_step_count=40)


def test_index_machine_local(monkeypatch: pytest.MonkeyPatch) -> None:
    _run(_local, monkeypatch, max_examples=12, stateful_step_count=30)


@pytest.mark.s3
def test_index_machine_s3(monkeypatch: pytest.MonkeyPatch, seaweed: Any, s3_url: str) -> None:
    options = seaweed.storage_options()

    def location() -> Location:
        return f"{s3_url}-{uuid.uuid4().hex[:8]}", options, lambda: None

    _run(location, monkeypatch, max_examples=3, stateful_step_count=12)
