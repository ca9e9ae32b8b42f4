"""Many writers on one bank at once — processes and threads — lose nothing.

Saves from several processes (different runs and the same run) all land and
load bit-exact with lineage intact; concurrent tag moves are compare-and-swaps
whose history never loses an event that returned.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest

import weightbank as wb

from .faults import (
    CHUNK,
    Children,
    assert_same_state,
    check_bank,
    check_tag_history,
    finish,
    make_state,
    read_line,
)


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def where(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A new bank location: a directory, or a prefix on the SeaweedFS server (children find it
    through ``$WEIGHTBANK_STORAGE_OPTIONS``, as a CLI user would)."""
    if request.param == "local":
        return str(tmp_path / "bank")
    srv = request.getfixturevalue("seaweed")
    monkeypatch.setenv("WEIGHTBANK_STORAGE_OPTIONS", json.dumps(srv.storage_options()))
    return str(request.getfixturevalue("s3_url"))


def _go(children: Children) -> None:
    """Release every child at once (each has said ``ready``)."""
    for proc in children.procs:
        read_line(proc, "ready")
    for proc in children.procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()


def test_processes_saving_into_one_bank_lose_nothing(where: str, children: Children) -> None:
    path = where
    wb.open(path).close()
    plan = [
        ("a", [0, 2, 4, 6, 8, 10]),  # two processes share run a
        ("a", [1, 3, 5, 7, 9, 11]),
        ("b", [0, 1, 2, 3, 4, 5]),  # and two save the very same states into run b
        ("b", [0, 1, 2, 3, 4, 5]),
    ]
    for run, steps in plan:
        children.spawn("saver", path, run, ",".join(map(str, steps)), stdin=True)
    _go(children)
    reported: dict[str, tuple[str, int]] = {}
    for proc in children.procs:
        for line in finish(proc):
            if line.startswith("saved"):
                _, cid, run, step_text = line.split()
                reported[cid] = (run, int(step_text))
    assert len(reported) == sum(len(steps) for _, steps in plan), "every save returned its own id"

    log = check_bank(path, must_have=set(reported))
    assert set(log) == set(reported), "the bank holds exactly the saves that were reported"
    for cid, (run, step) in reported.items():
        assert (log[cid].run, log[cid].step) == (run, step)
        parent = log[cid].parent
        assert parent is None or (parent in log and log[parent].run == run), "lineage must resolve"
    with wb.open(path, create=False) as bank:
        for run in ("a", "b"):
            roots = [c for c in bank.log(run) if c.parent is None]
            assert len(roots) >= 1
            chain = 0
            node: str | None = bank.resolve(f"{run}@latest")
            while node is not None:
                chain += 1
                node = log[node].parent
            assert chain >= 2, "the newest checkpoint should descend from earlier ones"
        du = bank.du()
        assert du.unique_bytes < du.logical_bytes / 3, "concurrent saves should still dedup each other"


def test_threads_saving_into_one_bank_lose_nothing(tmp_path: Path) -> None:
    bank = wb.open(tmp_path / "bank", workers=2)
    saved: dict[str, tuple[str, int]] = {}
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def saver(run: str, steps: range) -> None:
        barrier.wait()
        try:
            for s in steps:
                saved[bank.save(make_state(run, s), run=run, step=s, chunk_size=CHUNK).id] = (run, s)
        except BaseException as e:
            errors.append(e)

    threads = [
        threading.Thread(target=saver, args=("a" if i < 2 else f"t{i}", range(i, 20, 4))) for i in range(4)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert len(saved) == 20
    for cid, (run, s) in saved.items():
        assert_same_state(bank.load(cid), make_state(run, s))
    bank.close()
    check_bank(tmp_path / "bank", must_have=set(saved))


def _tag_targets(path: str | Path, n: int) -> list[str]:
    with wb.open(path) as bank:
        return [bank.save(make_state("r", s), run="r", step=s, chunk_size=CHUNK).id for s in range(n)]


@pytest.mark.parametrize("backend", ["local", "memory"])
@pytest.mark.parametrize("shared_bank", [True, False], ids=["one-bank", "bank-per-thread"])
def test_threads_moving_one_tag_never_lose_a_returned_event(
    tmp_path: Path, backend: str, shared_bank: bool
) -> None:
    url = str(tmp_path / "bank") if backend == "local" else f"memory://tags-{tmp_path.name}"
    targets = _tag_targets(url, 4)
    banks = [wb.open(url) for _ in range(1 if shared_bank else 4)]
    events: list[wb.TagEvent] = []
    conflicts = [0]
    lock = threading.Lock()
    barrier = threading.Barrier(4)

    def mover(i: int) -> None:
        bank = banks[i % len(banks)]
        barrier.wait()
        for k in range(25):
            try:
                ev = bank.tag("prod", targets[(i + k) % len(targets)], why=f"thread {i} #{k}")
            except wb.ConcurrentUpdate:
                with lock:
                    conflicts[0] += 1
            else:
                with lock:
                    events.append(ev)

    threads = [threading.Thread(target=mover, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    bank = banks[0]
    history = bank.tag_history("prod")
    assert len(events) + conflicts[0] == 100
    assert len(history) == len(events), "history must hold exactly the updates that returned"
    assert sorted(history, key=lambda e: e.why) == sorted(events, key=lambda e: e.why)
    assert bank.resolve("prod") == history[-1].new
    check_tag_history(bank, "prod")
    for b in banks:
        b.close()


def _race(bank: wb.Bank, expect: str, contenders: list[str]) -> tuple[list[str], list[str]]:
    """Move prod to each contender at once from its own thread, all expecting ``expect``."""
    barrier = threading.Barrier(len(contenders))
    won: list[str] = []
    lost: list[str] = []

    def mover(target: str) -> None:
        barrier.wait()
        try:
            won.append(bank.tag("prod", target, expect=expect).new or "")
        except wb.ConcurrentUpdate:
            lost.append(target)

    threads = [threading.Thread(target=mover, args=(t,)) for t in contenders]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return won, lost


@pytest.mark.parametrize("backend", ["local", "memory"])
def test_threads_with_expect_exactly_one_wins(tmp_path: Path, backend: str) -> None:
    url = str(tmp_path / "bank") if backend == "local" else f"memory://expect-{tmp_path.name}"
    targets = _tag_targets(url, 6)
    bank = wb.open(url)
    bank.tag("prod", targets[0])
    for round_ in range(5):
        start = bank.resolve("prod")
        won, lost = _race(bank, start, [t for t in targets if t != start])
        assert len(won) == 1 and len(lost) == 4, f"round {round_}: {len(won)} winners"
        assert bank.resolve("prod") == won[0]
        assert len(bank.tag_history("prod")) == round_ + 2
    check_tag_history(bank, "prod")
    bank.close()


def test_processes_moving_one_tag_never_lose_a_returned_event(where: str, children: Children) -> None:
    path = where
    targets = _tag_targets(path, 4)
    rotations = [",".join(targets[i:] + targets[:i]) for i in range(3)]
    children.spawn("tagger", path, "prod", 30, "-", *rotations, stdin=True)  # 3 worker processes
    _go(children)
    returned = []
    conflicts = 0
    for proc in children.procs:
        for line in finish(proc):
            if line.startswith("ok "):
                returned.append(json.loads(line[3:]))
            elif line == "conflict":
                conflicts += 1
    assert len(returned) + conflicts == 90
    with wb.open(path, create=False) as bank:
        history = bank.tag_history("prod")
        assert len(history) == len(returned), "history must hold exactly the updates that returned"
        stored = {(e.at, e.new, e.why) for e in history}
        assert stored == {(r["at"], r["new"], r["why"]) for r in returned}
        # Each returned event chained on the one before it: nothing was overwritten.
        assert [e.old for e in history[1:]] == [e.new for e in history[:-1]]
        check_tag_history(bank, "prod")
    check_bank(path)


def test_processes_with_expect_exactly_one_wins(where: str, children: Children) -> None:
    path = where
    targets = _tag_targets(path, 5)
    with wb.open(path, create=False) as bank:
        bank.tag("prod", targets[0])
    children.spawn("tagger", path, "prod", 1, targets[0], *targets[1:], stdin=True)  # 4 worker processes
    _go(children)
    outcomes = [
        line for proc in children.procs for line in finish(proc) if line.startswith(("ok", "conflict"))
    ]
    winners = [json.loads(line[3:]) for line in outcomes if line.startswith("ok ")]
    assert len(outcomes) == 4 and len(winners) == 1, outcomes
    with wb.open(path, create=False) as bank:
        assert bank.resolve("prod") == winners[0]["new"]
        assert [e.new for e in bank.tag_history("prod")] == [targets[0], winners[0]["new"]]
    check_bank(path)
