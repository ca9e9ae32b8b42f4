"""``Bank.copy_to``: checkpoints into another bank (local, memory, SeaweedFS) with ids, lineage and tags.

1. every id, parent link, log entry and tag target is the same in the destination, every checkpoint
   loads bit-exact there (delta chains included), and the source is untouched;
2. dedup: a second copy writes only what the destination lacks, a rerun writes nothing;
3. a damaged source chunk stops the copy with CorruptObject and leaves the destination as it was;
4. a copy failing after any write leaves nothing half-visible, and a rerun completes it;
5. bad input gets a typed error.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import weightbank as wb
from weightbank.bank import transfer
from weightbank.bank.catalog import Catalog
from weightbank.bank.layout import PACKS, manifest_key
from weightbank.storage import LocalStorage

from .faults import WRITE_OPS, FaultStorage, assert_same_state
from .test_repack import fault_points

State = dict[str, Any]
N = 1 << 18  # 1 MiB of float32: saves code delta chains


def state(step: int) -> State:
    w = torch.randn(N, generator=torch.Generator().manual_seed(1))
    w[:: 97 - step] += 1e-3 * (step + 1)
    small = {f"small.{i}": torch.full((4,), float(i + step)) for i in range(300)}  # manifest segments
    return {"w": w, "frozen": torch.ones(1000), "meta": {"step": step}, **small}


def build(bank: wb.Bank, steps: int = 4) -> tuple[list[str], dict[str, State]]:
    ids, states = [], {}
    for s in range(steps):
        st = state(s)
        cid = bank.save(st, run="r", step=s, metrics={"loss": 1 / (s + 1)}, message=f"step {s}").id
        ids.append(cid)
        states[cid] = st
    bank.tag("prod", ids[min(1, steps - 1)], why="first")
    bank.tag("prod", ids[-1], why="newest")
    bank.tag("old", ids[0])
    return ids, states


def loads(bank: wb.Bank, states: dict[str, State]) -> None:
    for cid, want in states.items():
        assert_same_state(bank.load(cid), want, cid[:12])


def snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


# -- 1. everything the same ---------------------------------------------------------------------


def test_a_copy_keeps_ids_lineage_log_and_tags_on_every_backend(tmp_path: Path, bank: wb.Bank) -> None:
    with wb.open(tmp_path / "src") as src:
        ids, states = build(src)
        assert any(c.codec == "delta" for c in src.checkpoint(ids[-1]).manifest.chunks)
        before = snapshot(tmp_path / "src")
        report = src.copy_to(bank)
        assert report.copied == tuple(ids) and report.skipped == ()
        assert sorted(report.tags) == ["old", "prod"]
        assert snapshot(tmp_path / "src") == before, "the source is untouched"
        assert [c.id for c in bank.log()] == [c.id for c in src.log()]
        for cid in ids:
            a, b = src.info(cid), bank.info(cid)
            assert (a.parent, a.run, a.step, a.created, a.metrics, a.message) == (
                b.parent,
                b.run,
                b.step,
                b.created,
                b.metrics,
                b.message,
            )
        assert bank.resolve("prod") == ids[-1] and bank.resolve("prod~3") == ids[0]
        assert bank.resolve("old") == ids[0] and bank.resolve("r@best:loss") == src.resolve("r@best:loss")
        loads(bank, states)
        assert bank.verify().problems == ()


def test_a_copy_of_one_ref_with_its_ancestors(tmp_path: Path) -> None:
    with wb.open(tmp_path / "src") as src, wb.open(tmp_path / "dst") as dst:
        ids, states = build(src)
        report = src.copy_to(dst, "r@2", ancestors=True, tags=False)
        assert report.copied == tuple(ids[:3]) and report.tags == ()
        assert dst.tags() == [] and dst.resolve("r@latest") == ids[2]
        loads(dst, {cid: states[cid] for cid in ids[:3]})
        # Without its parent: the checkpoint is there, its lineage link points at nothing there.
        other = wb.open(tmp_path / "other")
        src.copy_to(other, ids[-1])
        assert other.info(ids[-1]).parent == ids[2]
        with pytest.raises(wb.CheckpointNotFound):
            other.resolve(f"{ids[-1]}~1")
        loads(other, {ids[-1]: states[ids[-1]]})


def test_a_copied_bank_can_be_saved_into_repacked_and_collected(tmp_path: Path) -> None:
    with wb.open(tmp_path / "src") as src, wb.open(tmp_path / "dst") as dst:
        ids, states = build(src)
        src.copy_to(dst)
        child = dst.save(state(4), run="r", step=4)
        assert child.parent == ids[-1]
        assert child.save_stats is not None and child.save_stats.reused_chunks > 0
        dst.untag("old")
        dst.delete(ids[0])
        dst.repack(keyframe="r@latest", min_dead=0.05)
        for _ in range(3):
            dst.gc(grace=0)
        assert dst.verify().problems == ()
        loads(dst, {**{c: states[c] for c in ids[1:]}, child.id: state(4)})


# -- 2. dedup --------------------------------------------------------------------------------------


def test_a_second_copy_writes_only_what_the_destination_lacks_and_a_rerun_nothing(tmp_path: Path) -> None:
    with wb.open(tmp_path / "src") as src, wb.open(tmp_path / "dst") as dst:
        ids, _ = build(src)
        first = src.copy_to(dst, ids[0])
        later = src.copy_to(dst, ids[1])
        assert later.bytes_reused > 0 and later.bytes_copied < first.bytes_copied
        packs = {i.key for i in dst.storage.list(PACKS)}
        again = src.copy_to(dst, ids[:2])
        assert again.copied == () and again.skipped == tuple(ids[:2]) and again.bytes_copied == 0
        assert {i.key for i in dst.storage.list(PACKS)} == packs


# -- 3. a damaged source ---------------------------------------------------------------------------


def test_a_damaged_source_chunk_stops_the_copy_and_leaves_the_destination_as_it_was(tmp_path: Path) -> None:
    with wb.open(tmp_path / "src") as src:
        ids, _ = build(src, steps=1)
        m = src.checkpoint(ids[0]).manifest
        big = max(m.chunks, key=lambda c: c.stored_len)
        pack = tmp_path / "src" / m.packs[big.pack]
        raw = bytearray(pack.read_bytes())
        raw[big.offset + big.stored_len // 2] ^= 0x40
        pack.write_bytes(bytes(raw))
        with wb.open(tmp_path / "dst") as dst:
            before = snapshot(tmp_path / "dst")
            with pytest.raises(wb.CorruptObject):
                src.copy_to(dst)
            assert snapshot(tmp_path / "dst") == before
            assert dst.log() == [] and dst.verify().problems == ()


# -- 4. cut short ----------------------------------------------------------------------------------


def test_a_copy_failing_after_every_write_leaves_nothing_half_visible(tmp_path: Path) -> None:
    with wb.open(tmp_path / "src") as src:
        ids, states = build(src, steps=2)
        wb.open(tmp_path / "empty").close()
        count = FaultStorage(LocalStorage(Path(shutil.copytree(tmp_path / "empty", tmp_path / "count"))))
        src.copy_to(wb.Bank(count, workers=2))
        points = fault_points(list(count.ops), writes_only=True)
        assert len(points) >= 6
        for n in points:
            d = Path(shutil.copytree(tmp_path / "empty", tmp_path / f"fail{n:03d}"))
            with pytest.raises(OSError, match="injected fault"):
                src.copy_to(wb.Bank(FaultStorage(LocalStorage(d), fail_after_writes=n), workers=2))
            with wb.open(d, create=False) as dst:
                there = [c.id for c in dst.log()]
                assert there == [c for c in reversed(ids) if c in there], f"write {n}: {there}"
                loads(dst, {c: states[c] for c in there})
                assert {p.kind for p in dst.verify().problems} <= {"orphan"}, (n, dst.verify().problems)
                assert not list(dst.storage.list("leases/")), f"write {n}: the lease must go"
                report = src.copy_to(dst)  # the rerun completes it
                assert set(report.copied) | set(report.skipped) == set(ids)
                dst.gc(grace=0)
                assert dst.verify().problems == ()
                loads(dst, states)
            shutil.rmtree(d)
        assert any(name in WRITE_OPS for name, _ in count.ops)


# -- 5. bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"refs": "nope"}, wb.CheckpointNotFound),
        ({"refs": 3}, wb.InvalidArgument),
        ({"refs": ["r@latest", None]}, wb.InvalidArgument),
    ],
)
def test_bad_refs_are_refused_and_nothing_is_copied(
    tmp_path: Path, kwargs: dict[str, Any], error: type
) -> None:
    with wb.open(tmp_path / "src") as src, wb.open(tmp_path / "dst") as dst:
        build(src, steps=1)
        with pytest.raises(error):
            src.copy_to(dst, **kwargs)
        assert dst.log() == []


def test_the_destination_must_be_another_bank(tmp_path: Path) -> None:
    with wb.open(tmp_path / "src") as src:
        build(src, steps=1)
        with pytest.raises(wb.InvalidArgument, match="dest"):
            src.copy_to(src)
        with pytest.raises(wb.InvalidArgument, match="dest"):
            src.copy_to(str(tmp_path / "src"))
        with pytest.raises(wb.InvalidArgument, match="dest"):
            src.copy_to(5)  # type: ignore[arg-type]


def test_format_1_checkpoints_cannot_move_but_do_not_stop_the_rest(tmp_path: Path) -> None:
    legacy = Path(__file__).resolve().parents[1] / "data" / "legacy_v1_bank"
    shutil.copytree(legacy, tmp_path / "old")
    with wb.open(tmp_path / "old", create=False) as old, wb.open(tmp_path / "dst") as dst:
        old_ids = [c.id for c in old.log()]
        with pytest.raises(wb.NotMovable, match="format 1 or 2") as e:
            old.copy_to(dst, ["tts@latest", old_ids[0]])
        tts = next(c.id for c in old.log() if c.run == "tts")
        assert isinstance(e.value, wb.InvalidArgument) and e.value.value == "tts@latest", "the ref as named"
        assert e.value.checkpoint == tts
        assert dst.log() == [], "a named old checkpoint stops the copy before anything is written"
        new = old.save(state(9), run="fresh", step=1).id
        report = old.copy_to(dst)
        assert report.copied == (new,) and set(report.refused) == set(old_ids)
        with_parents = old.copy_to(dst, new, ancestors=True)
        assert with_parents.skipped == (new,)
        assert_same_state(dst.load(new), state(9), "new")


# -- 6. a lineage, link by link -------------------------------------------------------------------


def pack_bytes(bank: wb.Bank) -> int:
    return sum(i.size for i in bank.storage.list(PACKS))


def test_copying_a_delta_lineage_writes_each_link_once(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(3)
    w = torch.randn(N, generator=g)
    with (
        wb.open(tmp_path / "src") as src,
        wb.open(tmp_path / "dst") as dst,
        wb.open(tmp_path / "sync") as sync,
    ):
        ids, states = [], {}
        for s in range(10):
            w = w.clone()
            w[torch.randint(0, N, (N // 20,), generator=g)] += (
                1e-2  # sparse updates: chains to the previous step
            )
            st = {"w": w}
            ids.append(src.save(st, run="r", step=s).id)
            states[ids[-1]] = st
        depths = [c.args.depth for c in src.checkpoint(ids[-1]).manifest.chunks if c.args is not None]
        assert max(depths) >= 3, "the source codes chains"
        report = src.copy_to(dst, ids[-1], ancestors=True)
        assert report.copied == tuple(ids)
        assert pack_bytes(dst) <= 1.05 * pack_bytes(src), (pack_bytes(dst), pack_bytes(src))
        # a nightly sync of r@latest: each run copies the new link only
        for cid in ids:
            r = src.copy_to(sync, cid)
            assert r.bytes_copied <= 1.05 * src.checkpoint(cid).info.stored_bytes + 4096 or cid == ids[0]
        assert pack_bytes(sync) <= 1.05 * pack_bytes(src)
        for bank in (dst, sync):
            loads(bank, states)
            bank.gc(grace=0)
            assert bank.verify().problems == ()


def test_a_copy_that_finds_the_checkpoint_arrived_meanwhile_leaves_its_head_alone(tmp_path: Path) -> None:
    with wb.open(tmp_path / "src") as src, wb.open(tmp_path / "dst") as dst:
        ids, states = build(src, steps=2)
        src.copy_to(dst, ids[0])
        head = (tmp_path / "dst" / manifest_key(ids[0])).read_bytes()
        packs = {i.key for i in dst.storage.list(PACKS)}

        class Stale(Catalog):
            def exists(self, cid: str) -> bool:
                return False  # as a concurrent copy's catalog saw it, before this one committed

        stale = Stale(dst.storage, indexed=True, compact=True)
        assert transfer.copy_checkpoint(src.storage, dst.storage, stale, ids[0]) is None
        assert (tmp_path / "dst" / manifest_key(ids[0])).read_bytes() == head
        assert {i.key for i in dst.storage.list(PACKS)} == packs, "its own packs are dropped"
        assert not list(dst.storage.list("leases/"))
        loads(dst, {ids[0]: states[ids[0]]})


# -- 7. tags ---------------------------------------------------------------------------------------


def test_a_copy_never_moves_a_tag_the_destination_has_elsewhere_unless_asked(tmp_path: Path) -> None:
    with wb.open(tmp_path / "train") as train, wb.open(tmp_path / "serve") as serve:
        ids, _ = build(train, steps=3)
        train.tag("prod", ids[0], why="the old one")
        promoted = serve.save(state(7), run="serving", step=1, tags=["prod"]).id
        report = train.copy_to(serve, ids[0])
        assert report.tags == ("old",) and report.tags_left == ("prod",)
        assert serve.resolve("prod") == promoted, "the serving bank's prod is not rolled back"
        moved = train.copy_to(serve, ids[0], move_tags=True)
        assert moved.tags == ("prod",) and serve.resolve("prod") == ids[0]
        assert [e.new for e in serve.tag_history("prod")][-2:] == [promoted, ids[0]]


def test_a_path_destination(tmp_path: Path) -> None:
    with wb.open(tmp_path / "src") as src:
        ids, _ = build(src, steps=1)
        assert src.copy_to(tmp_path / "as-path", ids[0]).copied == (ids[0],)


def test_a_url_destination_is_opened_created_and_closed(tmp_path: Path) -> None:
    with wb.open(tmp_path / "src") as src:
        ids, states = build(src, steps=2)
        report = src.copy_to(str(tmp_path / "new"), "prod")
        assert report.copied == (ids[-1],) and report.tags == ("prod",)
    with wb.open(tmp_path / "new", create=False) as dst:
        loads(dst, {ids[-1]: states[ids[-1]]})


def test_a_checkpoint_deleted_there_and_copied_again_stays(tmp_path: Path) -> None:
    with wb.open(tmp_path / "src") as src, wb.open(tmp_path / "dst") as dst:
        ids, states = build(src, steps=2)
        src.copy_to(dst, ids[0], tags=False)
        dst.delete(ids[0], force=True)
        assert src.copy_to(dst, ids[0], tags=False).copied == (ids[0],)
        dst.gc(grace=0)  # a stamped trash entry and a manifest: a copy back, marked so, not an undone delete
        assert ids[0] in {c.id for c in dst.log()}
        loads(dst, {ids[0]: states[ids[0]]})
        dst.repair_index()
        assert ids[0] in {c.id for c in dst.log()}


def test_a_destination_gc_during_a_copy_frees_nothing_the_copy_writes(tmp_path: Path) -> None:
    with wb.open(tmp_path / "src") as src:
        ids, states = build(src, steps=3)
        wb.open(tmp_path / "dst").close()
        collector = wb.open(tmp_path / "dst", create=False)
        ran: list[str] = []

        def on_op(n: int, name: str, key: str) -> None:
            if name == "write" and key.startswith("manifests/"):
                ran.append(key)
                collector.gc(grace=0)  # right before each commit point: the packs are written, not named yet

        dst = wb.Bank(FaultStorage(LocalStorage(tmp_path / "dst"), on_op=on_op), workers=2)
        report = src.copy_to(dst)
        assert report.copied == tuple(ids) and len(ran) == len(ids)
        collector.gc(grace=0)
        with wb.open(tmp_path / "dst", create=False) as fresh:
            loads(fresh, states)
            assert fresh.verify().problems == ()


def test_move_tags_over_a_tag_that_names_a_checkpoint_deleted_there(tmp_path: Path) -> None:
    with wb.open(tmp_path / "train") as train, wb.open(tmp_path / "serve") as serve:
        ids, _ = build(train, steps=2)
        gone = serve.save(state(8), run="serving", step=0, tags=["prod"]).id
        serve.delete(gone, force=True)  # the tag still names it
        report = train.copy_to(serve, ids[-1], move_tags=True)
        assert "prod" in report.tags and serve.resolve("prod") == ids[-1]
