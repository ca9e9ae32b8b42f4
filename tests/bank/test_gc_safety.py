"""gc never deletes data a save in flight may still use — in another process or another thread.

The argument (maintenance.py): leases are listed before manifests, deleted
manifests wait in trash with their deletion time, and a stale lease (dead pid
on this host) protects nothing.
"""

from __future__ import annotations

import json
import signal
import threading
from pathlib import Path

import pytest

import weightbank as wb
from weightbank.bank.layout import LEASES, PACKS, TRASH
from weightbank.storage import LocalStorage

from .faults import (
    CHUNK,
    Children,
    FaultStorage,
    assert_same_state,
    check_bank,
    finish,
    make_state,
    read_line,
)


def _packs(bank: wb.Bank) -> set[str]:
    return {i.key for i in bank.storage.list(PACKS)}


def test_gc_keeps_chunks_an_inflight_save_reuses_while_their_checkpoints_are_deleted(
    tmp_path: Path, children: Children
) -> None:
    path = tmp_path / "bank"
    bank = wb.open(path)
    a0 = bank.save(make_state("r", 0), run="r", step=0, chunk_size=CHUNK, tags=["old"])
    a1 = bank.save(make_state("r", 1), run="r", step=1, chunk_size=CHUNK)
    old_packs = set(bank.show(a0.id).packs) | set(bank.show(a1.id).packs)

    # B (r@2) reuses a0/a1's chunks (shared, run, slow) and writes new ones, slowly; its pack
    # writes wait at a gate this test opens after three gc rounds, however fast either side is.
    gate = tmp_path / "gate"
    child = children.spawn("slow-save", path, "r", 2, 0.25, 0, 0, gate)
    read_line(child, "writing")  # B holds its lease and has chosen the chunks it reuses
    bank.untag("old")
    bank.delete(a0.id)
    assert bank.prune(run="r", keep_last=0).deleted == (a1.id,)
    assert bank.log() == []
    rounds = 0
    deleted: set[str] = set()
    while child.poll() is None:
        report = bank.gc(grace=0)
        deleted.update(report.packs_deleted)
        if any(bank.storage.list(LEASES)):  # B was in flight during the whole gc
            assert report.packs_deleted == (), f"gc deleted {report.packs_deleted} under an in-flight save"
            rounds += 1
        if rounds >= 3:
            gate.touch()
    assert rounds >= 3, "gc should have run several times while the save was in flight"
    lines = finish(child)
    _, b_id, reused, new = next(line for line in lines if line.startswith("saved")).split()
    assert int(reused) > 0 and int(new) > 0, "B must both reuse old chunks and write new ones"
    assert set(bank.show(b_id).packs) & old_packs, "B should reference a pack of a deleted checkpoint"
    assert not deleted & set(bank.show(b_id).packs), "gc deleted a pack B references"

    assert_same_state(bank.load(b_id), make_state("r", 2))
    assert bank.verify().ok
    bank.gc(grace=0)
    assert_same_state(bank.load(b_id), make_state("r", 2))
    check_bank(path, must_have={b_id})
    bank.close()


def test_gc_during_a_delete_that_races_a_save_starting(tmp_path: Path, children: Children) -> None:
    """A save whose lease begins while a checkpoint is being deleted (trash written, manifest not
    yet removed) may still see and reuse that checkpoint's chunks; gc must keep them."""
    path = tmp_path / "bank"
    with wb.open(path) as b:
        a = b.save(make_state("r", 0), run="r", step=0, chunk_size=CHUNK)
    gate = tmp_path / "gate"  # the save's pack writes wait until a gc has run while it was in flight
    child = children.spawn("slow-save", path, "r", 1, 0.25, 0, 1, gate, stdin=True)
    read_line(child, "ready")

    started: list[int] = []

    def on_op(n: int, name: str, key: str) -> None:
        if name == "write" and key.startswith(TRASH) and not started:
            # delete() is writing its trash entry and has not removed the manifest yet:
            # the save starts now and lists manifests while the manifest is still there.
            started.append(n)
            assert child.stdin is not None
            child.stdin.write("go\n")
            child.stdin.flush()
            read_line(child, "writing")

    bank = wb.Bank(FaultStorage(LocalStorage(path), on_op=on_op))
    bank.delete(a.id)
    bank.storage.on_op = None  # type: ignore[attr-defined]
    rounds = 0
    while child.poll() is None:
        bank.gc(grace=0)
        rounds += any(bank.storage.list(LEASES))  # the save was in flight during the whole gc
        if rounds >= 1:
            gate.touch()
    assert rounds >= 1
    lines = finish(child)
    _, b_id, reused, _ = next(line for line in lines if line.startswith("saved")).split()
    assert int(reused) > 0, "the save should have reused the deleted checkpoint's chunks"
    assert_same_state(bank.load(b_id), make_state("r", 1))
    check_bank(path, must_have={b_id})


def test_prune_and_gc_in_a_loop_while_processes_save(tmp_path: Path, children: Children) -> None:
    """Two processes save while this one prunes and collects with grace=0 as fast as it can."""
    path = tmp_path / "bank"
    bank = wb.open(path)
    for run in ("x", "y"):
        children.spawn("saver", path, run, ",".join(map(str, range(8))), stdin=True)
    for proc in children.procs:
        read_line(proc, "ready")
    for proc in children.procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    pruned: set[str] = set()
    collected = 0

    def prune_and_collect() -> None:
        nonlocal collected
        for run in ("x", "y"):
            if run in bank.runs():
                pruned.update(bank.prune(run=run, keep_last=2).deleted)
        collected += len(bank.gc(grace=0).packs_deleted)

    while True:  # at least one round starts while the savers start, however fast they are
        prune_and_collect()
        if all(proc.poll() is not None for proc in children.procs):
            break
    reported = {
        line.split()[1]: line for proc in children.procs for line in finish(proc) if line.startswith("saved")
    }
    assert len(reported) == 16
    prune_and_collect()  # once more with no save in flight: everything but the last 2 per run goes
    assert len(pruned) == 12 and collected > 0
    log = check_bank(path, must_have=set(reported) - pruned)
    assert pruned.isdisjoint(log)
    bank.close()


def test_stale_lease_of_a_killed_save_is_dropped_with_its_orphan_pack(
    tmp_path: Path, children: Children
) -> None:
    path = tmp_path / "bank"
    bank = wb.open(path)
    a = bank.save(make_state("r", 0), run="r", step=0, chunk_size=CHUNK)
    child = children.spawn("slow-save", path, "r", 1, 0, 1, 0)
    read_line(child, "durable")  # its pack is committed, its manifest not yet written
    [inflight] = _packs(bank) - set(bank.show(a.id).packs)

    report = bank.gc(grace=0)
    assert report.packs_kept_for_inflight == 1 and report.packs_deleted == ()
    assert inflight in _packs(bank)

    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)  # reaped: its pid is gone, not a zombie
    assert len(list(bank.storage.list(LEASES))) == 1, "the killed save leaves its lease behind"
    verified = bank.verify()
    assert verified.ok and [p.key for p in verified.problems if p.kind == "orphan"] == [inflight]
    report = bank.gc(grace=0)
    assert report.leases_dropped == 1 and report.packs_deleted == (inflight,)
    assert list(bank.storage.list(LEASES)) == []
    assert bank.verify().problems == ()
    assert_same_state(bank.load(a.id), make_state("r", 0))
    bank.close()


def test_gc_and_deletes_in_threads_while_other_threads_save(tmp_path: Path) -> None:
    """One Bank shared by saving threads and a thread that deletes, prunes and collects."""
    path = tmp_path / "bank"
    bank = wb.open(path, workers=2)
    for s in range(3):
        bank.save(make_state("victim", s), run="victim", step=s, chunk_size=CHUNK)
    saved: dict[str, tuple[str, int]] = {}
    errors: list[BaseException] = []
    stop = threading.Event()

    def saver(run: str) -> None:
        try:
            for s in range(6):
                info = bank.save(make_state(run, s), run=run, step=s, chunk_size=CHUNK)
                saved[info.id] = (run, s)
        except BaseException as e:
            errors.append(e)

    def collector() -> None:
        try:
            step = 3
            while not stop.is_set():
                bank.save(make_state("victim", step), run="victim", step=step, chunk_size=CHUNK)
                bank.prune(run="victim", keep_last=1)
                bank.gc(grace=0)
                step += 1
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=saver, args=(f"t{i}",)) for i in range(3)]
    gc_thread = threading.Thread(target=collector)
    gc_thread.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    stop.set()
    gc_thread.join(timeout=120)
    assert not errors, errors
    assert len(saved) == 18
    for cid, (run, s) in saved.items():
        assert_same_state(bank.load(cid), make_state(run, s))
    bank.close()
    check_bank(path, must_have=set(saved))


def test_delete_cut_short_before_its_trash_stamp_is_collected_by_one_gc(tmp_path: Path) -> None:
    """A delete that removed the manifest but died before stamping its trash entry with the
    deletion time leaves an entry gc must date itself: kept while unknown, freed by one gc(grace=0)."""
    path = tmp_path / "bank"
    bank = wb.open(path)
    keep = bank.save(make_state("r", 0), run="r", step=0, chunk_size=CHUNK)
    doomed = bank.save(make_state("r", 1), run="r", step=1, chunk_size=CHUNK)
    own = set(bank.show(doomed.id).packs) - set(bank.show(keep.id).packs)
    assert own, "the doomed checkpoint should have a pack of its own"
    # The trash entry, the catalog's delete entry and its head land, the manifest goes, the stamp fails.
    faulty = wb.Bank(FaultStorage(LocalStorage(path), fail_after_writes=3))
    with pytest.raises(OSError, match="injected fault"):
        faulty.delete(doomed.id)
    assert [c.id for c in bank.log()] == [keep.id]
    [entry] = bank.storage.list(TRASH)
    assert json.loads(bank.storage.read(entry.key))["deleted_at"] is None

    report = bank.gc(grace=0)
    assert set(report.packs_deleted) == own and report.trash_dropped == 1
    assert list(bank.storage.list(TRASH)) == []
    check_bank(path, must_have={keep.id})
    bank.close()


def test_gc_sweeps_temp_files_of_dead_writers_only(tmp_path: Path) -> None:
    import subprocess
    import sys

    import weightbank as wb

    bank = wb.open(tmp_path / "b")
    tmp = tmp_path / "b" / "tmp"
    tmp.mkdir(exist_ok=True)
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True
    )
    leftover = tmp / f"{int(dead.stdout)}-deadbeef.part"
    leftover.write_bytes(b"x" * 1000)
    w = bank.storage.open_writer("packs/zz/live-0.pack")  # a write in progress in this process
    w.write(b"y" * 10)
    report = bank.gc(grace=0)
    assert report.incomplete_bytes_freed == 1000 and not leftover.exists()
    w.commit()
    assert bank.storage.read("packs/zz/live-0.pack") == b"y" * 10, "a live write is never swept"
    assert bank.gc(grace=0, dry_run=True).incomplete_bytes_freed == 0
