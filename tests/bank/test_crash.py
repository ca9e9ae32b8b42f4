"""Crash safety with real process kills: SIGKILL at every storage operation of a save, a tag
change and a gc, and at random moments of a process looping over all of them.

After every kill the bank must show no partial checkpoint, still load every
committed checkpoint bit-exact, verify ok (orphan packs allowed), keep tags on
committed checkpoints with a history that replays, and come out of
``gc(grace=0)`` with no orphan and no stale lease left (see
:func:`tests.bank.faults.check_bank`).
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

import weightbank as wb
from weightbank.bank.layout import INDEX_HEAD, LEASES, MANIFESTS, PACKS, TAGS, TRASH, manifest_key
from weightbank.storage import LocalStorage
from weightbank.storage.memory import forget

from .faults import (
    CHUNK,
    SCENARIOS,
    WRITE_OPS,
    Children,
    FaultStorage,
    assert_same_state,
    build_base,
    check_bank,
    finish,
    make_state,
    read_line,
)


def _expected_after(ops: list[tuple[str, str]], done: int, base: set[str]) -> tuple[set[str], int]:
    """From the first ``done`` operations of a full run: which base checkpoints survive, and
    whether a new manifest was committed (1) or not (0)."""
    survivors = set(base)
    committed = 0
    for name, key in ops[:done]:
        if name == "write" and key.startswith(MANIFESTS):
            committed = 1
        if name == "delete" and key.startswith(MANIFESTS):
            survivors -= {cid for cid in base if manifest_key(cid) == key}
    return survivors, committed


def _puts(ops: list[tuple[str, str]], done: int, tag: str) -> int:
    return sum(1 for name, key in ops[:done] if name == "put_ref" and key == f"{TAGS}{tag}.json")


@pytest.mark.parametrize(
    ("scenario", "torn"),
    [("save", False), ("save", True), ("tag", False), ("gc", False)],
    ids=["save", "save-torn", "tag", "gc"],
)
def test_sigkill_at_every_storage_operation(
    tmp_path: Path, scenario: str, torn: bool, children: Children
) -> None:
    """Kill a worker at operation N for every N of the scenario; the bank after each kill holds
    exactly what the operations before N committed, and every invariant holds."""
    base = tmp_path / "base"
    ids = build_base(base)
    with wb.open(base) as b:
        history_before = {t: len(b.tag_history(t)) for t in ("prod", "latest")}

    # A full run through the fault wrapper counts the operations and gives their order.
    shutil.copytree(base, tmp_path / "count")
    counter = FaultStorage(LocalStorage(tmp_path / "count"))
    SCENARIOS[scenario](wb.Bank(counter, workers=2))
    ops = list(counter.ops)
    assert len(ops) > 8

    jobs = []
    for n in range(1, len(ops) + 1):
        d = tmp_path / f"kill{n:03d}"
        shutil.copytree(base, d)
        jobs.append([str(d), n, torn, False])
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    lines = finish(children.spawn("sweep", scenario, tmp_path / "jobs.json", cwd=str(tmp_path)), timeout=300)
    results = json.loads(next(line for line in lines if line.startswith("result "))[len("result ") :])

    assert len(results) == len(ops)
    for n, res in enumerate(results, start=1):
        where = f"{scenario}: killed at op {n}/{len(ops)} {ops[n - 1]}"
        assert res.get("signal") == signal.SIGKILL, f"{where}: worker was not killed: {res}"
        survivors, committed = _expected_after(ops, n - 1, set(ids))
        log = check_bank(res["dir"], must_have=survivors)
        assert len(set(log) - set(ids)) == committed, where
        assert set(log) & set(ids) == survivors, where
        with wb.open(res["dir"], create=False) as b:
            for tag in ("prod", "latest"):
                assert len(b.tag_history(tag)) == history_before[tag] + _puts(ops, n - 1, tag), where


def test_kill_points_cover_the_whole_commit_order(tmp_path: Path) -> None:
    """The save sweep really crosses every phase of the commit order, so every phase was killed."""
    build_base(tmp_path / "b")
    counter = FaultStorage(LocalStorage(tmp_path / "b"))
    SCENARIOS["save"](wb.Bank(counter, workers=2))
    ops = counter.ops

    def first(op: str, prefix: str) -> int:
        return next(i for i, (n, k) in enumerate(ops) if n == op and k.startswith(prefix))

    order = [
        first("write", LEASES),
        first("open_writer", PACKS),
        first("writer.commit", PACKS),
        first("write", MANIFESTS),
        first("delete", LEASES),
        first("put_ref", TAGS),
    ]
    assert order == sorted(order), ops
    assert sum(1 for n, _ in ops if n == "writer.write") >= 3, "the save should write several chunks"


@pytest.mark.slow
def test_random_sigkills_of_a_process_saving_tagging_and_collecting(
    tmp_path: Path, children: Children
) -> None:
    """A child loops save/tag/rollback/prune/gc; it is SIGKILLed at random moments, round after round."""
    path = tmp_path / "bank"
    wb.open(path).close()
    rng = random.Random(1234)
    saved: set[str] = set()
    deleting: set[str] = set()  # announced: they may be gone
    deleted: set[str] = set()  # confirmed: they must be gone
    tagged: list[float] = []
    for round_ in range(6):
        child = children.spawn("loop", path, round_)
        read_line(child, "ready")
        # the kill lands at a random moment, but only after a first save of the round: a count,
        # so a slow machine never leaves a round with nothing committed
        saved.add(read_line(child, "saved").split()[1])
        time.sleep(rng.uniform(0.05, 0.8))
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate(timeout=30)
        assert child.returncode == -signal.SIGKILL
        for line in out.splitlines():
            word, *rest = line.split()
            if word == "saved":
                saved.add(rest[0])
            elif word == "deleting":
                deleting.update(rest)
            elif word == "pruned":
                deleted.update(deleting)
            elif word == "tagged":
                tagged.append(float(rest[0]))
        log = check_bank(path, must_have=saved - deleting)
        assert deleted.isdisjoint(log), "a pruned checkpoint came back"
        if tagged:
            with wb.open(path, create=False) as b:
                at = [e.at for e in b.tag_history("prod")]
            assert set(tagged) <= set(at), "a tag change that returned is missing from the history"
    assert len(saved) >= 6, "the child should have committed saves across the rounds"


def test_torn_manifest_is_reported_never_loaded_and_blocks_gc(tmp_path: Path, children: Children) -> None:
    """A manifest torn by a crash on a non-atomic store (or a damaged disk) is caught by its id."""
    path = tmp_path / "bank"
    ids = build_base(path)
    # Kill a save exactly at its manifest write, publishing half of it (what a non-atomic store leaves).
    counter = FaultStorage(LocalStorage(tmp_path / "count"))
    shutil.copytree(path, tmp_path / "count")
    SCENARIOS["save"](wb.Bank(counter, workers=2))
    at = next(i for i, (n, k) in enumerate(counter.ops, 1) if n == "write" and k.startswith(MANIFESTS))
    (tmp_path / "jobs.json").write_text(json.dumps([[str(path), at, False, True]]))
    lines = finish(children.spawn("sweep", "save", tmp_path / "jobs.json", cwd=str(tmp_path)))
    assert json.loads(lines[-1][len("result ") :])[0]["signal"] == signal.SIGKILL
    # And damage a committed manifest in place: garbage over its second half.
    damaged = Path(path, manifest_key(ids[2]))
    raw = damaged.read_bytes()
    damaged.write_bytes(raw[: len(raw) // 2] + b"\x00garbage")

    with wb.open(path, create=False) as bank:
        torn = [i.key for i in bank.storage.list(MANIFESTS) if i.key not in {manifest_key(c) for c in ids}]
        assert len(torn) == 1, "the killed save should have left exactly one torn manifest"
        torn_id = torn[0].rsplit("/", 1)[1][: -len(".json")]
        for bad in (ids[2], torn_id):
            with pytest.raises(wb.CorruptObject):
                bank.load(bad)
        report = bank.verify()
        assert not report.ok
        bad_manifests = {p.checkpoint for p in report.problems if p.kind == "manifest"}
        assert bad_manifests == {ids[2], torn_id}
        assert {p.kind for p in report.problems} <= {"manifest", "orphan"}
        for step in (0, 1, 3):
            assert_same_state(bank.load(f"r@{step}"), make_state("r", step))
        # `log` reads the catalog index, which recorded both commits: it lists them; reading one finds the damage.
        assert {c.id for c in bank.log()} == {*ids, torn_id}
        packs_before = sorted(i.key for i in bank.storage.list(PACKS))
        with pytest.raises(wb.CorruptObject, match="refuses"):
            bank.gc(grace=0)
        assert sorted(i.key for i in bank.storage.list(PACKS)) == packs_before, "gc deleted data anyway"


def test_torn_pack_write_is_invisible_and_collected(tmp_path: Path, children: Children) -> None:
    """A crash halfway through a pack write on the local backend leaves nothing a reader can see."""
    path = tmp_path / "bank"
    build_base(path)
    counter = FaultStorage(LocalStorage(tmp_path / "count"))
    shutil.copytree(path, tmp_path / "count")
    SCENARIOS["save"](wb.Bank(counter, workers=2))
    writes = [i for i, (n, k) in enumerate(counter.ops, 1) if n == "writer.write" and k.startswith(PACKS)]
    (tmp_path / "jobs.json").write_text(json.dumps([[str(path), writes[-1], True, False]]))
    lines = finish(children.spawn("sweep", "save", tmp_path / "jobs.json", cwd=str(tmp_path)))
    assert json.loads(lines[-1][len("result ") :])[0]["signal"] == signal.SIGKILL
    assert any(Path(path, "tmp").iterdir()), "the torn bytes should sit in the scratch area"
    packs = {i.key for i in LocalStorage(path).list(PACKS)}
    check_bank(path)
    with wb.open(path, create=False) as bank:
        assert {i.key for i in bank.storage.list(PACKS)} <= packs
        assert len(bank.log()) == 4
        info = bank.save(make_state("r", 4), run="r", step=4, chunk_size=CHUNK)
        assert_same_state(bank.load(info.id), make_state("r", 4))
        assert torch.equal(bank.load("r@latest")["counts"], torch.arange(5))


def _snapshot(bank: wb.Bank) -> dict[str, object]:
    """Everything a reader can see: data objects by key and size, refs by content."""
    seen: dict[str, object] = {
        i.key: i.size for prefix in (PACKS, MANIFESTS, LEASES, TRASH) for i in bank.storage.list(prefix)
    }
    for key in bank.storage.list_refs(TAGS):
        ref = bank.storage.get_ref(key)
        seen[key] = ref.data if ref is not None else None
    return seen


@pytest.mark.parametrize("backend", ["local", "memory"])
def test_save_failing_after_n_writes_leaves_nothing_visible(
    tmp_path: Path, backend: str, request: pytest.FixtureRequest
) -> None:
    """OSError at every write of a save: before the manifest nothing changes (a failed manifest
    write leaves only orphan packs for gc); after it the checkpoint is complete and only the tag
    moves that failed are missing. Either way the bank loads everything else and the next save works."""

    def url(n: object) -> str:
        return str(tmp_path / f"b{n}") if backend == "local" else f"memory://{tmp_path.name}-{n}"

    def fresh(n: object) -> list[str]:
        if backend == "memory":
            return build_base(url(n))
        shutil.copytree(url("base"), url(n))
        return base_ids

    names: list[object] = ["base", "count"]

    def drop_memory_stores() -> None:
        for n in names if backend == "memory" else []:
            forget(url(n)[len("memory://") :])

    request.addfinalizer(drop_memory_stores)
    base_ids = build_base(url("base"))
    fresh("count")
    counter = FaultStorage(wb.open(url("count")).storage)
    SCENARIOS["save"](wb.Bank(counter, workers=2))
    writes = [(n, k) for n, k in counter.ops if n in WRITE_OPS]
    commit = next(i for i, (n, k) in enumerate(writes) if n == "write" and k.startswith(MANIFESTS))
    # After the commit: the head's done mark (best effort), then the tag moves.
    assert [k for _, k in writes[commit + 1 :]] == [INDEX_HEAD, f"{TAGS}prod.json", f"{TAGS}latest.json"]

    names.extend(range(len(writes)))
    for n in range(len(writes)):
        ids = fresh(n)
        storage = FaultStorage(wb.open(url(n)).storage, fail_after_writes=n)
        bank = wb.Bank(storage, workers=2)
        before = _snapshot(bank)
        with pytest.raises(OSError, match="injected fault"):
            SCENARIOS["save"](bank)
        # A failed done mark is swallowed (readers look at the manifest instead): the tag move fails next.
        assert storage.failed == (2 if n == commit + 1 else 1)
        after = _snapshot(bank)
        if n < commit:
            assert after == before, f"fault at write {n + 1} ({writes[n]}) left something visible"
        elif n == commit:
            # The manifest write itself failed. It might have landed all the same (a lost reply), so the
            # save's packs are never deleted now: they stay behind, unreferenced and unleased, for gc.
            extra = set(after) - set(before)
            assert {k: after.get(k) for k in before} == before and all(k.startswith(PACKS) for k in extra)
        else:
            added = {k for k in after if k.startswith(MANIFESTS)} - set(before)
            assert len(added) == 1, "the manifest write succeeded: the checkpoint is committed"
            assert {k for k in after if k.startswith(LEASES)} == {k for k in before if k.startswith(LEASES)}
            moved = max(0, n - commit - 2)  # tag moves that landed before the fault
            assert bank.resolve("prod") == (bank.resolve("r@4") if moved >= 1 else ids[1])
        check_bank(url(n), must_have=set(ids), gc=False)
        storage.fail_after_writes = None
        info = bank.save(make_state("r", 5), run="r", step=5, chunk_size=CHUNK)
        assert_same_state(bank.load(info.id), make_state("r", 5))
        check_bank(url(n), must_have={*ids, info.id})
