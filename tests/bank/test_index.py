"""The catalog index answers exactly what a listing of every manifest answers, however it is reached.

* Every ref kind and every catalog query, from a fresh ``wb.open`` (the index),
  equals what a :class:`~weightbank.bank.listing.ScanView` of all manifests
  says — after many saves with compactions in between, deletes (pending and
  folded, of a run's newest and of its best), prunes, and runs spanning many
  pages (page sizes shrunk so splits are cheap; one slow test keeps the real
  sizes).
* Damage to one index object at a time: the catalog warns once, answers
  exactly from a listing, ``verify`` names the damage, ``repair_index``
  clears it.
* A save that died between its add entry and its manifest stays invisible;
  compaction holds its entry while the lease lives and drops it after; a
  delete cut short between its entry and the manifest removal leaves the
  checkpoint visible.
* A format-1 bank (``tests/data/legacy_v1_bank``) reads by listing, upgrades
  explicitly or on its first save, and a too-new marker is refused.
* Opening a bank and resolving a tag, a best, or the newest 20 issue as many
  storage requests with 200 checkpoints as with 10.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import weightbank as wb
from weightbank.bank import leases, marker
from weightbank.bank.catalog import IndexFallbackWarning
from weightbank.bank.index import compact as compact_module
from weightbank.bank.index.store import ADD, Head, read_entry, read_head_state, read_root
from weightbank.bank.index.view import list_gens, list_seqs
from weightbank.bank.layout import (
    FORMAT_KEY,
    INDEX_HEAD,
    INDEX_ROOTS,
    LEASES,
    MANIFESTS,
    log_key,
    manifest_key,
)
from weightbank.bank.marker import bank_version, init_storage
from weightbank.format.hashing import digest
from weightbank.format.manifest import Manifest
from weightbank.format.sealed import seal
from weightbank.storage import CountingStorage, LocalStorage
from weightbank.storage.base import Storage
from weightbank.storage.memory import MemoryStorage, forget

from .faults import FaultStorage, dead_pid
from .indexcheck import (
    assert_views_agree,
    commit_copy,
    delete_run_page,
    drop_ref,
    flip_root_byte,
    forget_done,
    garble_ref,
    index_snapshot,
    missing_page_root,
    one_document,
    oracle,
    outcomes,
    pending_seqs,
    scan_outcomes,
    small_pages,
    twins,
)

LEGACY = Path(__file__).resolve().parents[1] / "data" / "legacy_v1_bank"
LEGACY_EXPECTED = LEGACY.with_name("legacy_v1_expected.json")


@pytest.fixture(params=["local", "memory"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "local":
        yield str(tmp_path / "bank")
        return
    name = f"index-{tmp_path.name}"
    yield f"memory://{name}"
    forget(name)


def _state(run: str, step: int, salt: float = 0.0) -> dict[str, object]:
    return {"w": torch.full((3,), float(step) + salt), "run": run}


# -- 1. every ref kind: index == listing -----------------------------------------------------------


class History:
    """The bank the equivalence test builds, with what each ref must name (the model)."""

    def __init__(self, bank: wb.Bank) -> None:
        self.bank = bank
        self.ids: dict[tuple[str, int], str] = {}  # (run, step) -> the original checkpoint
        self.every: list[str] = []  # every id ever committed (deleted ones too)

    def save(self, run: str, step: int, *, salt: float = 0.0, **kw: Any) -> str:
        cid = self.bank.save(_state(run, step, salt), run=run, step=step, codec="zstd", **kw).id
        self.ids.setdefault((run, step), cid)
        self.every.append(cid)
        return cid

    def refs(self, runs: list[str], extra: list[str]) -> list[str]:
        refs = ["prod", "prod@{1}", "prod@{2}", "prod@{3}", "prod@{4}", "prod@{9}", "prod~1", "prod~2"]
        refs += ["candidate", "candidate@{1}", "no-such-tag", "prod@latest"]
        for run in [*runs, "no-such-run"]:
            refs += [f"{run}@latest", f"{run}@latest~1", f"{run}@latest~3", f"{run}@latest~"]
            refs += [f"{run}@best:{m}" for m in ("val", "val:min", "val:max", "acc:max", "acc", "none")]
            refs += [f"{run}@{s}" for s in range(62)] + [
                f"{run}@{s}~{u}" for s in range(0, 62, 3) for u in (1, 2)
            ]
        for i, cid in enumerate(self.every + extra):
            refs += [cid, cid[:6], cid[:9]] + ([f"{cid[:12]}~1"] if i % 3 == 0 else [])
        return [*refs, "000000", "ffffff", "abc"]


def _check(url: str, history: History, runs: list[str], extra: list[str]) -> dict[str, str]:
    """A fresh open answers every query and ref exactly as a listing does; the answers by ref."""
    fresh = wb.open(url, create=False)
    try:
        assert not fresh._catalog.scanning
        assert_views_agree(index_snapshot(fresh), oracle(fresh.storage), metrics=("val", "acc"))
        refs = history.refs(runs, extra)
        got = outcomes(fresh, refs)
        assert got == scan_outcomes(fresh.storage, refs)
        assert [c.id for c in fresh.log()] == [r.id for r in oracle(fresh.storage).recent(10**6)]
        assert [c.id for c in fresh.log(limit=7)] == [r.id for r in oracle(fresh.storage).recent(7)]
        for run in runs:
            assert [c.id for c in fresh.log(run, limit=5)] == [
                r.id for r in oracle(fresh.storage).members(run)
            ][::-1][:5]
        return got
    finally:
        fresh.close()


def test_every_ref_resolves_from_the_index_as_from_a_listing(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    small_pages(monkeypatch, page=4, every=3)
    bank = wb.open(url)
    h = History(bank)
    nan = float("nan")
    # run a: 50 checkpoints over 13+ pages of 4; val ties at its minimum 0.1 (steps 0, 7, ..., 49),
    # acc ties at its maximum 4 (steps 40-49); a NaN and a missing metric never rank.
    for step in range(50):
        metrics: dict[str, float] = {"val": 0.1 + (step % 7) / 10, "acc": float(step // 10)}
        if step == 3:
            metrics["val"] = nan
        if step == 11:
            metrics = {}
        h.save("a", step, metrics=metrics)
    a = {s: h.ids["a", s] for s in range(50)}
    # run b: a rollback re-save (meta resave_of, the manager's mark), an older manager's rollback
    # copy (trigger rollback, parent at the same step), one step saved twice unmarked, and a step
    # whose original will be deleted, leaving only re-saves.
    for step in range(10):
        h.save("b", step, metrics={"val": 1.0 - step / 10})
    b = {s: h.ids["b", s] for s in range(10)}
    resave5 = h.save("b", 5, salt=0.5, parent=b[5], meta={"resave_of": b[5], "trigger": "rollback"})
    copy6 = h.save("b", 6, salt=0.5, parent=b[6], meta={"trigger": "rollback"})
    twice7 = h.save("b", 7, salt=0.5)
    resave8 = [h.save("b", 8, salt=0.5 + i, parent=b[8], meta={"resave_of": b[8]}) for i in range(2)]
    bank.tag("prod", a[10])
    bank.tag("prod", a[20])
    bank.tag("prod", b[3])
    bank.untag("prod")
    bank.tag("prod", a[30])
    bank.tag("candidate", a[49])
    # two checkpoints whose ids share 6 hex characters: that prefix is ambiguous
    t1, t2 = (commit_copy(bank, m) for m in twins(bank._catalog.get(a[0]), "twins"))
    assert t1[:6] == t2[:6] and t1 != t2
    h.every += [t1, t2]
    runs = ["a", "b", "twins"]

    got = _check(url, h, runs, [])
    assert got["a@best:val"] == a[49], "ties on the best value go to the newest"
    assert got["a@best:val:max"] == a[48]
    assert got["a@best:acc:max"] == a[49] and got["a@best:acc"] == a[9]
    assert got["a@best:none"] == "!CheckpointNotFound"
    assert got["a@latest"] == a[49] and got["a@latest~3"] == a[46]
    assert got["b@5"] == b[5] and got["b@6"] == b[6], "run@step never names a rollback's re-save"
    assert got["b@7"] == twice7, "a step saved twice unmarked resolves to the newer"
    assert got["b@latest"] == resave8[1]
    assert got["prod"] == a[30] and got["prod@{1}"] == "!TagNotFound" and got["prod@{2}"] == b[3]
    assert got["prod@{9}"] == "!NoHistory" and got["prod~1"] == a[29]
    assert got[t1[:6]] == "!AmbiguousRef" and got[t1[:9]] == t1 and got[t2] == t2
    assert got[resave5] == resave5 and got[copy6[:9]] == copy6
    assert got["twins@latest"] in (t1, t2)

    # Deletes still in the log: the run's newest and best (a@49), the original of b@8, one mid-page.
    for cid in (a[49], b[8], a[25]):
        bank.delete(cid, force=True)
    assert pending_seqs(bank.storage)
    got = _check(url, h, runs, [])
    assert got["a@latest"] == a[48] and got["a@best:val"] == a[42] and got["a@best:acc:max"] == a[48]
    assert got["b@8"] == resave8[1], "only re-saves left: the newest of them"
    assert got["candidate"] == "!CheckpointNotFound" and got[a[49]] == "!CheckpointNotFound"
    assert got["a@25"] == "!CheckpointNotFound" and got["a@27~1"] == a[26]

    bank.compact()
    assert not pending_seqs(bank.storage)
    assert _check(url, h, runs, []) == got

    # The newest and the best once they are folded into the root's pages, deleted (pending again).
    bank.delete(a[48])
    got = _check(url, h, runs, [])
    assert got["a@latest"] == a[47] and got["a@best:acc:max"] == a[47] and got["a@best:val"] == a[42]
    bank.delete(a[42])
    got = _check(url, h, runs, [])
    assert got["a@best:val"] == a[35]

    # Prune (tagged ones kept), then saves that compact in between, then a prune of everything old.
    report = bank.prune(run="a", keep_last=12)
    assert a[30] not in report.deleted and a[20] in report.deleted
    _check(url, h, runs, [])
    for step in range(50, 60):
        h.save("a", step, metrics={"val": 0.1, "acc": 4.0})
    got = _check(url, h, runs, [])
    assert got["a@best:val"] == h.ids["a", 59] and got["a@best:acc:max"] == h.ids["a", 59]
    bank.prune(keep_last=3)
    got = _check(url, h, runs, [])
    assert got["prod"] == a[30] and got["b@latest"] == resave8[1]
    bank.compact()
    assert _check(url, h, runs, []) == got
    bank.untag("candidate")  # it named a checkpoint since deleted (verify says so)
    assert not [p for p in bank.verify().problems if p.kind != "orphan"]
    bank.close()


@pytest.mark.slow
def test_runs_longer_than_one_real_page_resolve_exactly(tmp_path: Path) -> None:
    """300 checkpoints in one run at the real page sizes (128 per run page, 256 per id page)."""
    url = str(tmp_path / "bank")
    bank = wb.open(url)
    h = History(bank)
    for step in range(300):
        h.save("big", step, metrics={"val": float(step % 50), "acc": float(step // 100)})
    h.save("small", 0, metrics={"val": 0.0})
    got = _check(url, h, ["big", "small"], [])
    root = read_root(bank.storage, list_gens(bank.storage)[-1])
    assert root is not None and root.runs["big"][0] >= 256, "the run should span several pages"
    assert got["big@best:val"] == h.ids["big", 250] and got["big@best:val:max"] == h.ids["big", 299]
    for step in (299, 250, 200, 0, 128, 127):
        bank.delete(h.ids["big", step])
    got = _check(url, h, ["big", "small"], [])
    assert got["big@latest"] == h.ids["big", 298] and got["big@best:val"] == h.ids["big", 150]
    bank.compact()
    assert _check(url, h, ["big", "small"], []) == got
    bank.close()


def test_a_parent_step_onto_a_deleted_checkpoint_is_not_found(tmp_path: Path) -> None:
    with wb.open(tmp_path / "bank") as bank:
        ids = [bank.save(_state("r", s), run="r", step=s).id for s in range(4)]
        bank.delete(ids[1])
        with pytest.raises(wb.CheckpointNotFound):
            bank.resolve("r@2~1")
        with pytest.raises(wb.CheckpointNotFound):
            bank.resolve("r@3~2")
        with pytest.raises(wb.CheckpointNotFound):
            bank.resolve("r@2~2")


# -- 2. damage, one object at a time ---------------------------------------------------------------


def _damage_flip_root(bank: wb.Bank) -> str:
    return flip_root_byte(bank.storage)


def _damage_delete_page(bank: wb.Bank) -> str:
    return delete_run_page(bank.storage, "r")


def _damage_gap(bank: wb.Bank) -> str:
    seqs = pending_seqs(bank.storage)
    assert len(seqs) >= 3
    drop_ref(bank.storage, log_key(seqs[len(seqs) // 2]))
    return log_key(seqs[len(seqs) // 2])


def _damage_garbage_entry(bank: wb.Bank) -> str:
    key = log_key(max(list_seqs(bank.storage)) + 1)
    garble_ref(bank.storage, key)
    return key


def _damage_garbage_over_entry(bank: wb.Bank) -> str:
    key = log_key(pending_seqs(bank.storage)[0])
    garble_ref(bank.storage, key, b'{"not": "sealed"}')
    forget_done(bank.storage)  # else readers take the entry from the head (see the test below)
    return key


def _damage_missing_page_root(bank: wb.Bank) -> str:
    return missing_page_root(bank.storage)


DAMAGE: dict[str, Callable[[wb.Bank], str]] = {
    "flip-root-byte": _damage_flip_root,
    "delete-page": _damage_delete_page,
    "log-gap": _damage_gap,
    "garbage-entry": _damage_garbage_entry,
    "garbage-over-entry": _damage_garbage_over_entry,
    "root-names-missing-page": _damage_missing_page_root,
}
LAZY_DAMAGE = {"delete-page", "root-names-missing-page"}


def _damaged_bank(path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, str], list[str], list[str]]:
    """A bank with a compacted root over several pages and three entries pending; (answers, refs, log ids)."""
    small_pages(monkeypatch, page=4, every=1000)
    with wb.open(path) as bank:
        ids = [
            bank.save(_state("r", s), run="r", step=s, metrics={"val": float(s % 4)}).id for s in range(12)
        ]
        bank.tag("prod", ids[3])
        bank.tag("prod", ids[5])
        bank.delete(ids[0])
        bank.compact()
        ids += [bank.save(_state("r", s), run="r", step=s, metrics={"val": 0.0}).id for s in (12, 13)]
        bank.delete(ids[1])
        bank.gc(grace=0)  # no orphans: verify then reports the damage and nothing else
        assert len(pending_seqs(bank.storage)) == 3
        refs = ["prod", "prod@{1}", "r@latest", "r@best:val", "r@best:val:max", "r@2", "r@0", "r@13~2"]
        refs += [c[:8] for c in ids] + ["r@latest~20"]
        answers = outcomes(bank, refs)
        assert answers == scan_outcomes(bank.storage, refs)
        return answers, refs, [c.id for c in bank.log()]


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_index_answers_exactly_from_a_listing_and_verify_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    path = tmp_path / "bank"
    answers, refs, log_ids = _damaged_bank(path, monkeypatch)
    with wb.open(path) as bank:
        key = DAMAGE[damage](bank)
    bank = wb.open(path)
    with pytest.warns(IndexFallbackWarning):
        assert outcomes(bank, refs) == answers
    assert bank._catalog.scanning and bank._catalog.damage is not None
    # once per catalog: no second warning (warnings are errors here)
    assert [c.id for c in bank.log()] == log_ids and outcomes(bank, refs) == answers
    assert bank.runs() == ["r"]
    report = bank.verify()
    index = [p for p in report.problems if p.kind == "index"]
    assert index and index[0].key == key, report.problems
    assert {p.kind for p in report.problems} == {"index"}
    bank.close()


def test_a_damaged_entry_the_head_lists_as_done_answers_from_the_copy_and_verify_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "bank"
    answers, refs, log_ids = _damaged_bank(path, monkeypatch)
    with wb.open(path) as bank:
        key = log_key(pending_seqs(bank.storage)[0])
        garble_ref(bank.storage, key, b'{"not": "sealed"}')
    bank = wb.open(path)
    assert outcomes(bank, refs) == answers  # warnings are errors: no fallback either
    assert not bank._catalog.scanning and [c.id for c in bank.log()] == log_ids
    report = bank.verify()
    assert [(p.kind, p.key) for p in report.problems] == [("index", key)], report.problems
    bank.repair_index()
    assert not bank.verify().problems and outcomes(bank, refs) == answers
    bank.close()


def test_a_head_copy_that_differs_from_its_entry_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "bank"
    _damaged_bank(path, monkeypatch)
    with wb.open(path) as bank:
        head = read_head_state(bank.storage)
        seq = max(head.done)
        other = dataclasses.replace(head.done[seq], save_ids=("forged",))
        forged = Head(head.seq, head.token, {**head.done, seq: other})
        bank.storage.put_ref(INDEX_HEAD, seal(forged.body()), head.token)
        problems = bank.verify().problems
        assert [(p.kind, p.key) for p in problems] == [("index", log_key(seq))], problems
        assert "head's copy" in problems[0].detail


def test_a_checkpoint_committed_again_after_its_delete_stays_visible_through_compactions(
    tmp_path: Path,
) -> None:
    """The same id deleted then committed again (only a copied manifest does that): the delete's done
    copy and the held delete must not hide it, from a fresh reader or from the next compactions."""
    path = tmp_path / "bank"
    with wb.open(path) as bank:
        first = bank.save(_state("r", 0), run="r", step=0).id
        manifest = bank._catalog.get(first)
        cid = commit_copy(bank, manifest)
        bank.compact()
        bank.delete(cid)
        assert commit_copy(bank, manifest) == cid
        bank.compact()
        for _ in range(2):
            fresh = wb.open(path)
            assert cid in [c.id for c in fresh.log()] and fresh.resolve(cid[:16]) == cid
            assert not [p for p in fresh.verify().problems if p.kind == "index"]
            fresh.close()
            bank._catalog.compact()


def test_the_heads_done_list_stays_bounded_and_an_older_head_reads_as_listing_nothing() -> None:
    from weightbank.bank.index import bloom
    from weightbank.bank.index.store import DEL, DONE_BYTES, DONE_MAX, LogEntry, mark_done, raise_head

    storage = MemoryStorage()
    storage.put_ref(INDEX_HEAD, seal({"seq": 3, "at": 0.0}), None)  # as the release before wrote it
    assert read_head_state(storage).seq == 3 and read_head_state(storage).done == {}
    big = bloom.build(f"{i:064x}" for i in range(40_000))  # a large model's save
    for seq in range(1, 3 * DONE_MAX):
        raise_head(storage, seq)
        chunks = big if seq % 2 else None
        mark_done(storage, LogEntry(seq, DEL, "ab" * 32, chunks=chunks), upto=0)
    head = read_head_state(storage)
    ref = storage.get_ref(INDEX_HEAD)
    assert ref is not None and len(ref.data) <= DONE_BYTES + 4096
    assert 0 < len(head.done) <= DONE_MAX and max(head.done) == 3 * DONE_MAX - 1  # the newest kept
    assert sorted(head.done) == list(range(min(head.done), 3 * DONE_MAX))
    raise_head(storage, 10 * DONE_MAX)
    assert read_head_state(storage).done == head.done  # raising the number keeps the copies


@pytest.mark.parametrize("marked", [True, False])
def test_a_fresh_reader_reads_no_entry_and_no_manifest_the_head_lists_as_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, marked: bool
) -> None:
    """The head's done list makes a fresh reader's cost independent of the entries waiting."""
    small_pages(monkeypatch, page=4, every=1000)
    path = tmp_path / "bank"
    with wb.open(path) as bank:
        for s in range(6):
            bank.save(_state("r", s), run="r", step=s, metrics={"val": float(s)})
        if not marked:
            forget_done(bank.storage)
    counting = CountingStorage(LocalStorage(path))
    bank = wb.Bank(counting)
    assert bank.resolve("r@best:val") == bank.log("r")[-1].id
    reads = counting.counts().get("get_ref", 0)
    looks = counting.counts().get("exists", 0)
    if marked:
        assert looks == 0 and reads <= 3, counting.counts()  # the marker, the head, no entry
    else:
        assert looks == 6 and reads >= 6, counting.counts()  # each entry read, each manifest looked for
    bank.close()


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_repair_index_clears_the_damage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str) -> None:
    path = tmp_path / "bank"
    answers, refs, log_ids = _damaged_bank(path, monkeypatch)
    with wb.open(path) as bank:
        DAMAGE[damage](bank)
    bank = wb.open(path)
    if damage not in LAZY_DAMAGE:  # the lazy kinds are not even noticed before a query reads the page
        with pytest.warns(IndexFallbackWarning):
            assert bank._catalog.scanning
    result = bank.repair_index()
    assert result.gen > 0 and result.folded == len(log_ids)
    assert not bank._catalog.scanning and bank._catalog.damage is None
    assert not [p for p in bank.verify().problems if p.kind == "index"]
    bank.close()
    with wb.open(path) as fresh:
        assert not fresh._catalog.scanning
        assert outcomes(fresh, refs) == answers
        assert [c.id for c in fresh.log()] == log_ids
        assert_views_agree(index_snapshot(fresh), oracle(fresh.storage))
        # the repaired index goes on: a save and a compaction keep it exact
        fresh.save(_state("r", 14), run="r", step=14)
        fresh.compact()
    with wb.open(path) as fresh:
        assert_views_agree(index_snapshot(fresh), oracle(fresh.storage))
        assert fresh.verify().problems == ()


def test_a_lost_root_is_noticed(tmp_path: Path) -> None:
    """Losing every root after the log was compacted away is a gap below the head (it once read as an empty bank)."""
    with wb.open(tmp_path / "bank") as bank:
        ids = [bank.save(_state("r", s), run="r", step=s).id for s in range(3)]
        bank.compact()
        assert list_seqs(bank.storage) == []
        for gen in list_gens(bank.storage):
            drop_ref(bank.storage, f"{INDEX_ROOTS}{gen:012d}.json")
    with wb.open(tmp_path / "bank") as bank, pytest.warns(IndexFallbackWarning):
        assert bank.resolve("r@latest") == ids[2]


def test_a_lost_newest_log_entry_is_noticed(tmp_path: Path) -> None:
    """Losing the newest log entry is a gap below the head (it once hid the newest checkpoint silently)."""
    with wb.open(tmp_path / "bank") as bank:
        ids = [bank.save(_state("r", s), run="r", step=s).id for s in range(3)]
        drop_ref(bank.storage, log_key(max(list_seqs(bank.storage))))
    with wb.open(tmp_path / "bank") as bank, pytest.warns(IndexFallbackWarning):
        assert bank.resolve("r@latest") == ids[2]


def test_compaction_removes_the_entries_it_folded(url: str) -> None:
    """Folded log entries and old roots go, so the log stays short and saves compact every
    COMPACT_EVERY entries (memory:// once kept every ref)."""
    every = compact_module.COMPACT_EVERY
    with wb.open(url) as bank:
        for step in range(every + 8):
            bank.save(_state("r", step), run="r", step=step)
        assert len(list_seqs(bank.storage)) == 8, "one compaction, 8 entries since"
        assert len(list_gens(bank.storage)) == 1
        for step in range(every + 8, 4 * every + 8):
            bank.save(_state("r", step), run="r", step=step)
        assert len(list_seqs(bank.storage)) == 8, "three more compactions, 8 entries since"
        assert len(list_gens(bank.storage)) <= 1 + compact_module.KEEP_ROOTS, "old roots go"


def test_log_limit_is_exact_when_deletes_thinned_the_recent_page_and_a_clock_lags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A save from a machine whose clock lags lands after deletes thinned the recent page: log(limit) stays exact."""
    """A save from a machine whose clock is behind lands after deletes thinned the recent page."""
    import types

    from weightbank.bank import bank as bank_module

    small_pages(monkeypatch, page=4, every=1000, recent=4)
    path = tmp_path / "bank"
    with wb.open(path) as bank:
        ids = [bank.save(_state("r", s), run="r", step=s).id for s in range(10)]
        bank.compact()
        for cid in ids[7:]:
            bank.delete(cid)
        bank.compact()
        lagging = types.SimpleNamespace(time=lambda: time.time() - 3600, sleep=time.sleep)
        with monkeypatch.context() as m:
            m.setattr(bank_module, "time", lagging)
            bank.save(_state("other", 0), run="other", step=0)
    with wb.open(path, create=False) as fresh:
        want = [r.id for r in oracle(fresh.storage).recent(2)]
        assert want == [ids[6], ids[5]]
        assert [c.id for c in fresh.log(limit=2)] == want
        assert_views_agree(index_snapshot(fresh), oracle(fresh.storage))


def test_a_deleted_checkpoint_is_gone_after_a_repair(tmp_path: Path) -> None:
    """After a fallback listing and a repair, a deleted checkpoint neither resolves through tag@{N} nor loads."""
    path = tmp_path / "bank"
    with wb.open(path) as bank:
        a = bank.save(_state("r", 0), run="r", step=0, tags=["prod"]).id
        bank.save(_state("r", 1), run="r", step=1, tags=["prod"])
        garble_ref(bank.storage, log_key(max(list_seqs(bank.storage)) + 1))
    bank = wb.open(path)
    with pytest.warns(IndexFallbackWarning):
        bank.log()  # answered from a listing: every manifest read
    bank.repair_index()
    bank.delete(a)
    with pytest.raises(wb.CheckpointNotFound):
        bank.resolve("prod@{1}")
    with pytest.raises(wb.CheckpointNotFound):
        bank.load(a)
    bank.close()


def test_a_checkpoint_deleted_by_another_process_stops_resolving(tmp_path: Path) -> None:
    """A Bank that read a manifest still says CheckpointNotFound once another process deleted and collected it."""
    path = tmp_path / "bank"
    bank = wb.open(path)
    x = bank.save(_state("r", 0), run="r", step=0, tags=["prod"]).id
    bank.save(_state("r", 1), run="r", step=1)
    bank.load("prod")
    with wb.open(path, create=False) as other:
        other.delete(x, force=True)
        other.gc(grace=0)
    with pytest.raises(wb.CheckpointNotFound):
        bank.resolve("prod")
    with pytest.raises(wb.CheckpointNotFound):
        bank.load("prod")
    bank.close()


# -- 3. saves and deletes cut short ----------------------------------------------------------------


def _uncommitted(bank: wb.Bank, like: str, step: int) -> tuple[str, Manifest]:
    """A manifest a save would have written (a copy of ``like`` at ``step``, created now): (id, manifest)."""
    m = dataclasses.replace(bank._catalog.get(like), step=step, created=time.time(), message="in flight")
    m = one_document(m)
    return digest(m.to_bytes()), m


def _write_lease(storage: Storage, save_id: str, *, pid: int, started: float) -> None:
    body = {"save": save_id, "host": socket.gethostname(), "pid": pid, "started": started}
    storage.write(f"{LEASES}{save_id}.json", seal(body))


def _invisible(path: Path, cid: str, latest: str) -> None:
    with wb.open(path, create=False) as fresh:
        with pytest.raises(wb.CheckpointNotFound):
            fresh.resolve(cid)
        with pytest.raises(wb.CheckpointNotFound):
            fresh.resolve("r@99")
        assert cid not in {c.id for c in fresh.log()}
        assert fresh.resolve("r@latest") == latest
        assert_views_agree(index_snapshot(fresh), oracle(fresh.storage))
        assert not [p for p in fresh.verify().problems if p.kind != "orphan"]


@pytest.mark.parametrize("lease", ["released", "dead-pid", "expired"])
def test_an_add_entry_without_its_manifest_is_invisible_held_while_leased_then_dropped(
    tmp_path: Path, lease: str
) -> None:
    path = tmp_path / "bank"
    bank = wb.open(path)
    ids = [bank.save(_state("r", s), run="r", step=s).id for s in range(3)]
    bank.compact()
    cid, m = _uncommitted(bank, ids[0], 99)
    save_id = "crashedsave" + lease.replace("-", "")
    leases.acquire(bank.storage, save_id)  # this process: live
    bank._catalog.intend(cid, m, [save_id], [])
    # ... and the save dies before its manifest
    _invisible(path, cid, ids[2])
    held = bank.compact()
    assert (held.held, held.dropped, held.folded) == (1, 0, 0), "a live lease holds the entry"
    _invisible(path, cid, ids[2])
    root = read_root(bank.storage, list_gens(bank.storage)[-1])
    assert root is not None and len(root.held) == 1
    if lease == "released":
        leases.release(bank.storage, save_id)
    elif lease == "dead-pid":
        _write_lease(bank.storage, save_id, pid=dead_pid(), started=time.time())
    else:
        _write_lease(bank.storage, save_id, pid=1, started=time.time() - leases.DEFAULT_TTL - 60)
    dropped = bank.compact()
    assert (dropped.held, dropped.dropped) == (0, 1), "a gone or stale lease: the save is dead"
    assert not pending_seqs(bank.storage) and not list_seqs(bank.storage)
    _invisible(path, cid, ids[2])
    bank.close()


def test_a_slow_save_held_by_compaction_appears_when_its_manifest_lands(tmp_path: Path) -> None:
    path = tmp_path / "bank"
    bank = wb.open(path)
    ids = [bank.save(_state("r", s), run="r", step=s).id for s in range(2)]
    cid, m = _uncommitted(bank, ids[0], 99)
    leases.acquire(bank.storage, "slowsave")
    bank._catalog.intend(cid, m, ["slowsave"], [])
    assert bank.compact().held == 1
    bank.storage.write(manifest_key(cid), m.to_bytes())
    leases.release(bank.storage, "slowsave")
    with wb.open(path, create=False) as fresh:
        assert fresh.resolve("r@99") == cid == fresh.resolve("r@latest")
    done = bank.compact()
    assert (done.folded, done.held) == (1, 0)
    with wb.open(path, create=False) as fresh:
        assert fresh.resolve("r@latest") == cid
        assert_views_agree(index_snapshot(fresh), oracle(fresh.storage))
        assert fresh.verify().problems == ()
    bank.close()


def test_a_save_whose_manifest_write_fails_leaves_an_entry_that_counts_for_nothing(tmp_path: Path) -> None:
    path = tmp_path / "bank"
    with wb.open(path) as bank:
        ids = [bank.save(_state("r", s), run="r", step=s).id for s in range(2)]

    def fail_manifest(n: int, name: str, key: str) -> None:
        if name == "write" and key.startswith(MANIFESTS):
            raise OSError(5, "injected: manifest write failed")

    bank = wb.Bank(FaultStorage(LocalStorage(path), on_op=fail_manifest))
    with pytest.raises(OSError, match="injected"):
        bank.save(_state("r", 99), run="r", step=99)
    entries = pending_seqs(bank.storage)
    assert len(entries) == 3, "the dead save's add entry is in the log"
    dead = read_entry(bank.storage, entries[-1])
    assert dead is not None and dead.op == ADD and dead.record is not None and dead.record.step == 99
    assert not list(bank.storage.list(LEASES)), "the failed save released its lease"
    _invisible(path, dead.id, ids[1])
    with wb.open(path, create=False) as fresh:
        result = fresh.compact()
        assert (result.folded, result.dropped, result.held) == (2, 1, 0)
    _invisible(path, dead.id, ids[1])


def test_a_delete_cut_short_after_its_entry_leaves_the_checkpoint_visible(tmp_path: Path) -> None:
    path = tmp_path / "bank"
    bank = wb.open(path)
    ids = [bank.save(_state("r", s), run="r", step=s, metrics={"val": 1.0 - s}).id for s in range(3)]
    bank.compact()
    bank._catalog.tombstone(ids[2])  # the delete entry is written ... and the process dies

    def visible() -> None:
        with wb.open(path, create=False) as fresh:
            assert fresh.resolve("r@latest") == ids[2] == fresh.resolve("r@best:val")
            assert fresh.resolve(ids[2][:8]) == ids[2]
            assert ids[2] in {c.id for c in fresh.log()}
            assert_views_agree(index_snapshot(fresh), oracle(fresh.storage))
            assert fresh.verify().problems == ()

    visible()
    assert bank.compact().held == 1, "a delete whose manifest is still there is held"
    visible()
    # the operator deletes it again; both entries fold
    bank.delete(ids[2])
    with wb.open(path, create=False) as fresh:
        assert fresh.resolve("r@latest") == ids[1]
    result = bank.compact()
    assert (result.held, result.folded) == (0, 2)
    with wb.open(path, create=False) as fresh:
        assert fresh.resolve("r@latest") == ids[1] == fresh.resolve("r@best:val")
        assert_views_agree(index_snapshot(fresh), oracle(fresh.storage))
    bank.close()


# -- 4. upgrade from format 1 ----------------------------------------------------------------------


@pytest.fixture
def legacy(tmp_path: Path) -> Path:
    path = tmp_path / "legacy"
    shutil.copytree(LEGACY, path)
    return path


def _expected() -> dict[str, Any]:
    return json.loads(LEGACY_EXPECTED.read_text())


def _legacy_refs() -> dict[str, str]:
    exp = _expected()
    steps: dict[str, str] = exp["steps"]
    refs = {f"tts@{s}": cid for s, cid in steps.items()}
    refs.update(
        {
            "prod": exp["prod"],
            "prod@{1}": exp["prod_prev"],
            "tts@best:val_loss": exp["best"],
            "tts@latest": steps["3"],
            "candidate": steps["3"],
            "ft@10": exp["ft"],
            "ft@latest": exp["ft"],
            "dist@5": exp["sharded"],
            str(exp["ft"])[:8]: exp["ft"],
            str(exp["sharded"]): exp["sharded"],
            str(exp["deleted"]): "!CheckpointNotFound",
            "ft@11": "!CheckpointNotFound",
            "gone": "!TagNotFound",
        }
    )
    return refs


def _assert_legacy_answers(bank: wb.Bank) -> None:
    refs = _legacy_refs()
    assert outcomes(bank, list(refs)) == refs
    w = bank.load("tts@latest")["w"]
    assert torch.equal(w, torch.tensor(_expected()["latest_w"]))
    assert bank.runs() == ["dist", "ft", "tts"]


def test_a_format_1_bank_reads_by_listing_and_upgrades_once(legacy: Path) -> None:
    bank = wb.open(legacy)
    assert bank_version(bank.storage) == 1 and not bank._catalog.indexed
    assert bank._catalog.scanning and bank._catalog.damage is None  # an old bank: no warning
    _assert_legacy_answers(bank)
    assert not list(bank.storage.list_refs("index/")), "reading writes nothing"
    assert bank.upgrade() is True
    assert bank.upgrade() is False
    assert bank_version(bank.storage) == marker.BANK_VERSION
    assert json.loads(bank.storage.read(FORMAT_KEY))["format"] == "weightbank"
    assert not bank._catalog.scanning
    _assert_legacy_answers(bank)
    assert {p.kind for p in bank.verify().problems} <= {"orphan"}
    bank.close()
    with wb.open(legacy, create=False) as fresh:
        assert fresh._catalog.indexed and not fresh._catalog.scanning
        _assert_legacy_answers(fresh)
        assert_views_agree(index_snapshot(fresh), oracle(fresh.storage), metrics=("val_loss",))
        assert fresh.upgrade() is False


def test_the_first_save_into_a_format_1_bank_upgrades_it(legacy: Path) -> None:
    with wb.open(legacy) as bank:
        info = bank.save({"w": torch.ones(4)}, run="tts", step=4, metrics={"val_loss": 0.1})
        assert bank_version(bank.storage) == marker.BANK_VERSION
        assert info.parent == _expected()["steps"]["3"]
    with wb.open(legacy, create=False) as fresh:
        assert not fresh._catalog.scanning
        assert fresh.resolve("tts@latest") == info.id == fresh.resolve("tts@best:val_loss")
        refs = {k: v for k, v in _legacy_refs().items() if k not in ("tts@latest", "tts@best:val_loss")}
        assert outcomes(fresh, list(refs)) == refs
        assert_views_agree(index_snapshot(fresh), oracle(fresh.storage), metrics=("val_loss",))
        assert {p.kind for p in fresh.verify().problems} <= {"orphan"}


def test_a_layout_2_bank_turns_3_on_its_first_save_and_keeps_every_old_id(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bank of the previous release (index, one-document manifests) needs only its marker changed."""
    path = tmp_path / "b2"
    with monkeypatch.context() as m:
        m.setattr(marker, "BANK_VERSION", 2)  # this code, as the release before format-3 manifests
        with wb.open(path) as old:
            first = old.save({"w": torch.arange(6.0), "b": torch.ones(2)}, run="r", step=1, tags=["prod"])
            assert bank_version(old.storage) == 2
            assert old.checkpoint(first.id).manifest.format == 1
    raw = (path / manifest_key(first.id)).read_bytes()
    assert raw.startswith(b"{") and digest(raw) == first.id  # a one-document manifest, named by its bytes
    with wb.open(path, create=False) as bank:
        assert bank.resolve("prod") == first.id and torch.equal(bank.load("prod")["w"], torch.arange(6.0))
        second = bank.save({"w": torch.arange(6.0), "b": torch.zeros(2)}, run="r", step=2)
        assert bank_version(bank.storage) == marker.BANK_VERSION
        assert bank.checkpoint(second.id).manifest.format == 3 and second.parent == first.id
        assert (path / manifest_key(first.id)).read_bytes() == raw  # nothing old was rewritten
    with wb.open(path, create=False) as fresh:
        assert [c.id for c in fresh.log("r")] == [second.id, first.id]
        assert torch.equal(fresh.load(second.id)["w"], torch.arange(6.0))
        assert fresh.verify().ok


def test_a_delete_into_a_format_1_bank_upgrades_it_first(legacy: Path) -> None:
    exp = _expected()
    with wb.open(legacy) as bank:
        bank.delete(str(exp["ft"]))
        assert bank_version(bank.storage) == marker.BANK_VERSION
    with wb.open(legacy, create=False) as fresh:
        assert not fresh._catalog.scanning
        assert fresh.runs() == ["dist", "tts"]
        assert_views_agree(index_snapshot(fresh), oracle(fresh.storage), metrics=("val_loss",))


def test_a_bank_marked_by_a_newer_weightbank_is_refused(
    legacy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with wb.open(legacy) as bank:
        bank.upgrade()
    # an old reader (this code, believing it reads only format 1) refuses the upgraded bank
    with monkeypatch.context() as m:
        m.setattr(marker, "BANK_VERSION", 1)
        with pytest.raises(wb.UnsupportedFormat):
            wb.open(legacy, create=False)
    # and this reader refuses a bank a newer release marked with a newer version
    raw = json.loads((legacy / FORMAT_KEY).read_text())
    (legacy / FORMAT_KEY).write_text(json.dumps({**raw, "version": marker.BANK_VERSION + 1}))
    with pytest.raises(wb.UnsupportedFormat):
        wb.open(legacy, create=False)
    with pytest.raises(wb.UnsupportedFormat):
        init_storage(LocalStorage(legacy), create=False)


def test_a_bank_built_on_a_too_new_marker_refuses_to_write(legacy: Path) -> None:
    raw = json.loads((legacy / FORMAT_KEY).read_text())
    (legacy / FORMAT_KEY).write_text(json.dumps({**raw, "version": marker.BANK_VERSION + 1}))
    with pytest.raises(wb.UnsupportedFormat):
        wb.Bank(LocalStorage(legacy)).save({"w": torch.ones(2)}, run="tts", step=9)


# -- 5. request counts do not grow with the bank ---------------------------------------------------


def _grown_bank(path: Path, n: int) -> None:
    with wb.open(path) as bank:
        for step in range(n):
            # codec planes: no delta chains, so the tagged checkpoint loads the same reads at any size
            bank.save(
                {"w": torch.full((64,), float(step))},
                run="r",
                step=step,
                metrics={"val": 1.0 / (step + 1)},
                codec="planes",
                tags=["prod"] if step == n - 1 else (),
            )
        bank.save({"w": torch.ones(4)}, run="other", step=0, codec="planes")
        bank.compact()
        assert not pending_seqs(bank.storage)


def _requests(path: Path, call: Callable[[wb.Bank], object]) -> dict[str, int]:
    storage = CountingStorage(LocalStorage(path))
    init_storage(storage, create=False)
    bank = wb.Bank(storage, workers=1)
    storage.reset()
    call(bank)
    counts = {k: v for k, v in storage.counts().items() if v}
    bank.close()
    return counts


@pytest.fixture(scope="module")
def grown(tmp_path_factory: pytest.TempPathFactory) -> dict[int, Path]:
    """Two banks alike but for their size: 10 and 200 checkpoints of run r, compacted."""
    base = tmp_path_factory.mktemp("grown")
    for n in (10, 200):
        _grown_bank(base / str(n), n)
    return {n: base / str(n) for n in (10, 200)}


REQUESTS: dict[str, Callable[[wb.Bank], object]] = {
    "load-tag": lambda b: b.load("prod"),
    "best": lambda b: b.resolve("r@best:val"),
    "log-20": lambda b: b.log(limit=20),
    "log-run-5": lambda b: b.log("r", limit=5),
    "latest": lambda b: b.resolve("r@latest"),
    "step": lambda b: b.resolve("r@5"),
    "info": lambda b: b.info("prod"),
}


@pytest.mark.parametrize("what", list(REQUESTS))
def test_requests_do_not_grow_with_the_bank(grown: dict[int, Path], what: str) -> None:
    counts = {n: _requests(path, REQUESTS[what]) for n, path in grown.items()}
    assert counts[10] == counts[200], counts
    assert counts[200].get("list", 0) == 0, "nothing lists manifests, packs or pages"
