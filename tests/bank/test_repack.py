"""``Bank.repack``: partly dead packs rewritten, ids untouched, old packs kept while someone may read them.

A repack copies the live chunks of packs at least ``min_dead`` dead into new
packs and rewrites the location heads of the format-3 manifests that used
them (:mod:`weightbank.bank.repack`); the old packs are listed in a release
record that ``gc`` honours (:mod:`weightbank.bank.releases`). These tests
check the whole contract:

1. the numbers: after ``repack`` + ``gc(grace=0)`` a bank whose packs were
   half dead holds its live bytes (within 5%), with every id, tag, tag
   history, lineage link and run log as it was, and every checkpoint
   loading bit-exact (raw chunks and delta chains);
2. packs of format-1/2 manifests are pinned (their locations are part of
   their ids) — the legacy fixture and format-1 manifests written today;
3. ``dry_run`` writes nothing; 4. ``min_dead`` is checked;
5. readers and writers racing a repack + gc: a cached manifest, a parent
   cached before a save, a save in flight (two-phase, and a thread);
6. an OSError after every n-th write of a repack, 7. a SIGKILL at every
   storage operation of one (slow): nothing lost, a second repack finishes;
8. gc and release records (unstamped, stamped, damaged, left by a dead repack);
9. manifest segments are collected with their checkpoints.

The races and crossings of a delete, a save in flight and a load with a
repack (tests 5) are the bugs these tests found first; each is fixed.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import weightbank as wb
from weightbank.bank import leases, maintenance, releases
from weightbank.bank.layout import (
    PACKS,
    RELEASED,
    SEGMENTS,
    manifest_key,
    pack_key,
    release_key,
)
from weightbank.bank.listing import read_manifest
from weightbank.bank.shards import region_of
from weightbank.format.manifest import COMPACT_FORMAT, Manifest
from weightbank.format.sealed import seal
from weightbank.storage import LocalStorage
from weightbank.storage.base import Storage

from .faults import WRITE_OPS, Children, FaultStorage, assert_same_state, dead_pid, finish

LEGACY = Path(__file__).resolve().parents[1] / "data" / "legacy_v1_bank"
#: The repack child script (SIGKILL sweep), run with ``sys.executable`` like ``_child.py``.
REPACK_CHILD = Path(__file__).with_name("_repack_child.py")

State = dict[str, Any]


# -- states and banks ------------------------------------------------------------------------------


def noise(seed: int, n: int = 16384) -> torch.Tensor:
    """``n`` float32s from ``seed`` (64 KiB by default: one raw chunk, 64-byte aligned)."""
    return torch.randn(n, generator=torch.Generator().manual_seed(seed))


def drifting(step: int, n: int = 16384) -> torch.Tensor:
    """A tensor that changes a little each step (what a delta chain codes well)."""
    t = noise(7, n)
    t[::97] += 1e-3 * (step + 1)
    return t


@dataclass
class HalfDead:
    """A bank where, once the ``train`` run is deleted, half of every pack's bytes is dead.

    ``train@s`` holds ``keep`` and ``drop`` (one pack, half each); ``slim@s``
    holds the same ``keep`` (reused, so it writes no pack of its own). With
    train deleted, each train pack keeps only the chunk slim uses.
    """

    path: Path
    train: list[str]
    slim: list[str]
    states: dict[str, State]


def default_size(codec: str) -> int:
    """Elements per tensor: 64 KiB raw chunks; 1 MiB for ``auto``, where a delta link must be worth
    its fixed decode cost (planner.LINK_OVERHEAD) for the save to code one."""
    return 262144 if codec == "auto" else 16384


def slim_state(step: int, codec: str, n: int | None = None) -> State:
    size = default_size(codec) if n is None else n
    keep = drifting(step, size) if codec == "auto" else noise(step, size)
    return {"keep": keep, "info": {"step": step}}


def build_half_dead(
    path: Path, *, codec: str = "raw", pairs: int = 6, n: int | None = None, delete: bool = True
) -> HalfDead:
    n = default_size(codec) if n is None else n
    states: dict[str, State] = {}
    train: list[str] = []
    slim: list[str] = []
    with wb.open(path) as bank:
        for s in range(pairs):
            keep = slim_state(s, codec, n)["keep"]
            t = bank.save({"keep": keep, "drop": noise(1000 + s, n)}, run="train", step=s, codec=codec)
            c = bank.save(
                slim_state(s, codec, n), run="slim", step=s, codec=codec, metrics={"loss": 1 / (s + 1)}
            )
            assert c.save_stats is not None and c.save_stats.written_bytes == 0, (
                "slim should reuse train's chunk"
            )
            train.append(t.id)
            slim.append(c.id)
            states[c.id] = slim_state(s, codec, n)
        bank.tag("prod", slim[0], why="first")
        bank.tag("prod", slim[-1], why="newest")
        bank.tag("best", slim[1])
        if delete:
            for cid in train:
                bank.delete(cid, why="slimmed")
            bank.gc(grace=0)  # trash entries dropped: only the repack can free bytes now
    return HalfDead(path, train, slim, states)


def pack_bytes(storage: Storage) -> int:
    return sum(i.size for i in storage.list(PACKS))


def pack_keys(storage: Storage) -> set[str]:
    return {i.key for i in storage.list(PACKS)}


def live_bytes(storage: Storage, ids: list[str]) -> int:
    """Stored bytes of the distinct chunk places the checkpoints ``ids`` read (delta bases included)."""
    places: dict[tuple[str, int], int] = {}
    for cid in ids:
        m = read_manifest(storage, cid)
        for c in m.chunks:
            places[(m.packs[c.pack], c.offset)] = c.stored_len
    return sum(places.values())


def manifest(storage: Storage, cid: str) -> Manifest:
    return read_manifest(storage, cid)


def refs(storage: Storage) -> dict[str, bytes | None]:
    """Every ref (tags, run events) and catalog index object (head, log, roots), with its bytes."""
    out: dict[str, bytes | None] = {}
    for key in storage.list_refs("refs/"):
        ref = storage.get_ref(key)
        out[key] = None if ref is None else ref.data
    for info in storage.list("index/"):
        out[info.key] = storage.read(info.key)
    return out


def files(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` (scratch area included): relative path → (size, mtime_ns)."""
    out = {}
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = Path(dirpath, name)
            st = p.stat()
            out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns)
    return out


@dataclass(frozen=True)
class Picture:
    """What a repack must never change: the log, tags with their history, lineage and run events."""

    log: list[wb.CheckpointInfo]
    tags: dict[str, list[wb.TagEvent]]
    parents: dict[str, str | None]
    events: dict[str, list[Any]]

    @classmethod
    def of(cls, bank: wb.Bank) -> Picture:
        log = bank.log()
        tags = {t.name: bank.tag_history(t.name) for t in bank.tags(include_removed=True)}
        return cls(
            log=log,
            tags=tags,
            parents={c.id: bank.info(c.id).parent for c in log},
            events={run: bank.events(run) for run in bank.runs()},
        )


def assert_loads(path: Path, states: Mapping[str, State]) -> None:
    """Every checkpoint of ``states`` loads bit-exact from a freshly opened bank."""
    with wb.open(path, create=False) as fresh:
        for cid, want in states.items():
            assert_same_state(fresh.load(cid), want, cid[:12])


def problem_kinds(bank: wb.Bank) -> set[str]:
    return {p.kind for p in bank.verify().problems}


def collect(bank: wb.Bank) -> None:
    """gc(grace=0) until it frees nothing: a record a dead repack left unstamped takes two rounds
    (the first stamps it and keeps its packs, the next frees them)."""
    for _ in range(4):
        report = bank.gc(grace=0)
        if not report.packs_deleted and not report.segments_deleted and not list(bank.storage.list(RELEASED)):
            return
    raise AssertionError("gc(grace=0) kept finding something to delete")


def assert_compact(path: Path, survivors: list[str], where: str = "") -> None:
    """The packs hold the survivors' live bytes (within 5%) and verify finds nothing at all."""
    with wb.open(path, create=False) as bank:
        live = live_bytes(bank.storage, survivors)
        stored = pack_bytes(bank.storage)
        assert live <= stored <= live * 1.05, (where, stored, live, sorted(pack_keys(bank.storage)))
        report = bank.verify()
        assert report.problems == (), (where, report.problems)
        assert not list(bank.storage.list(RELEASED)), f"{where}: release records should be gone after gc"


# -- 1. the numbers --------------------------------------------------------------------------------


@pytest.mark.parametrize("codec", ["raw", "auto"])
def test_repack_then_gc_leaves_only_live_bytes_and_changes_no_id(tmp_path: Path, codec: str) -> None:
    hd = build_half_dead(tmp_path / "bank", codec=codec)
    with wb.open(hd.path, create=False) as bank:
        if codec == "auto":  # the chains really are chains: slim@s reads a delta against train@s-1's chunk
            m = manifest(bank.storage, hd.slim[-1])
            assert any(c.codec == "delta" for c in m.chunks), [c.codec for c in m.chunks]
            assert len(m.packs) > 1
        before = Picture.of(bank)
        refs_before = refs(bank.storage)
        live = live_bytes(bank.storage, hd.slim)
        stored = pack_bytes(bank.storage)
        assert stored >= 1.6 * live, "the bank should start with (about) half of its pack bytes dead"
        old_packs = pack_keys(bank.storage)

        report = bank.repack()
        assert not report.dry_run
        assert set(report.packs_rewritten) == old_packs  # every pack is half dead
        assert report.bytes_before == stored
        assert report.bytes_copied == live
        assert report.manifests_rewritten == len(hd.slim)
        assert report.packs_pinned == 0
        assert set(report.packs_written) <= pack_keys(bank.storage)
        # Before gc both copies exist; the old ones are listed in a stamped release record.
        assert old_packs <= pack_keys(bank.storage)
        (rel,) = releases.read_all(bank.storage)
        assert set(rel.packs) == old_packs and rel.released_at is not None
        assert not list(bank.storage.list("leases/")), "repack must drop its lease"
        for cid in hd.slim:
            m = manifest(bank.storage, cid)
            assert m.format == COMPACT_FORMAT
            assert set(m.packs) <= set(report.packs_written), "every chunk moved to a new pack"
        # The repacking bank reads the new places.
        assert_same_state(bank.load(hd.slim[0]), hd.states[hd.slim[0]])

        gc = bank.gc(grace=0)
        assert set(gc.packs_deleted) == old_packs
        assert gc.bytes_freed >= stored - live
        assert pack_keys(bank.storage) == set(report.packs_written)
        assert Picture.of(bank) == before
        assert refs(bank.storage) == refs_before
    assert_loads(hd.path, hd.states)
    assert_compact(hd.path, hd.slim)
    with wb.open(hd.path, create=False) as fresh:
        assert Picture.of(fresh) == before
        assert [c.id for c in fresh.log()] == [c.id for c in before.log]
        assert fresh.resolve("prod") == hd.slim[-1] and fresh.resolve("prod@{1}") == hd.slim[0]
        assert fresh.resolve("slim@best:loss") == hd.slim[-1]
        # A second repack has nothing left to do.
        again = fresh.repack()
        assert again.packs_rewritten == () and again.manifests_rewritten == 0
        # A save after the repack reuses the moved chunks: its parent's manifest, read after its lease
        # began, gives their new places (``codec="auto"`` reads the parent; the save's own chunks).
        newest = hd.states[hd.slim[-1]]
        info = fresh.save(newest, run="slim", step=99, codec="auto", parent=hd.slim[-1])
        assert info.save_stats is not None and info.save_stats.written_bytes == 0
        assert set(fresh.show(info.id).packs) <= set(report.packs_written)
        assert_same_state(fresh.load(info.id), newest)
        assert fresh.verify().problems == ()


def test_dedup_through_the_catalog_after_a_repack_uses_the_new_places(tmp_path: Path) -> None:
    """A save with no parent finds chunks through the catalog (ChunkFinder): whatever it reuses, it
    reuses at a place that exists after repack + gc, so the checkpoint loads and verifies."""
    hd = build_half_dead(tmp_path / "bank", pairs=3)
    _repack_and_collect(hd.path)
    with wb.open(hd.path, create=False) as bank:
        want = {"keep": hd.states[hd.slim[0]]["keep"]}
        info = bank.save(want, run="other", parent=None, codec="raw")
        packs = set(bank.show(info.id).packs)
        assert packs <= pack_keys(bank.storage)
        bank.gc(grace=0)
        assert packs <= pack_keys(bank.storage)
        assert bank.verify().problems == ()
    assert_loads(hd.path, {info.id: want, **hd.states})


def test_repack_respects_min_dead(tmp_path: Path) -> None:
    """A pack 50% dead is rewritten at min_dead 0.5 (the bound is inclusive) and left at 0.6."""
    hd = build_half_dead(tmp_path / "bank", pairs=2)
    with wb.open(hd.path, create=False) as bank:
        assert bank.repack(min_dead=0.6, dry_run=True).packs_rewritten == ()
        assert bank.repack(min_dead=0.6).packs_rewritten == ()
        assert not list(bank.storage.list(RELEASED)), "a repack with nothing to do writes no record"
        assert len(bank.repack(min_dead=0.5).packs_rewritten) == 2
    assert_loads(hd.path, hd.states)


def test_a_wholly_dead_pack_is_left_to_gc(tmp_path: Path) -> None:
    hd = build_half_dead(tmp_path / "bank", pairs=2, delete=False)
    with wb.open(hd.path, create=False) as bank:
        bank.delete(hd.slim[0])
        bank.delete(hd.train[0])
        report = bank.repack(min_dead=0.01)
        assert report.packs_rewritten == ()  # train@1's pack is fully live, train@0's wholly dead
        bank.gc(grace=0)
    assert_loads(hd.path, {hd.slim[1]: hd.states[hd.slim[1]]})


# -- 2. pinned packs -------------------------------------------------------------------------------


@pytest.fixture
def legacy(tmp_path: Path) -> Path:
    path = tmp_path / "legacy"
    shutil.copytree(LEGACY, path)
    return path


def _legacy_states(bank: wb.Bank) -> dict[str, State]:
    return {c.id: bank.load(c.id) for c in bank.log()}


def test_packs_of_the_legacy_format_1_manifests_are_pinned(legacy: Path) -> None:
    with wb.open(legacy) as bank:
        old = {c.id: manifest(bank.storage, c.id) for c in bank.log()}
        assert old and all(m.format < COMPACT_FORMAT for m in old.values())
        old_packs = {p for m in old.values() for p in m.packs}
        old_bytes = {k: bank.storage.read(k) for k in old_packs}
        old_states = _legacy_states(bank)
        # Format-3 checkpoints on top: one reuses a legacy chunk (its pack is pinned all the same),
        # and a half-dead train/slim pair gives the repack real work.
        w = bank.load("tts@latest")["w"]
        reuse = bank.save({"w": w}, run="tts", step=4)
        assert reuse.save_stats is not None and reuse.save_stats.reused_chunks == 1
        assert set(bank.show(reuse.id).packs) <= old_packs
        train = bank.save({"keep": noise(1), "drop": noise(2)}, run="new", step=0, codec="raw")
        slim = bank.save({"keep": noise(1)}, run="new", step=1, codec="raw")
        bank.delete(train.id)
        new_packs = set(bank.show(slim.id).packs)
        states = {**old_states, reuse.id: {"w": w}, slim.id: {"keep": noise(1)}}

        # tts@0's legacy pack is 0.8% dead (alignment): above this min_dead, yet pinned.
        dry = bank.repack(min_dead=0.005, dry_run=True)
        report = bank.repack(min_dead=0.005)
        assert (dry.bytes_before, dry.bytes_copied) == (report.bytes_before, report.bytes_copied)
        assert set(report.packs_rewritten) == new_packs
        # Counted: the pinned packs at least min_dead dead (the others would stay anyway).
        assert report.packs_pinned == dry.packs_pinned >= 1
        assert report.manifests_rewritten == 1
        bank.gc(grace=0)
        assert old_packs <= pack_keys(bank.storage)
        assert {k: bank.storage.read(k) for k in old_packs} == old_bytes
        for cid, m in old.items():
            assert manifest(bank.storage, cid) == m, "a format-1/2 manifest must never be rewritten"
        assert set(manifest(bank.storage, reuse.id).packs) <= old_packs
    assert_loads(legacy, states)
    with wb.open(legacy, create=False) as fresh:
        assert fresh.verify().problems == ()


def test_a_half_dead_pack_of_a_format_1_manifest_is_pinned(tmp_path: Path) -> None:
    """Format-1 manifests written in a layout-3 bank (as a writer that predates layout 3 would):
    their pack stays even though half of it is dead, and so do the format-3 manifests that share it."""
    path = tmp_path / "bank"
    with wb.open(path) as old_writer:
        old_writer._catalog.compact_manifests = False
        old_writer._catalog.upgrade = lambda: False  # type: ignore[method-assign]
        q1 = old_writer.save({"keep": noise(501), "drop": noise(502)}, run="old", step=0, codec="raw")
        p1 = old_writer.save({"keep": noise(501)}, run="old", step=1, codec="raw")
        assert manifest(old_writer.storage, p1.id).format < COMPACT_FORMAT
    hd = build_half_dead(tmp_path / "bank", pairs=2, delete=False)
    with wb.open(path, create=False) as bank:
        f3 = bank.save({"keep": noise(501)}, run="f3", step=0, codec="raw")  # shares the pinned pack
        pinned = set(manifest(bank.storage, p1.id).packs)
        assert set(manifest(bank.storage, f3.id).packs) == pinned
        for cid in [q1.id, *hd.train]:
            bank.delete(cid)
        bank.gc(grace=0)
        report = bank.repack()
        assert pinned.isdisjoint(report.packs_rewritten)
        assert len(report.packs_rewritten) == 2  # the two train packs
        assert report.packs_pinned == 1
        assert report.manifests_rewritten == 2  # slim@0, slim@1; not f3 (its pack is pinned)
        bank.gc(grace=0)
        assert pinned <= pack_keys(bank.storage)
        assert set(manifest(bank.storage, f3.id).packs) == pinned
    assert_loads(path, {**hd.states, p1.id: {"keep": noise(501)}, f3.id: {"keep": noise(501)}})
    with wb.open(path, create=False) as fresh:
        assert fresh.verify().problems == ()


def test_a_pack_whose_save_holds_a_live_lease_is_pinned(tmp_path: Path) -> None:
    """A pack named by a committed manifest whose save still holds its lease (a commit that has
    not released it yet) is not rewritten."""
    hd = build_half_dead(tmp_path / "bank", pairs=2)
    with wb.open(hd.path, create=False) as bank:
        (held,) = manifest(bank.storage, hd.slim[0]).packs
        save_id = held.rsplit("/", 1)[1].rsplit("-", 1)[0]
        leases.acquire(bank.storage, save_id)
        report = bank.repack()
        assert held not in report.packs_rewritten
        assert len(report.packs_rewritten) == 1 and report.packs_pinned == 1
        leases.release(bank.storage, save_id)
        bank.gc(grace=0)
        assert held in pack_keys(bank.storage)
        assert bank.repack().packs_rewritten == (held,)  # once the lease is gone
        bank.gc(grace=0)
    assert_loads(hd.path, hd.states)
    assert_compact(hd.path, hd.slim)


def test_a_format_1_bank_is_upgraded_by_repack_not_by_a_dry_run(legacy: Path) -> None:
    from weightbank.bank.marker import BANK_VERSION, bank_version

    with wb.open(legacy) as bank:
        assert bank_version(bank.storage) == 1
        bank.repack(dry_run=True)
        assert bank_version(bank.storage) == 1, "a dry run writes nothing, the marker included"
        states = _legacy_states(bank)
        assert bank.repack().packs_rewritten == ()
        assert bank_version(bank.storage) == BANK_VERSION
    assert_loads(legacy, states)


def test_repack_refuses_while_a_manifest_is_unreadable(tmp_path: Path) -> None:
    hd = build_half_dead(tmp_path / "bank", pairs=2)
    with wb.open(hd.path, create=False) as bank:
        key = manifest_key(hd.slim[0])
        raw = bank.storage.read(key)
        bank.storage.write(key, raw[: len(raw) // 2])
        packs = pack_keys(bank.storage)
        for dry_run in (True, False):
            with pytest.raises(wb.CorruptObject, match="repack refuses"):
                bank.repack(dry_run=dry_run)
        assert pack_keys(bank.storage) == packs
        assert not list(bank.storage.list(RELEASED)) and not list(bank.storage.list("leases/"))
        bank.storage.write(key, raw)
    assert_loads(hd.path, hd.states)


# -- 3. dry run, 4. arguments ----------------------------------------------------------------------


def test_dry_run_writes_nothing(tmp_path: Path) -> None:
    hd = build_half_dead(tmp_path / "bank", pairs=3)
    with wb.open(hd.path, create=False) as bank:
        on_disk = files(hd.path)
        listed = {i.key: i.size for i in bank.storage.list("")}
        refs_before = refs(bank.storage)
        dry = bank.repack(dry_run=True)
        assert dry.dry_run and dry.packs_written == () and dry.manifests_rewritten == 0
        assert dry.bytes_before > dry.bytes_copied > 0
        assert files(hd.path) == on_disk
        assert {i.key: i.size for i in bank.storage.list("")} == listed
        assert refs(bank.storage) == refs_before
        real = bank.repack()
        assert len(real.packs_rewritten) == 3
        assert (real.bytes_before, real.bytes_copied) == (dry.bytes_before, dry.bytes_copied)


def test_dry_run_lists_the_packs_it_would_rewrite(tmp_path: Path) -> None:
    hd = build_half_dead(tmp_path / "bank", pairs=3)
    with wb.open(hd.path, create=False) as bank:
        dry = bank.repack(dry_run=True)
        real = bank.repack()
    assert len(real.packs_rewritten) == 3
    assert dry.packs_rewritten == real.packs_rewritten


def test_dry_run_on_a_memory_bank_writes_nothing() -> None:
    bank = wb.open("memory://")
    for s in range(3):
        bank.save({"a": noise(s, 1024), "b": noise(100 + s, 1024)}, run="r", step=s, codec="raw")
    bank.prune(keep_last=1)
    before = {i.key: (i.size, bank.storage.read(i.key)) for i in bank.storage.list("")}
    assert bank.repack(dry_run=True).packs_rewritten == ()  # the survivor's pack is fully live
    assert {i.key: (i.size, bank.storage.read(i.key)) for i in bank.storage.list("")} == before


@pytest.mark.parametrize("bad", [0, 0.0, -1, 1.5, True, False, math.nan, math.inf, "0.5", None])
def test_min_dead_must_be_a_share_in_0_1(bad: Any) -> None:
    bank = wb.open("memory://")
    bank.save({"w": noise(0, 64)}, codec="raw")
    for dry_run in (False, True):
        with pytest.raises(wb.InvalidArgument, match="min_dead"):
            bank.repack(min_dead=bad, dry_run=dry_run)
    assert not list(bank.storage.list(RELEASED)) and not list(bank.storage.list("leases/"))


@pytest.mark.parametrize("good", [1, 1.0, 1e-9, 0.2])
def test_min_dead_accepts_shares(good: float) -> None:
    assert wb.open("memory://").repack(min_dead=good).packs_rewritten == ()


# -- 5. racing readers and writers -----------------------------------------------------------------


def _repack_and_collect(path: Path, *, in_flight: bool = False) -> wb.RepackReport:
    """Another bank repacks and collects. With no save in flight, gc(grace=0) frees the old packs;
    with one (``in_flight``), it keeps them for it."""
    with wb.open(path, create=False) as other:
        report = other.repack()
        assert report.packs_rewritten
        other.gc(grace=0)
        for p in report.packs_rewritten:
            assert other.storage.exists(p) == in_flight, p
    return report


def test_a_bank_with_a_cached_manifest_loads_after_another_repacks_and_collects(tmp_path: Path) -> None:
    hd = build_half_dead(tmp_path / "bank", pairs=3)
    a = wb.open(hd.path, create=False)
    for cid in hd.slim:
        assert_same_state(a.load(cid), hd.states[cid])  # A holds every manifest, with the old places
    _repack_and_collect(hd.path)
    # Every read path of A goes back to storage for the new places.
    for cid in hd.slim:
        assert_same_state(a.load(cid), hd.states[cid])
    assert torch.equal(a.load_tensors(hd.slim[0], ["keep"])["keep"], hd.states[hd.slim[0]]["keep"])
    assert [t.name for t in a.diff(hd.slim[0], hd.slim[1]).by_status("changed")] == ["keep"]
    target = {"keep": torch.empty(16384)}
    assert a.load(hd.slim[1], into=target).loaded == ("keep",)
    assert torch.equal(target["keep"], hd.states[hd.slim[1]]["keep"])
    assert a.verify().problems == ()
    a.close()


def test_a_checkpoint_handle_reads_after_another_bank_repacks_and_collects(tmp_path: Path) -> None:
    hd = build_half_dead(tmp_path / "bank", pairs=2)
    with wb.open(hd.path, create=False) as bank:
        ck = bank.checkpoint(hd.slim[0])  # resolved once, with the places before the repack
        _repack_and_collect(hd.path)
        assert torch.equal(ck.load_tensors(["keep"])["keep"], hd.states[hd.slim[0]]["keep"])
        assert_same_state(ck.tree_value(ck.manifest.tree), hd.states[hd.slim[0]])


def test_region_reads_of_a_handle_follow_a_repack(tmp_path: Path) -> None:
    """What a resharding DCP load asks for: regions of stored boxes, from a handle resolved before."""
    hd = build_half_dead(tmp_path / "bank", pairs=2)
    cid = hd.slim[0]
    with wb.open(hd.path, create=False) as bank:
        ck = bank.checkpoint(cid)
        i = ck.tensor_names.index("keep")
        whole = hd.states[cid]["keep"]
        regions = [
            region_of(ck.manifest, i, None, (0,), (100,)),
            region_of(ck.manifest, i, None, (100,), (28,)),
        ]
        _repack_and_collect(hd.path)
        with wb.open(hd.path, create=False) as other:
            assert set(other.checkpoint(cid).manifest.packs).isdisjoint(ck.manifest.packs), "all moved"
        got = dict(ck.iter_regions(regions))
        assert torch.equal(got[0], whole[:100]) and torch.equal(got[1], whole[100:128])
        assert [t.tolist() for t in ck.read_regions(regions[1:])] == [whole[100:128].tolist()]


@pytest.mark.parametrize("codec", ["raw", "auto"])
def test_a_save_from_a_parent_cached_before_a_repack_loads_after_gc(tmp_path: Path, codec: str) -> None:
    hd = build_half_dead(tmp_path / "bank", pairs=3, codec=codec)
    parent = hd.slim[-1]
    a = wb.open(hd.path, create=False)
    assert_same_state(a.load(parent), hd.states[parent])  # cached, old places
    _repack_and_collect(hd.path)
    # The parent's chunk reused as it is (codec "auto" reads the parent's manifest: the dedup path
    # for a parent) next to a new tensor...
    child_state = {"keep": hd.states[parent]["keep"], "extra": noise(77, 256)}
    child = a.save(child_state, run="slim", step=100, codec="auto", parent=parent)
    assert child.save_stats is not None and child.save_stats.reused_chunks == 1
    assert child.save_stats.written_bytes < 4096
    # ... and a slightly changed one coded against the parent's chunk (a delta for "auto").
    changed = {"keep": hd.states[parent]["keep"].clone()}
    changed["keep"][:8] += 1.0
    info = a.save(changed, run="slim", step=101, codec=codec, parent=parent)
    if codec == "auto":
        assert any(c.codec == "delta" for c in manifest(a.storage, info.id).chunks)
    assert info.parent == parent and child.parent == parent
    a.close()
    with wb.open(hd.path, create=False) as fresh:
        for cid in (info.id, child.id, parent):
            assert all(fresh.storage.exists(p) for p in fresh.show(cid).packs)
        fresh.gc(grace=0)
        assert fresh.verify().problems == ()
    assert_loads(hd.path, {info.id: changed, child.id: child_state, **hd.states})


def test_a_two_phase_save_in_flight_across_repack_and_gc_commits_whole(tmp_path: Path) -> None:
    hd = build_half_dead(tmp_path / "bank", pairs=3)
    parent = hd.slim[1]
    saver = wb.open(hd.path, create=False)
    part = saver.save_part(
        {"keep": hd.states[parent]["keep"], "own": noise(55, 512)}, codec="auto", parent=parent
    )
    assert part.stats.reused_chunks == 1  # the parent's chunk, at its place before the repack
    reused = set(part.packs) - set(part.own_packs())
    assert reused and reused <= set(manifest(saver.storage, parent).packs)
    with wb.open(hd.path, create=False) as other:
        report = other.repack()
        assert reused <= set(report.packs_rewritten)
        gc = other.gc(grace=0)
        # The part's lease began before the release record was stamped: its old packs stay.
        assert reused.isdisjoint(gc.packs_deleted)
        assert all(other.storage.exists(p) for p in reused)
    info = saver.commit([part], run="slim", step=50, parent=parent)
    saver.close()
    want = {"keep": hd.states[parent]["keep"], "own": noise(55, 512)}
    assert_loads(hd.path, {info.id: want})
    with wb.open(hd.path, create=False) as fresh:
        fresh.gc(grace=0)
        fresh.gc(grace=0)
        assert fresh.verify().problems == ()
        # After the commit the old pack is a pack the new checkpoint names: gc keeps it for that.
        assert reused <= pack_keys(fresh.storage)
        assert fresh.repack().manifests_rewritten >= 1  # and a later repack moves it on
        fresh.gc(grace=0)
        assert fresh.verify().problems == ()
    assert_loads(hd.path, {info.id: want, **hd.states})


def test_a_save_in_flight_in_a_thread_across_repack_and_gc(tmp_path: Path) -> None:
    """A save in another thread has chosen its reused chunks and is writing its pack when another
    bank repacks and collects; its pack writes wait on an event this test sets afterwards."""
    hd = build_half_dead(tmp_path / "bank", pairs=3)
    parent = hd.slim[2]
    writing = threading.Event()
    go = threading.Event()

    def on_op(n: int, name: str, key: str) -> None:
        if name in ("writer.write", "writer.commit") and key.startswith(PACKS):
            writing.set()
            assert go.wait(120), "the test never let the save go on"

    saver = wb.Bank(FaultStorage(LocalStorage(hd.path), on_op=on_op), workers=2)
    want = {"keep": hd.states[parent]["keep"], "fresh": noise(66)}
    result: list[wb.SaveResult] = []
    failure: list[BaseException] = []

    def save() -> None:
        try:
            result.append(saver.save(want, run="slim", step=60, codec="auto", parent=parent))
        except BaseException as e:  # the main thread reports it
            failure.append(e)

    thread = threading.Thread(target=save)
    thread.start()
    try:
        assert writing.wait(120), "the save never started writing its pack"
        with wb.open(hd.path, create=False) as other:
            report = other.repack()
            assert report.manifests_rewritten == len(hd.slim)
            gc = other.gc(grace=0)
            # The save's lease began before the record was stamped: the old packs stay for it.
            assert set(report.packs_rewritten).isdisjoint(gc.packs_deleted)
            assert set(report.packs_rewritten) <= pack_keys(other.storage)
    finally:
        go.set()
        thread.join(120)
    assert not thread.is_alive() and not failure, failure
    (info,) = result
    assert info.save_stats is not None and info.save_stats.reused_chunks == 1
    assert_loads(hd.path, {info.id: want, **hd.states})
    with wb.open(hd.path, create=False) as fresh:
        fresh.gc(grace=0)  # now the old packs no save can hold go, except the one the new checkpoint names
        assert fresh.verify().problems == ()
        fresh.repack()
        collect(fresh)
    assert_loads(hd.path, {info.id: want, **hd.states})
    assert_compact(hd.path, [*hd.slim, info.id])


def test_a_second_repack_is_refused_while_one_runs(tmp_path: Path) -> None:
    """Two repacks at once could each move a manifest's chunks while a save reuses them: the second,
    started while the first is between its new packs and its record, is refused and writes nothing."""
    hd = build_half_dead(tmp_path / "bank", pairs=3)
    refused: list[BaseException] = []

    def on_op(n: int, name: str, key: str) -> None:
        if name == "write" and key.startswith(RELEASED) and not refused:
            with wb.open(hd.path, create=False) as other:
                try:
                    other.repack()
                except wb.ConcurrentUpdate as e:
                    refused.append(e)

    first = wb.Bank(FaultStorage(LocalStorage(hd.path), on_op=on_op), workers=2).repack()
    (error,) = refused
    assert "repack lock is held" in str(error)
    assert first.manifests_rewritten == len(hd.slim)
    assert_loads(hd.path, hd.states)
    with wb.open(hd.path, create=False) as bank:
        assert not list(bank.storage.list_refs("refs/locks/")), "the lock goes with its repack"
        assert bank.repack().packs_rewritten == ()  # nothing left to do, and the lock is free again
        collect(bank)
    assert_loads(hd.path, hd.states)
    assert_compact(hd.path, hd.slim)


def test_a_stale_repack_lock_is_taken_over(tmp_path: Path) -> None:
    """A repack that died holding the lock (its pid is gone) does not block the next one."""
    hd = build_half_dead(tmp_path / "bank", pairs=2)
    body = {"holder": "dead", "host": socket.gethostname(), "pid": dead_pid(), "started": time.time()}
    LocalStorage(hd.path).put_ref("refs/locks/repack.json", seal(body), None)
    with wb.open(hd.path, create=False) as bank:
        assert bank.repack().manifests_rewritten == len(hd.slim)
        collect(bank)
    assert_loads(hd.path, hd.states)


def test_a_repack_while_a_save_commits_a_child(tmp_path: Path) -> None:
    """A save commits a child that reuses the parent's chunks at their old places while a repack is
    between its survey and its rewrites: the child keeps the old pack alive, nothing is lost."""
    hd = build_half_dead(tmp_path / "bank", pairs=2)
    parent = hd.slim[1]
    child: list[wb.SaveResult] = []

    def on_op(n: int, name: str, key: str) -> None:
        if name == "open_writer" and key.startswith(PACKS) and not child:
            with wb.open(hd.path, create=False) as saver:
                child.append(saver.save(hd.states[parent], run="child", parent=parent, codec="auto"))

    report = wb.Bank(FaultStorage(LocalStorage(hd.path), on_op=on_op), workers=2).repack()
    (info,) = child
    assert report.manifests_rewritten == 2
    states = {**hd.states, info.id: hd.states[parent]}
    with wb.open(hd.path, create=False) as bank:
        old = set(manifest(bank.storage, info.id).packs)
        assert old <= set(report.packs_rewritten), "the child names the places it read"
        bank.gc(grace=0)
        assert old <= pack_keys(bank.storage)
        assert bank.verify().problems == ()
        assert bank.repack().manifests_rewritten == 1  # the child's turn
        collect(bank)
    assert_loads(hd.path, states)
    assert_compact(hd.path, [*hd.slim, info.id])


# -- 6. an OSError at every write ------------------------------------------------------------------


@dataclass(frozen=True)
class Base:
    """A bank a sweep starts from (copied once per fault point): what it must keep loading."""

    path: Path
    states: dict[str, State]
    survivors: list[str]


def sweep_base(path: Path, scenario: str) -> Base:
    """``pairs-raw`` / ``pairs-auto``: three half-dead packs behind three manifests (auto: delta
    chains across them); ``segments``: one checkpoint of 1500 chunks, whose locations are stored in
    segments, in a half-dead pack (the repack writes new location segments)."""
    if scenario == "segments":
        cid, keep = _location_segment_bank(path, k=1000)
        return Base(path, {cid: keep}, [cid])
    codec = scenario.removeprefix("pairs-")
    hd = build_half_dead(path, codec=codec, pairs=3, n=4096 if codec == "raw" else None)
    return Base(path, hd.states, hd.slim)


def _count_ops(path: Path, tmp: Path) -> list[tuple[str, str]]:
    """Every storage operation of one repack of a copy of ``path``, in order."""
    shutil.copytree(path, tmp)
    counter = FaultStorage(LocalStorage(tmp))
    wb.Bank(counter, workers=2).repack()
    return list(counter.ops)


def _bulk(name: str, key: str) -> bool:
    """One chunk read or copied: a scenario with 1500 chunks is swept over a sample of these."""
    return name == "writer.write" or (name == "read" and key.startswith(PACKS))


def fault_points(ops: list[tuple[str, str]], *, writes_only: bool) -> list[int]:
    """Where to cut a repack short: every operation (0-based index among ``WRITE_OPS`` with
    ``writes_only``, 1-based among all otherwise), the bulk ones sampled (the first, the last and
    one in 400)."""
    chosen = [op for op in ops if op[0] in WRITE_OPS] if writes_only else ops
    first = 0 if writes_only else 1
    bulk_seen = 0
    out = []
    bulk_total = sum(1 for name, key in chosen if _bulk(name, key))
    for i, (name, key) in enumerate(chosen, start=first):
        if _bulk(name, key):
            bulk_seen += 1
            if bulk_seen not in (1, bulk_total) and bulk_seen % 400:
                continue
        out.append(i)
    return out


def check_survived(base: Base, d: Path, where: str, before: Picture) -> None:
    """After a repack cut short: everything loads bit-exact, verify finds at most orphans, and a
    second repack + gc leave exactly the live bytes with nothing changed."""
    assert_loads(d, base.states)
    with wb.open(d, create=False) as bank:
        assert problem_kinds(bank) <= {"orphan"}, (where, bank.verify().problems)
        assert Picture.of(bank) == before, where
        # A gc right after the failure keeps everything someone still reads.
        bank.gc(grace=0)
    assert_loads(d, base.states)
    with wb.open(d, create=False) as bank:
        bank.repack()
        collect(bank)
        assert Picture.of(bank) == before, where
        assert not list(bank.storage.list("leases/")), where
    assert_loads(d, base.states)
    assert_compact(d, base.survivors, where)


@pytest.mark.parametrize(
    "scenario", ["pairs-raw", "pairs-auto", pytest.param("segments", marks=pytest.mark.slow)]
)
def test_repack_failing_after_every_write_loses_nothing(tmp_path: Path, scenario: str) -> None:
    base = sweep_base(tmp_path / "base", scenario)
    with wb.open(base.path, create=False) as bank:
        before = Picture.of(bank)
    ops = _count_ops(base.path, tmp_path / "count")
    writes = sum(1 for name, _ in ops if name in WRITE_OPS)
    assert {"write", "writer.write", "writer.commit"} <= {name for name, _ in ops if name in WRITE_OPS}
    if scenario == "segments":
        assert sum(1 for name, key in ops if name == "write" and key.startswith(SEGMENTS)) >= 2
    points = fault_points(ops, writes_only=True)
    assert len(points) >= 8
    for n in points:
        where = f"failed after {n}/{writes} writes"
        d = tmp_path / f"fail{n:04d}"
        shutil.copytree(base.path, d)
        storage = FaultStorage(LocalStorage(d), fail_after_writes=n)
        with pytest.raises(OSError, match="injected fault"):
            wb.Bank(storage, workers=2).repack()
        assert storage.failed >= 1, where
        assert not list(LocalStorage(d).list("leases/")), f"{where}: a failed repack must drop its lease"
        check_survived(base, d, where, before)
        shutil.rmtree(d)


# -- 7. a SIGKILL at every storage operation ------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("scenario", "torn"),
    [("pairs-auto", False), ("pairs-raw", True), ("segments", False)],
    ids=["auto", "raw-torn", "segments"],
)
def test_sigkill_at_every_storage_operation_of_a_repack(
    tmp_path: Path, scenario: str, torn: bool, children: Children
) -> None:
    base = sweep_base(tmp_path / "base", scenario)
    with wb.open(base.path, create=False) as bank:
        before = Picture.of(bank)
    ops = _count_ops(base.path, tmp_path / "count")
    points = fault_points(ops, writes_only=False)
    assert len(points) > 20
    jobs = []
    for n in points:
        d = tmp_path / f"kill{n:04d}"
        shutil.copytree(base.path, d)
        jobs.append([str(d), n, torn])
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    proc = subprocess.Popen(
        [sys.executable, str(REPACK_CHILD), "sweep", str(tmp_path / "jobs.json")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=str(tmp_path),
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    children.procs.append(proc)  # killed and reaped if the test fails first
    lines = finish(proc, timeout=550)
    results = json.loads(next(line for line in lines if line.startswith("result "))[len("result ") :])
    assert len(results) == len(points)
    for n, res in zip(points, results, strict=True):
        where = f"killed at op {n}/{len(ops)} {ops[n - 1]}"
        assert res.get("signal") == signal.SIGKILL, f"{where}: {res}"
        d = Path(res["dir"])
        check_survived(base, d, where, before)
        shutil.rmtree(d)


# -- 8. gc and release records ---------------------------------------------------------------------


def stamped(storage: Storage, repack: str, packs: list[str], when: float) -> None:
    """Write ``repack``'s release record stamped ``when`` (what ``releases.stamp`` stores: the stored
    record is the contract gc reads, whatever the helper's signature)."""
    storage.write(release_key(repack), seal({"repack": repack, "packs": packs, "released_at": when}))


def _stray_pack(storage: Storage, save_id: str) -> str:
    key = pack_key(save_id, 0)
    storage.write(key, os.urandom(4096))
    return key


def test_gc_keeps_released_packs_until_the_record_is_stamped_and_old_enough(tmp_path: Path) -> None:
    with wb.open(tmp_path / "bank") as bank:
        bank.save({"w": noise(0, 64)})
        s = bank.storage
        pack = _stray_pack(s, "0feed0000000000000000001")
        stray = _stray_pack(s, "0feed0000000000000000002")
        # A repack in progress: its lease is live, its record unstamped.
        leases.acquire(s, "rp1")
        releases.begin(s, "rp1", [pack])
        report = bank.gc(grace=0)
        assert stray in report.packs_deleted and pack not in report.packs_deleted
        assert s.exists(pack)
        (rel,) = releases.read_all(s)
        assert rel.released_at is None, "gc must not stamp the record of a repack still running"
        # Stamped now, while a lease older than the stamp is live: kept (that save may read the old places).
        stamped(s, "rp1", [pack], time.time())
        leases.release(s, "rp1")
        leases.acquire(s, "a-save")
        (lease,) = leases.all_leases(s)
        stamped(s, "rp1", [pack], lease.started + 1e-3)
        assert pack not in bank.gc(grace=0).packs_deleted
        assert s.exists(pack) and s.exists(release_key("rp1"))
        # Stamped before the oldest live lease began: nobody can hold its places.
        stamped(s, "rp1", [pack], lease.started - 10)
        assert pack in bank.gc(grace=0).packs_deleted
        assert not s.exists(pack) and not s.exists(release_key("rp1"))
        leases.release(s, "a-save")
        # Within the grace period: kept; past it, with no lease: freed, record dropped.
        pack2 = _stray_pack(s, "0feed0000000000000000003")
        releases.begin(s, "rp2", [pack2])
        stamped(s, "rp2", [pack2], time.time() - 100)
        bank.gc(grace=3600)
        assert s.exists(pack2) and s.exists(release_key("rp2"))
        report = bank.gc(grace=0)
        assert pack2 in report.packs_deleted and not s.exists(release_key("rp2"))
        assert bank.verify().problems == ()


def test_gc_dry_run_leaves_release_records_alone(tmp_path: Path) -> None:
    with wb.open(tmp_path / "bank") as bank:
        s = bank.storage
        pack = _stray_pack(s, "0feed0000000000000000004")
        releases.begin(s, "rp3", [pack])
        stamped(s, "rp3", [pack], time.time() - 100)
        report = bank.gc(grace=0, dry_run=True)
        assert pack in report.packs_deleted
        assert s.exists(pack) and s.exists(release_key("rp3"))
        releases.begin(s, "rp4", [pack])
        bank.gc(grace=0, dry_run=True)
        assert [r.released_at for r in releases.read_all(s) if r.repack == "rp4"] == [None]


def test_gc_stamps_the_record_a_dead_repack_left(tmp_path: Path) -> None:
    with wb.open(tmp_path / "bank") as bank:
        s = bank.storage
        pack = _stray_pack(s, "0feed0000000000000000005")
        releases.begin(s, "dead-repack", [pack])  # no lease: the repack died after writing its record
        t0 = time.time()
        assert pack not in bank.gc(grace=0).packs_deleted
        (rel,) = releases.read_all(s)
        assert rel.released_at is not None and t0 <= rel.released_at <= time.time()
        assert pack in bank.gc(grace=0).packs_deleted
        assert not list(s.list(RELEASED))


def test_a_stale_lease_does_not_keep_a_record_unstamped(tmp_path: Path) -> None:
    with wb.open(tmp_path / "bank") as bank:
        s = bank.storage
        pack = _stray_pack(s, "0feed0000000000000000006")
        s.write(
            "leases/rp5.json",
            seal({"save": "rp5", "host": socket.gethostname(), "pid": dead_pid(), "started": time.time()}),
        )
        releases.begin(s, "rp5", [pack])
        report = bank.gc(grace=0)
        assert report.leases_dropped == 1 and pack not in report.packs_deleted
        assert all(r.released_at is not None for r in releases.read_all(s))
        assert pack in bank.gc(grace=0).packs_deleted


@pytest.mark.parametrize(
    "damage",
    ["garbage", "truncated", "other-repack", "not-a-pack"],
)
def test_gc_refuses_to_run_on_a_damaged_release_record(tmp_path: Path, damage: str) -> None:
    with wb.open(tmp_path / "bank") as bank:
        s = bank.storage
        pack = _stray_pack(s, "0feed0000000000000000007")
        stamped(s, "rp6", [pack], time.time() - 100)
        good = s.read(release_key("rp6"))
        if damage == "garbage":
            s.write(release_key("rp6"), b"\x00not a record")
        elif damage == "truncated":
            s.write(release_key("rp6"), good[: len(good) // 2])
        elif damage == "other-repack":
            stamped(s, "rp7", [pack], time.time() - 100)
            s.write(release_key("rp6"), s.read(release_key("rp7")))
            s.delete(release_key("rp7"))
        else:
            s.write(
                release_key("rp6"), seal({"repack": "rp6", "packs": ["manifests/x.json"], "released_at": 1.0})
            )
        (rel,) = releases.read_all(s)
        assert rel.problem
        with pytest.raises(wb.CorruptObject, match="refuses"):
            bank.gc(grace=0)
        assert s.exists(pack), "gc deleted data while refusing"


def test_verify_reports_a_damaged_release_record(tmp_path: Path) -> None:
    with wb.open(tmp_path / "bank") as bank:
        bank.save({"w": noise(0, 64)})
        bank.storage.write(release_key("rp8"), b"\x00not a record")
        with pytest.raises(wb.CorruptObject, match="verify"):
            bank.gc(grace=0)
        assert not bank.verify().ok


# -- 9. segments -----------------------------------------------------------------------------------


def wide_state(seed: int, n: int = 400, changed: int = 0) -> State:
    """``n`` small tensors: a format-3 manifest of this many stores its body in segments.
    The first ``changed`` tensors depend on ``seed``, the rest are the same for every seed."""
    return {f"layer{i:03d}": noise((seed if i < changed else 0) * 10_000 + i, 16) for i in range(n)}


def _segments(storage: Storage) -> set[str]:
    return {i.key for i in storage.list(SEGMENTS)}


def test_gc_deletes_the_segments_only_deleted_manifests_name(tmp_path: Path) -> None:
    with wb.open(tmp_path / "bank") as bank:
        ids = []
        states = {}
        for s in range(4):
            st = wide_state(s, changed=60 * s)  # each step changes more: its own segments and shared ones
            ids.append(bank.save(st, run="r", step=s, codec="raw").id)
            states[ids[-1]] = st
        segs = {cid: set(manifest(bank.storage, cid).segments) for cid in ids}
        assert all(segs.values()), "a manifest of 400 tensors should be stored in segments"
        assert set().union(*segs.values()) == _segments(bank.storage)
        shared = segs[ids[0]] & segs[ids[3]]
        assert shared, "unchanged tensors should share segments"
        doomed, kept = ids[:2], ids[2:]
        for cid in doomed:
            bank.delete(cid)
        needed = set().union(*(segs[c] for c in kept))
        gone = set().union(*(segs[c] for c in doomed)) - needed
        assert gone, "the deleted manifests should have segments of their own"
        assert bank.gc(grace=3600).segments_deleted == 0, "grace keeps young segments"
        report = bank.gc(grace=0)
        assert report.segments_deleted == len(gone)
        assert _segments(bank.storage) == needed
        assert bank.verify().problems == ()
        assert bank.gc(grace=0).segments_deleted == 0
    assert_loads(tmp_path / "bank", {c: states[c] for c in kept})


def test_repack_keeps_body_segments_and_gc_frees_replaced_location_segments(tmp_path: Path) -> None:
    """A checkpoint of 1500 chunks stores its locations in segments too: a repack writes new ones
    (the body segments stay, the id covers them) and gc frees the old ones."""
    path = tmp_path / "bank"
    k = 1500
    keep = {f"k{i:04d}": noise(i, 16) for i in range(k)}
    with wb.open(path) as bank:
        q = bank.save({**keep, **{f"d{i:04d}": noise(10**6 + i, 16) for i in range(k)}}, run="q", codec="raw")
        p = bank.save(keep, run="p", codec="raw")
        before = set(manifest(bank.storage, p.id).segments)
        bank.delete(q.id)
        bank.gc(grace=0)
        report = bank.repack()
        assert report.manifests_rewritten == 1
        after = set(manifest(bank.storage, p.id).segments)
        assert after != before and len(after & before) >= 1  # body segments kept, location segments new
        replaced = before - after
        gc = bank.gc(grace=0)
        assert gc.segments_deleted == len(replaced)
        assert _segments(bank.storage) == after
        assert bank.verify().problems == ()
    assert_loads(path, {p.id: keep})


# -- bugs ------------------------------------------------------------------------------------------


def _location_segment_bank(path: Path, k: int = 1500) -> tuple[str, dict[str, torch.Tensor]]:
    """A checkpoint P of ``k`` chunks (locations in segments) in a pack that is half dead."""
    keep = {f"k{i:04d}": noise(i, 16) for i in range(k)}
    with wb.open(path) as bank:
        q = bank.save({**keep, **{f"d{i:04d}": noise(10**6 + i, 16) for i in range(k)}}, run="q", codec="raw")
        p = bank.save(keep, run="p", codec="raw")
        bank.delete(q.id)
        bank.gc(grace=0)
    return p.id, keep


def test_a_save_in_flight_keeps_the_location_segments_it_shares_with_a_repacked_parent(
    tmp_path: Path,
) -> None:
    path = tmp_path / "bank"
    parent, keep = _location_segment_bank(path)
    saver = wb.open(path, create=False)
    part = saver.save_part(keep, codec="auto", parent=parent)
    assert part.stats.reused_chunks == len(keep)
    _repack_and_collect(path, in_flight=True)
    info = saver.commit([part], run="c", parent=parent)
    saver.close()
    assert_loads(path, {info.id: keep, parent: keep})


class _AfterRead(FaultStorage):
    """Runs ``hook`` once, right after the first read of ``key`` returns (before the caller sees it)."""

    def __init__(self, inner: Storage, key: str, hook: Callable[[], object]) -> None:
        super().__init__(inner)
        self._key = key
        self._hook: Callable[[], object] | None = hook

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        data = super().read(key, offset, length)
        if key == self._key and self._hook is not None:
            hook, self._hook = self._hook, None
            hook()
        return data


def test_a_load_reading_a_manifest_while_it_is_repacked_and_collected(tmp_path: Path) -> None:
    path = tmp_path / "bank"
    parent, keep = _location_segment_bank(path)
    reader = wb.Bank(_AfterRead(LocalStorage(path), manifest_key(parent), lambda: _repack_and_collect(path)))
    assert_same_state(reader.load(parent), keep)


def test_a_checkpoint_deleted_while_repack_rewrites_it_stays_deleted(tmp_path: Path) -> None:
    hd = build_half_dead(tmp_path / "bank", pairs=2)
    victim = hd.slim[0]
    deleter = wb.open(hd.path, create=False)
    done: list[str] = []

    def on_op(n: int, name: str, key: str) -> None:
        if name == "write" and key == manifest_key(victim) and not done:
            done.append(deleter.delete(victim, force=True))

    wb.Bank(FaultStorage(LocalStorage(hd.path), on_op=on_op)).repack()
    assert done == [victim]
    with wb.open(hd.path, create=False) as fresh:
        assert victim not in {c.id for c in fresh.log()}
        assert not fresh.storage.exists(manifest_key(victim))


class _Killed(BaseException):
    """A repack stopped dead right after a write (what SIGKILL would leave)."""


class _DeleteThenKill(FaultStorage):
    """On the write of ``key``: runs ``delete`` first (a delete crossing the rewrite), then the write, then stops."""

    def __init__(self, inner: Storage, key: str, delete: Callable[[], object]) -> None:
        super().__init__(inner)
        self._key = key
        self._delete: Callable[[], object] | None = delete

    def write(self, key: str, data: bytes | memoryview) -> None:
        if key == self._key and self._delete is not None:
            delete, self._delete = self._delete, None
            delete()
            super().write(key, data)
            raise _Killed
        super().write(key, data)


def _undone_delete(tmp_path: Path) -> tuple[HalfDead, str]:
    """A bank where a repack was killed right after rewriting the head of a checkpoint whose
    delete finished meanwhile (the manifest is back); that checkpoint's id."""
    hd = build_half_dead(tmp_path / "bank", pairs=2)
    victim = hd.slim[0]
    deleter = wb.open(hd.path, create=False)
    storage = _DeleteThenKill(
        LocalStorage(hd.path), manifest_key(victim), lambda: deleter.delete(victim, force=True)
    )
    with pytest.raises(_Killed):
        wb.Bank(storage).repack()
    return hd, victim


@pytest.mark.parametrize("then", ["gc", "repair-index", "repack"])
def test_a_repack_killed_after_putting_a_deleted_manifest_back_does_not_bring_it_back(
    tmp_path: Path, then: str
) -> None:
    hd, victim = _undone_delete(tmp_path)
    assert (hd.path / manifest_key(victim)).exists(), "the state a kill at that point leaves"
    with wb.open(hd.path, create=False) as fresh:
        if then == "gc":
            fresh.gc(grace=0)
        elif then == "repair-index":
            fresh.repair_index()
        else:
            fresh.repack()
        assert not fresh.storage.exists(manifest_key(victim))
        assert victim not in {c.id for c in fresh.log()}
        with pytest.raises(wb.CheckpointNotFound):
            fresh.load(victim)
        for _ in range(2):
            fresh.gc(grace=0)
        assert fresh.verify().problems == ()
        for cid in hd.slim[1:]:
            assert_same_state(fresh.load(cid), hd.states[cid])


def test_an_undone_delete_waits_for_writers_and_then_protects_what_its_head_named(tmp_path: Path) -> None:
    hd, victim = _undone_delete(tmp_path)
    with wb.open(hd.path, create=False) as fresh:
        head = fresh.checkpoint(victim).manifest
        leases.acquire(fresh.storage, "a" * 28)  # a writer at work (a copy back could be one)
        assert maintenance.finish_undone_deletes(fresh.storage) == []
        assert fresh.storage.exists(manifest_key(victim)), "left alone while a lease is live"
        leases.release(fresh.storage, "a" * 28)
        before = time.time()
        assert maintenance.finish_undone_deletes(fresh.storage) == [victim]
        (entry,) = [e for e in maintenance.read_trash(fresh.storage) if e.cid == victim]
        assert entry.deleted_at is not None and entry.deleted_at >= before, "protects from now on"
        assert set(head.packs) <= set(entry.also) | set(entry.manifest.packs)  # type: ignore[union-attr]
        assert maintenance.finish_undone_deletes(fresh.storage) == []


def test_delete_with_a_stale_cached_manifest_keeps_what_a_save_in_flight_reuses(tmp_path: Path) -> None:
    hd = build_half_dead(tmp_path / "bank", pairs=2)
    parent = hd.slim[1]
    deleter = wb.open(hd.path, create=False)
    deleter.delete(hd.slim[0])  # so the repack writes a pack only the parent uses
    deleter.gc(grace=0)
    deleter.load(parent)  # cached with its places before the repack
    _repack_and_collect(hd.path)
    saver = wb.open(hd.path, create=False)
    part = saver.save_part({"keep": hd.states[parent]["keep"]}, codec="auto", parent=parent)
    assert part.stats.reused_chunks == 1
    deleter.delete(parent, force=True)
    with wb.open(hd.path, create=False) as other:
        other.gc(grace=0)  # the save's lease is live: what it reuses must stay
    info = saver.commit([part], run="after", parent=None)
    assert_loads(hd.path, {info.id: {"keep": hd.states[parent]["keep"]}})


def test_prefetch_after_another_bank_repacks_and_collects(tmp_path: Path) -> None:
    hd = build_half_dead(tmp_path / "bank", pairs=2)
    with wb.open(hd.path, create=False, cache=tmp_path / "cache") as bank:
        bank.load(hd.slim[0])
        _repack_and_collect(hd.path)
        report = bank.prefetch(hd.slim[0])
    assert report.enabled


def test_verify_of_one_checkpoint_after_another_bank_repacks_and_collects(tmp_path: Path) -> None:
    hd = build_half_dead(tmp_path / "bank", pairs=2)
    with wb.open(hd.path, create=False) as bank:
        bank.load(hd.slim[0])
        _repack_and_collect(hd.path)
        assert bank.verify().problems == ()  # the whole bank: manifests listed and read afresh
        assert bank.verify(hd.slim[0]).problems == ()


def test_prune_estimate_after_a_repack(tmp_path: Path) -> None:
    hd = build_half_dead(tmp_path / "bank", pairs=2)
    with wb.open(hd.path, create=False) as bank:
        bank.delete(hd.slim[0])
        bank.gc(grace=0)
        (new,) = bank.repack().packs_written
        bank.gc(grace=0)
        size = bank.storage.size(new)
        dry = bank.prune(run="slim", keep_last=0, keep_tagged=False, dry_run=True)
        assert dry.deleted == (hd.slim[1],)
        real = bank.prune(run="slim", keep_last=0, keep_tagged=False)
        assert bank.gc(grace=0).bytes_freed == size
        assert (dry.bytes_freed, real.bytes_freed) == (size, size)


# -- on every backend, SeaweedFS included --------------------------------------------------------


def test_repack_then_gc_on_every_backend(bank: wb.Bank) -> None:
    """The same verbs on local, memory and a real S3 server (SeaweedFS): segments, the lock ref, the
    in-place rewrite of a manifest object and the release record all work there too."""
    g = torch.Generator().manual_seed(3)
    shared = torch.randn(4096, generator=g)
    states = []
    ids = []
    for s in range(4):
        state = {"a": torch.randn(4096, generator=g), "shared": shared}
        state.update({f"small.{i}": torch.full((4,), float(i + s)) for i in range(400)})  # segments
        states.append(state)
        ids.append(bank.save(state, run="r", step=s, codec="raw", tags=["prod"] if s == 3 else ()).id)
    assert bank.checkpoint(ids[3]).manifest.segments, "the state is big enough for segments"
    bank.delete(ids[0])
    bank.delete(ids[1])
    bank.gc(grace=0)
    report = bank.repack()
    assert report.packs_rewritten and report.manifests_rewritten >= 1
    assert not list(bank.storage.list_refs("refs/locks/"))
    bank.gc(grace=0)
    for cid, state in zip(ids[2:], states[2:], strict=True):
        out = bank.load(cid)
        assert all(torch.equal(out[k], v) for k, v in state.items())
    assert [c.id for c in bank.log("r")] == [ids[3], ids[2]] and bank.resolve("prod") == ids[3]
    assert bank.verify().ok
