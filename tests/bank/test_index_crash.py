"""Crashes and races with the catalog index in place: nothing committed is lost, nothing deleted comes back.

* Kill sweeps (``test_crash.py``'s machinery, through ``_index_child.py``):
  SIGKILL before every storage operation that changes the bank, during a
  save whose commit compacts the index, during a compaction with work
  waiting (adds, a delete, a dead save's add entry, a delete cut short), and
  during a delete + prune + gc. After each kill a fresh open answers from
  the index (no fallback), exactly as a listing of the manifests does; every
  checkpoint committed before the kill loads bit-exact and none deleted
  reappears (:func:`~tests.bank.faults.check_bank`); ``repair_index`` then
  leaves ``verify`` clean and the index goes on compacting.
* Two processes saving into one run and compacting after every save, on a
  local directory and on SeaweedFS: every save is visible afterwards, the log
  order is the manifests' order, verify is clean.
* Two races found here, replayed deterministically with storage hooks.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import weightbank as wb
from weightbank.bank import catalog as catalog_module
from weightbank.bank.index import gc as index_gc
from weightbank.bank.layout import (
    INDEX_LOG,
    INDEX_PAGES,
    INDEX_ROOTS,
    LEASES,
    MANIFESTS,
    PACKS,
    TAGS,
    TRASH,
    manifest_key,
)
from weightbank.storage import LocalStorage

from ._index_child import INDEX_SCENARIOS, build_index_base
from .faults import CHUNK, Children, FaultStorage, check_bank, make_state, read_line
from .indexcheck import assert_views_agree, index_snapshot, oracle

INDEX_CHILD = Path(__file__).with_name("_index_child.py")

#: Operations that change what the bank holds: a kill just before each one leaves every distinct
#: state a crash can leave (a kill before a read leaves the state of a kill before the next change).
CHANGES = frozenset({"write", "writer.commit", "put_ref", "delete"})
#: The kinds of object a bank holds (the sampled sweep kills before the first change to each kind).
KINDS = (INDEX_LOG, INDEX_ROOTS, INDEX_PAGES, "index/", MANIFESTS, PACKS, LEASES, TRASH, TAGS, "refs/")


def _spawn(children: Children, mode: str, *args: object, stdin: bool = False, cwd: str | None = None) -> Any:
    proc = subprocess.Popen(
        [sys.executable, str(INDEX_CHILD), mode, *(str(a) for a in args)],
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        bufsize=1,
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    children.procs.append(proc)
    return proc


def _expected_after(ops: list[tuple[str, str]], done: int, before: set[str]) -> tuple[set[str], int]:
    """From the first ``done`` operations: which checkpoints of ``before`` survive, and how many new
    manifests were committed."""
    survivors, committed = set(before), 0
    for name, key in ops[:done]:
        if name == "write" and key.startswith(MANIFESTS):
            committed += 1
        if name == "delete" and key.startswith(MANIFESTS):
            survivors -= {cid for cid in before if manifest_key(cid) == key}
    return survivors, committed


def _check_index(path: str | Path, base: dict[str, Any]) -> set[str]:
    """A fresh open answers from the index, exactly as a listing; the dead save stays invisible. The ids."""
    with wb.open(path, create=False) as fresh:
        assert not fresh._catalog.scanning, fresh._catalog.damage  # and no fallback warning (an error here)
        truth = oracle(fresh.storage)
        assert_views_agree(index_snapshot(fresh), truth, metrics=("x",))
        assert base["dangling"] not in truth.records
        with pytest.raises(wb.CheckpointNotFound):
            fresh.resolve(base["dangling"])
        return set(truth.records)


def _after_repair(path: str | Path) -> None:
    with wb.open(path, create=False) as bank:
        bank.repair_index()
        assert bank.verify().problems == ()
        bank.save(make_state("r", 7), run="r", step=7, chunk_size=CHUNK)
        bank.compact()
    with wb.open(path, create=False) as fresh:
        assert not fresh._catalog.scanning
        assert_views_agree(index_snapshot(fresh), oracle(fresh.storage), metrics=("x",))
        assert {p.kind for p in fresh.verify().problems} <= {"orphan"}


def _run_here(scenario: str, bank: wb.Bank) -> None:
    """Run a scenario in this process, then put back the constants it sets for its own worker."""
    saved = catalog_module.COMPACT_EVERY, index_gc.PAGE_GRACE
    try:
        INDEX_SCENARIOS[scenario](bank)
    finally:
        catalog_module.COMPACT_EVERY, index_gc.PAGE_GRACE = saved


def _sweep(tmp_path: Path, scenario: str, children: Children, *, sample: bool) -> None:
    base_dir = tmp_path / "base"
    base = build_index_base(base_dir)
    visible_before = _check_index(base_dir, base)
    assert visible_before == set(base["ids"]) - set(base["deleted"])

    shutil.copytree(base_dir, tmp_path / "count")
    counter = FaultStorage(LocalStorage(tmp_path / "count"))
    _run_here(scenario, wb.Bank(counter, workers=2))
    ops = list(counter.ops)
    assert any(n == "put_ref" and k.startswith(INDEX_ROOTS) for n, k in ops), "the scenario should compact"
    points = [i for i, (n, _) in enumerate(ops, 1) if n in CHANGES] + [len(ops) + 1]
    if sample:  # the first change of each kind to each kind of object, and the end
        firsts: dict[tuple[str, str], int] = {}
        for i in points[:-1]:
            name, key = ops[i - 1]
            firsts.setdefault((name, next((p for p in KINDS if key.startswith(p)), key)), i)
        points = [*sorted(firsts.values()), points[-1]]

    jobs = []
    for n in points:
        d = tmp_path / f"kill{n:03d}"
        shutil.copytree(base_dir, d)
        jobs.append([str(d), n, False, False])
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    proc = _spawn(children, "sweep", scenario, tmp_path / "jobs.json", cwd=str(tmp_path))
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err
    results = json.loads(next(line for line in out.splitlines() if line.startswith("result "))[7:])

    assert len(results) == len(points)
    for n, res in zip(points, results, strict=True):
        where = f"{scenario}: killed at op {n}/{len(ops)} {ops[n - 1] if n <= len(ops) else 'end'}"
        if n <= len(ops):
            assert res.get("signal") == signal.SIGKILL, f"{where}: worker was not killed: {res}"
        else:
            assert res.get("exit") == 0, f"{where}: {res}"
        survivors, committed = _expected_after(ops, n - 1, visible_before)
        visible = _check_index(res["dir"], base)
        assert visible & visible_before == survivors, f"{where}: lost or resurrected checkpoints"
        assert len(visible - visible_before) == committed, where
        check_bank(res["dir"], must_have=survivors)
        _after_repair(res["dir"])


SCENARIO_IDS = list(INDEX_SCENARIOS)


@pytest.mark.parametrize("scenario", SCENARIO_IDS)
def test_sigkill_at_each_kind_of_change_keeps_the_index_exact(
    tmp_path: Path, scenario: str, children: Children
) -> None:
    _sweep(tmp_path, scenario, children, sample=True)


@pytest.mark.slow
@pytest.mark.parametrize("scenario", SCENARIO_IDS)
def test_sigkill_before_every_change_keeps_the_index_exact(
    tmp_path: Path, scenario: str, children: Children
) -> None:
    _sweep(tmp_path, scenario, children, sample=False)


def test_the_sweeps_cross_every_phase_of_the_index_protocol(
    tmp_path: Path,
) -> None:
    """The kill points really cut the index protocol everywhere: entry before manifest, pages before root,
    root before the folded entries go; a delete's trash, entry, manifest removal."""
    build_index_base(tmp_path / "b")
    ops: dict[str, list[tuple[str, str]]] = {}
    for scenario in SCENARIO_IDS:
        shutil.copytree(tmp_path / "b", tmp_path / scenario)
        counter = FaultStorage(LocalStorage(tmp_path / scenario))
        _run_here(scenario, wb.Bank(counter, workers=2))
        ops[scenario] = list(counter.ops)

    def first(scenario: str, op: str, prefix: str) -> int:
        return next(i for i, (n, k) in enumerate(ops[scenario]) if n == op and k.startswith(prefix))

    save = [
        first("index-save", "put_ref", INDEX_LOG),
        first("index-save", "write", MANIFESTS),
        first("index-save", "delete", LEASES),
        first("index-save", "write", INDEX_PAGES),
        first("index-save", "put_ref", INDEX_ROOTS),
        first("index-save", "delete", INDEX_LOG),
        first("index-save", "put_ref", TAGS),
    ]
    assert save == sorted(save), ops["index-save"]
    compact = [
        first("index-compact", op, p)
        for op, p in (("write", INDEX_PAGES), ("put_ref", INDEX_ROOTS), ("delete", INDEX_LOG))
    ]
    assert compact == sorted(compact)
    gc = [
        first("index-gc", op, p)
        for op, p in (("write", TRASH), ("put_ref", INDEX_LOG), ("delete", MANIFESTS))
    ]
    assert gc == sorted(gc)
    assert any(n == "delete" and k.startswith(INDEX_PAGES) for n, k in ops["index-gc"]), "gc sweeps pages"


# -- two processes ---------------------------------------------------------------------------------


@pytest.fixture(params=["local", pytest.param("s3", marks=pytest.mark.s3)])
def where(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "local":
        return str(tmp_path / "bank")
    srv = request.getfixturevalue("seaweed")
    monkeypatch.setenv("WEIGHTBANK_STORAGE_OPTIONS", json.dumps(srv.storage_options()))
    return str(request.getfixturevalue("s3_url"))


def test_two_processes_saving_one_run_and_compacting_at_once(where: str, children: Children) -> None:
    wb.open(where).close()
    plans = [list(range(0, 16, 2)), list(range(1, 16, 2))]
    for steps in plans:
        _spawn(children, "compacting-saver", where, "r", ",".join(map(str, steps)), stdin=True)
    for proc in children.procs:
        read_line(proc, "ready")
    for proc in children.procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
    saved: dict[str, int] = {}
    published = 0
    for proc in children.procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        for line in out.splitlines():
            word, *rest = line.split()
            if word == "saved":
                saved[rest[0]] = int(rest[2])
            elif word == "compacted":
                published += int(rest[0]) > 0
    assert len(saved) == 16 and published >= 2

    with wb.open(where, create=False) as fresh:
        assert not fresh._catalog.scanning
        truth = oracle(fresh.storage)
        assert set(truth.records) == set(saved), "every save is committed and listed"
        assert_views_agree(index_snapshot(fresh), truth)
        assert [c.id for c in fresh.log()] == [r.id for r in truth.recent(100)]
        assert [c.id for c in fresh.log("r")] == [r.id for r in truth.members("r")][::-1]
        for cid, step in saved.items():
            assert fresh.resolve(f"r@{step}") == cid
        assert fresh.resolve("r@latest") == truth.members("r")[-1].id
        assert fresh.verify().problems == ()
    check_bank(where, must_have=set(saved))


# -- races, replayed ---------------------------------------------------------------------------------


def test_a_save_committing_while_a_compaction_looks_is_not_dropped(tmp_path: Path) -> None:
    """A save that commits and drops its lease while a compaction decides about its add entry is not dropped."""
    path = tmp_path / "bank"
    with wb.open(path) as bank:
        bank.save({"w": torch.zeros(4)}, run="r", step=0)
    at_manifest, go, done = threading.Event(), threading.Event(), threading.Event()

    def saver_hook(n: int, name: str, key: str) -> None:
        if name == "write" and key.startswith(MANIFESTS):
            at_manifest.set()
            go.wait(30)

    def compactor_hook(n: int, name: str, key: str) -> None:
        if name == "list" and key.startswith(LEASES):
            go.set()  # the save commits and drops its lease while this compaction looks
            done.wait(30)

    saver = wb.Bank(FaultStorage(LocalStorage(path), on_op=saver_hook))
    compactor = wb.Bank(FaultStorage(LocalStorage(path), on_op=compactor_hook))
    saved: dict[str, str] = {}

    def save() -> None:
        try:
            saved["id"] = saver.save({"w": torch.ones(4)}, run="r", step=1).id
        finally:
            done.set()

    thread = threading.Thread(target=save)
    thread.start()
    assert at_manifest.wait(30)
    compactor.compact()
    thread.join(30)
    with wb.open(path, create=False) as fresh:
        assert fresh.resolve("r@latest") == saved["id"]
        assert fresh.verify().problems == ()


def test_gc_without_grace_during_a_compaction_keeps_its_pages(tmp_path: Path) -> None:
    """gc(grace=0) in another process, between a compaction's pages and its root, leaves the pages."""
    path = tmp_path / "bank"
    with wb.open(path) as bank:
        for step in range(3):
            bank.save({"w": torch.full((2,), float(step))}, run="r", step=step)

    def before_root(n: int, name: str, key: str) -> None:
        if name == "put_ref" and key.startswith(INDEX_ROOTS):
            time.sleep(0.02)  # the pages' mtimes fall before gc's start
            with wb.open(path, create=False) as other:
                other.gc(grace=0)

    wb.Bank(FaultStorage(LocalStorage(path), on_op=before_root)).compact()
    with wb.open(path, create=False) as fresh:
        assert not fresh._catalog.scanning
        assert fresh.resolve("r@1")
        assert not fresh._catalog.scanning
        assert fresh.verify().problems == ()
