"""``repack(keyframe=...)``: delta chains turned around onto a new keyframe, no id changed.

What must hold (see ``weightbank.bank.recode``):

1. the keyframe loads with no chain at all, its ancestors become reverse deltas whose chains reach
   only newer checkpoints, every checkpoint loads bit-exact, and nothing a user sees changes
   (ids, log, tags with their history, lineage, events); a save after it chains onto the keyframe;
2. a keyframe in the middle of a run leaves the newer checkpoints as they are; chunks shared with
   checkpoints outside the window, lossy chunks, aliases, added and removed tensors all survive;
3. a save in flight across the recode and a gc, holding the old locations, commits whole and loads;
4. a recode cut short at any storage operation (an OSError, a SIGKILL) loses nothing, and a second
   repack + gc leave a bank verify finds clean;
5. bad input gets a typed error and writes nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import weightbank as wb
from weightbank.bank import recode as recode_mod
from weightbank.bank import repack as repack_mod
from weightbank.bank.chunks import chain_of, records_by_hash
from weightbank.bank.layout import PACKS
from weightbank.bank.listing import read_manifest
from weightbank.format import planner
from weightbank.format.delta import DELTA
from weightbank.format.manifest import Manifest
from weightbank.storage import LocalStorage

from .faults import WRITE_OPS, Children, FaultStorage, assert_same_state, finish
from .test_repack import REPACK_CHILD, Picture, collect, fault_points, pack_bytes

State = dict[str, Any]
N = 1 << 18  # 1 MiB of float32: a delta link pays for its fixed decode cost (planner.LINK_OVERHEAD)
CHUNK = 1 << 19  # two chunks per float32 tensor


def _noise(seed: int, n: int = N, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed)).to(dtype)


def state(step: int) -> State:
    """A training-like state: drifting fp32 and bf16 weights, a frozen tensor, an int buffer, a tied
    weight, a tensor added at step 3 and one dropped after step 4, and a non-tensor leaf."""
    w = _noise(1)
    w[:: 97 - step] += 1e-3 * (step + 1)
    h = _noise(2, dtype=torch.bfloat16)
    h[:: 89 - step] += 0.25 * (step + 1)
    out: State = {
        "w": w,
        "tied": w,
        "h": h,
        "frozen": _noise(3),
        "idx": torch.arange(5000, dtype=torch.int64),
        "info": {"step": step},
    }
    if step >= 3:
        late = _noise(4)
        late[::50] *= 1 + step / 100
        out["late"] = late
    if step <= 4:
        out["gone"] = _noise(5) + step
    return out


def build(path: Path, steps: int = 8) -> tuple[list[str], dict[str, State]]:
    ids: list[str] = []
    states: dict[str, State] = {}
    with wb.open(path) as bank:
        for s in range(steps):
            st = state(s)
            cid = bank.save(st, run="r", step=s, chunk_size=CHUNK, metrics={"loss": 1 / (s + 1)}).id
            ids.append(cid)
            states[cid] = st
            if s == 2:
                bank.tag("prod", cid, why="first")
        bank.tag("prod", ids[-1], why="newest")
    return ids, states


def assert_loads(path: Path, states: Mapping[str, State]) -> None:
    with wb.open(path, create=False) as fresh:
        for cid, want in states.items():
            assert_same_state(fresh.load(cid), want, cid[:12])


def chains(m: Manifest) -> list[list[str]]:
    """Every content chunk's chain (keyframe first) as hashes."""
    index = records_by_hash(m)
    used = sorted({c for t in m.tensors for c in t.chunks})
    return [[r.hash for r in chain_of(m.chunks[i], index)] for i in used]


def content(m: Manifest) -> set[str]:
    return {m.chunks[c].hash for t in m.tensors for c in t.chunks}


def codings(m: Manifest) -> dict[str, tuple[Any, ...]]:
    """How each chunk the checkpoint lists is coded (not where it lies)."""
    return {c.hash: (c.codec, c.stored_len, c.args) for c in m.chunks}


def deltas(m: Manifest) -> int:
    return sum(1 for i in {c for t in m.tensors for c in t.chunks} if m.chunks[i].codec == DELTA)


# -- 1. the newest becomes the keyframe -------------------------------------------------------------


def test_the_newest_becomes_the_keyframe_and_nothing_a_user_sees_changes(tmp_path: Path) -> None:
    ids, states = build(tmp_path / "bank")
    with wb.open(tmp_path / "bank", create=False) as bank:
        before = Picture.of(bank)
        assert deltas(read_manifest(bank.storage, ids[-1])) > 0, "the newest sits at a chain end"
        report = bank.repack(keyframe="r@latest")
        assert report.recoded >= len(ids) - 1 and report.recode_written > 0
        assert Picture.of(bank) == before
        newest = read_manifest(bank.storage, ids[-1])
        assert deltas(newest) == 0, "the keyframe has no delta at all"
        assert all(len(c) == 1 for c in chains(newest))
        # Every chain of an older checkpoint ends in newer checkpoints' chunks (reverse deltas).
        newer: set[str] = set()
        reversed_links = 0
        for cid in reversed(ids):
            m = read_manifest(bank.storage, cid)
            own = content(m)
            for chain in chains(m):
                assert set(chain[:-1]) <= newer, f"{cid[:12]}: a chain reaches an older checkpoint"
                reversed_links += len(chain) - 1
            newer |= own
        assert reversed_links >= len(ids) - 2
        # The old packs are unreferenced now: gc's work (after the release rule's grace).
        assert {p.kind for p in bank.verify().problems} <= {"orphan"}
    assert_loads(tmp_path / "bank", states)


def test_after_a_gc_every_checkpoint_loads_and_the_bank_is_not_larger_than_a_fresh_chain(
    tmp_path: Path,
) -> None:
    _, states = build(tmp_path / "bank")
    with wb.open(tmp_path / "bank", create=False) as bank:
        stored_before = pack_bytes(bank.storage)
        bank.repack(keyframe="r@latest")
        bank.repack(min_dead=0.05)  # what the recode left dead in partly used packs
        collect(bank)
        stored_after = pack_bytes(bank.storage)
        assert bank.verify().problems == ()
    assert_loads(tmp_path / "bank", states)
    # Forward and reverse chains code the same differences: the sizes stay close.
    assert stored_after <= stored_before * 1.2, (stored_before, stored_after)


def test_a_save_after_the_recode_chains_onto_the_new_keyframe(tmp_path: Path) -> None:
    _, states = build(tmp_path / "bank")
    with wb.open(tmp_path / "bank", create=False) as bank:
        bank.repack(keyframe="r@latest")
        st = state(8)
        child = bank.save(st, run="r", step=8, chunk_size=CHUNK).id
        m = read_manifest(bank.storage, child)
        depths = [m.chunks[i].depth for i in {c for t in m.tensors for c in t.chunks}]
        assert max(depths) == 1, depths
    assert_loads(tmp_path / "bank", {**states, child: st})


def test_a_keyframe_twice_is_a_no_op_the_second_time(tmp_path: Path) -> None:
    ids, states = build(tmp_path / "bank", steps=4)
    with wb.open(tmp_path / "bank", create=False) as bank:
        bank.repack(keyframe="r@latest")
        heads = {cid: bank.storage.read(f"manifests/{cid[:2]}/{cid}.json") for cid in ids}
        again = bank.repack(keyframe=["r@latest", ids[-1]])
        assert again.recoded == 0 and again.recode_written == 0
        assert {cid: bank.storage.read(f"manifests/{cid[:2]}/{cid}.json") for cid in ids} == heads
    assert_loads(tmp_path / "bank", states)


def test_a_rekey_after_each_save_codes_the_keyframe_and_one_reverse_delta_per_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Turning the lineage around again one save later codes only the new keyframe and its parent:
    older reverse deltas keep their payloads (an XOR against their base's bytes), their chains move."""
    ids, states = build(tmp_path / "bank", steps=5)
    coded: list[int] = []
    real = recode_mod.plan_chunk  # type: ignore[attr-defined]

    def counting(*args: Any, **kwargs: Any) -> Any:
        coded.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(recode_mod, "plan_chunk", counting)
    with wb.open(tmp_path / "bank", create=False) as bank:
        first = bank.rekey("r@latest")
        assert first.window == tuple(reversed(ids)), "a forward lineage is turned around whole"
        for s in range(5, 12):
            st = state(s)
            cid = bank.save(st, run="r", step=s, chunk_size=CHUNK).id
            ids.append(cid)
            states[cid] = st
            places = len({c for t in read_manifest(bank.storage, cid).tensors for c in t.chunks})
            coded.clear()
            rep = bank.rekey(cid)
            assert rep.keyframe == cid and rep.window[0] == cid
            assert len(coded) <= 2 * places and rep.chunks_written <= 2 * places, (len(coded), places)
            assert deltas(read_manifest(bank.storage, cid)) == 0, "the newest is the keyframe"
            if len(rep.window) > 1:
                assert deltas(read_manifest(bank.storage, ids[-2])) > 0, "its parent became reverse deltas"
        for cid in ids:
            m = read_manifest(bank.storage, cid)
            assert recode_mod.chain_cost(m) <= 2.0 + 1e-9
            assert all(len(ch) <= 16 for ch in chains(m))
        collect(bank)
        assert bank.verify().problems == ()
    assert_loads(tmp_path / "bank", states)


def test_after_rekeys_gc_alone_leaves_a_bank_no_larger_than_forward_chains(tmp_path: Path) -> None:
    """The codings a rekey replaces (the save's deltas, the last keyframe) lie in packs that die whole."""
    sizes = {}
    for how in ("forward", "rekey"):
        with wb.open(tmp_path / how) as bank:
            for s in range(7):
                cid = bank.save(state(s), run="r", step=s, chunk_size=CHUNK).id
                if how == "rekey":
                    bank.rekey(cid)
            collect(bank)
            assert bank.verify().problems == ()
            sizes[how] = pack_bytes(bank.storage)
    assert sizes["rekey"] <= sizes["forward"] * 1.05, sizes


@pytest.mark.parametrize("keyframe_saves", [False, True], ids=["forward-saves", "keyframe-saves"])
def test_a_frozen_backbone_is_not_written_again_at_every_rekey(tmp_path: Path, keyframe_saves: bool) -> None:
    """A fine-tune that trains a small head over a frozen backbone: each rekey writes what the head
    changed (its keyframe and one reverse delta), never the backbone again — and gc still frees the
    codings the rekeys replaced."""
    backbone = {f"layer{i}": _noise(10 + i) for i in range(6)}  # 6 MiB, never changes
    written = []
    states: dict[str, State] = {}
    with wb.open(tmp_path / "bank") as bank:
        for s in range(8):
            head = _noise(1)
            head[:: 97 - s] += 1e-3 * (s + 1)
            st = {**backbone, "head": head}
            kw: dict[str, Any] = {"keyframe_every": 1} if keyframe_saves else {}
            cid = bank.save(st, run="r", step=s, chunk_size=CHUNK, **kw).id
            states[cid] = st
            written.append(bank.rekey(cid).bytes_written)
        collect(bank)
        assert bank.verify().problems == ()
        live = pack_bytes(bank.storage)
    head_bytes = N * 4
    assert max(written[3:]) <= 2 * head_bytes, written  # the head's keyframe + its reverse delta at most
    assert sum(written) < 6 * N * 4 + 8 * 2 * head_bytes, written  # the backbone copied once at most
    # What is left after gc: the backbone once, one keyframe of the head, seven small reverse deltas.
    assert live < (6 + 1) * N * 4 + 7 * head_bytes // 2, live
    assert_loads(tmp_path / "bank", states)


def test_a_rekey_after_a_skipped_one_does_not_swallow_earlier_blocks(tmp_path: Path) -> None:
    ids, states = build(tmp_path / "bank", steps=1)
    with wb.open(tmp_path / "bank", create=False) as bank:
        for s in range(1, 9):
            st = state(s)
            cid = bank.save(st, run="r", step=s, chunk_size=CHUNK, keyframe_every=4).id
            ids.append(cid)
            states[cid] = st
            if s != 6:  # step 6's rekey was skipped (another repack held the lock)
                repack_mod.rekey(bank.storage, bank._catalog, cid, keyframe_every=4)
        assert all(len(ch) <= 4 for i in ids for ch in chains(read_manifest(bank.storage, i)))
        with pytest.raises(wb.CheckpointNotFound):
            bank.rekey("r@99")
    assert_loads(tmp_path / "bank", states)


def test_a_full_block_starts_a_new_one(tmp_path: Path) -> None:
    ids, states = build(tmp_path / "bank", steps=1)
    with wb.open(tmp_path / "bank", create=False) as bank:
        windows = []
        for s in range(1, 8):
            st = state(s)
            cid = bank.save(st, run="r", step=s, chunk_size=CHUNK, keyframe_every=4).id
            ids.append(cid)
            states[cid] = st
            windows.append(len(repack_mod.rekey(bank.storage, bank._catalog, cid, keyframe_every=4).window))
        assert windows == [2, 3, 4, 1, 2, 3, 4], windows  # blocks of 4: steps 0-3, 4-7
        assert [deltas(read_manifest(bank.storage, i)) == 0 for i in ids] == [
            False, False, False, True, False, False, False, True,
        ]  # fmt: skip
    assert_loads(tmp_path / "bank", states)


# -- 2. windows -------------------------------------------------------------------------------------


def test_a_keyframe_in_the_middle_leaves_the_newer_checkpoints_as_they_are(tmp_path: Path) -> None:
    ids, states = build(tmp_path / "bank")
    with wb.open(tmp_path / "bank", create=False) as bank:
        newer = {cid: codings(read_manifest(bank.storage, cid)) for cid in ids[5:]}
        bank.repack(keyframe="r@4")  # its dead-pack pass may move their chunks: same codings
        assert {cid: codings(read_manifest(bank.storage, cid)) for cid in ids[5:]} == newer
        assert deltas(read_manifest(bank.storage, ids[4])) == 0
        collect(bank)
        assert bank.verify().problems == ()
    assert_loads(tmp_path / "bank", states)


def test_lossy_chunks_stay_as_they_are_and_load_as_before(tmp_path: Path) -> None:
    states: dict[str, State] = {}
    with wb.open(tmp_path / "bank") as bank:
        for s in range(3):
            st = {"m": _noise(10 + s, 512 * 512).reshape(512, 512), "w": state(s)["w"]}
            cid = bank.save(st, run="q", step=s, lossy="int8").id
            states[cid] = bank.load(cid)  # what a lossy checkpoint loads is the reference
        codecs = {c.codec for c in bank.checkpoint("q@latest").manifest.chunks}
        assert "int8" in codecs
        bank.repack(keyframe="q@latest")
        latest = bank.checkpoint("q@latest").manifest
        assert "int8" in {c.codec for c in latest.chunks} and deltas(latest) == 0
        collect(bank)
    assert_loads(tmp_path / "bank", states)


# -- 3. a save in flight ----------------------------------------------------------------------------


def test_a_save_reading_the_old_heads_during_the_recode_commits_and_loads_after_gc(tmp_path: Path) -> None:
    ids, states = build(tmp_path / "bank", steps=4)
    parent = ids[-1]
    child: list[str] = []
    child_state = state(4)

    def on_op(n: int, name: str, key: str) -> None:
        # While the recode writes its packs, another process saves a child of the keyframe: it
        # reuses and codes against the chunks at their old places.
        if name == "open_writer" and key.startswith(PACKS) and not child:
            with wb.open(tmp_path / "bank", create=False) as saver:
                child.append(saver.save(child_state, run="r", step=4, parent=parent, chunk_size=CHUNK).id)

    bank = wb.Bank(FaultStorage(LocalStorage(tmp_path / "bank"), on_op=on_op), workers=2)
    assert bank.repack(keyframe=parent).recoded >= 2
    assert child
    with wb.open(tmp_path / "bank", create=False) as fresh:
        collect(fresh)
        assert fresh.verify().problems == ()
    assert_loads(tmp_path / "bank", {**states, child[0]: child_state})


# -- 4. cut short -----------------------------------------------------------------------------------


def _base(tmp_path: Path) -> tuple[Path, dict[str, State], Picture]:
    path = tmp_path / "base"
    _, states = build(path, steps=4)
    with wb.open(path, create=False) as bank:
        return path, states, Picture.of(bank)


def _ops(base: Path, tmp: Path) -> list[tuple[str, str]]:
    shutil.copytree(base, tmp)
    counter = FaultStorage(LocalStorage(tmp))
    wb.Bank(counter, workers=2).repack(keyframe="r@latest")
    return list(counter.ops)


def _survived(d: Path, states: Mapping[str, State], before: Picture, where: str) -> None:
    assert_loads(d, states)
    with wb.open(d, create=False) as bank:
        assert {p.kind for p in bank.verify().problems} <= {"orphan"}, (where, bank.verify().problems)
        assert Picture.of(bank) == before, where
        bank.gc(grace=0)  # keeps everything a reader of either head needs
    assert_loads(d, states)
    with wb.open(d, create=False) as bank:
        bank.repack(keyframe="r@latest")
        collect(bank)
        assert bank.verify().problems == (), where
        assert deltas(read_manifest(bank.storage, bank.resolve("r@latest"))) == 0, where
        assert not list(bank.storage.list("leases/")), where
    assert_loads(d, states)


def test_a_recode_failing_after_every_write_loses_nothing(tmp_path: Path) -> None:
    base, states, before = _base(tmp_path)
    ops = _ops(base, tmp_path / "count")
    points = fault_points(ops, writes_only=True)
    assert len(points) >= 8
    for n in points:
        where = f"failed after write {n}"
        d = tmp_path / f"fail{n:04d}"
        shutil.copytree(base, d)
        storage = FaultStorage(LocalStorage(d), fail_after_writes=n)
        with pytest.raises(OSError, match="injected fault"):
            wb.Bank(storage, workers=2).repack(keyframe="r@latest")
        assert not list(LocalStorage(d).list("leases/")), f"{where}: a failed recode must drop its lease"
        _survived(d, states, before, where)
        shutil.rmtree(d)


@pytest.mark.slow
def test_sigkill_at_every_storage_operation_of_a_recode(tmp_path: Path, children: Children) -> None:
    base, states, before = _base(tmp_path)
    ops = _ops(base, tmp_path / "count")
    assert any(name in WRITE_OPS for name, _ in ops)
    points = fault_points(ops, writes_only=False)
    assert len(points) > 20
    jobs = []
    for n in points:
        d = tmp_path / f"kill{n:04d}"
        shutil.copytree(base, d)
        jobs.append([str(d), n, False, "r@latest"])
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
    children.procs.append(proc)
    lines = finish(proc, timeout=550)
    results = json.loads(next(line for line in lines if line.startswith("result "))[len("result ") :])
    assert len(results) == len(points)
    for n, res in zip(points, results, strict=True):
        where = f"killed at op {n}/{len(ops)} {ops[n - 1]}"
        assert res.get("signal") == signal.SIGKILL, f"{where}: {res}"
        _survived(Path(res["dir"]), states, before, where)
        shutil.rmtree(res["dir"])


# -- 5. bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "error"),
    [("nope", wb.CheckpointNotFound), (3, wb.InvalidArgument), (["r@latest", None], wb.InvalidArgument)],
)
def test_a_bad_keyframe_is_refused_and_writes_nothing(
    tmp_path: Path, bad: Any, error: type[Exception]
) -> None:
    ids, _ = build(tmp_path / "bank", steps=2)
    with wb.open(tmp_path / "bank", create=False) as bank:
        heads = {cid: bank.storage.read(f"manifests/{cid[:2]}/{cid}.json") for cid in ids}
        packs = {i.key for i in bank.storage.list(PACKS)}
        with pytest.raises(error):
            bank.repack(keyframe=bad)
        assert {cid: bank.storage.read(f"manifests/{cid[:2]}/{cid}.json") for cid in ids} == heads
        assert {i.key for i in bank.storage.list(PACKS)} == packs


def test_a_dry_run_counts_the_window_and_writes_nothing(tmp_path: Path) -> None:
    ids, _ = build(tmp_path / "bank", steps=3)
    with wb.open(tmp_path / "bank", create=False) as bank:
        heads = {cid: bank.storage.read(f"manifests/{cid[:2]}/{cid}.json") for cid in ids}
        report = bank.repack(keyframe="r@latest", dry_run=True)
        assert report.dry_run and report.recoded == 3 and report.recode_written == 0
        assert {cid: bank.storage.read(f"manifests/{cid[:2]}/{cid}.json") for cid in ids} == heads


def test_a_format_1_checkpoint_cannot_be_a_keyframe(tmp_path: Path) -> None:
    legacy = Path(__file__).resolve().parents[1] / "data" / "legacy_v1_bank"
    shutil.copytree(legacy, tmp_path / "old")
    with wb.open(tmp_path / "old", create=False) as bank:
        cid = bank.log()[0].id
        with pytest.raises(wb.InvalidArgument, match="format-3"):
            bank.repack(keyframe=cid)


# -- 6. any lineage ---------------------------------------------------------------------------------

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int32, torch.uint8, torch.bool]


@st.composite
def lineages(draw: st.DrawFn) -> tuple[list[tuple[int, State]], int, int]:
    """States saved one after another, each a child of an earlier one (branches included), the
    checkpoint to recode and the saves' keyframe_every."""
    names = [f"t{i}" for i in range(draw(st.integers(1, 4)))]
    kinds = {n: draw(st.sampled_from(DTYPES)) for n in names}
    sizes = {n: draw(st.sampled_from([1, 700, 2048, 5000])) for n in names}
    seed = draw(st.integers(0, 2**16))
    gen = torch.Generator().manual_seed(seed)

    def fresh(n: str) -> torch.Tensor:
        t = torch.randn(sizes[n], generator=gen) * 4
        return t > 0 if kinds[n] is torch.bool else t.to(kinds[n])

    first: State = {n: fresh(n) for n in names}
    saves: list[tuple[int, State]] = [(-1, first)]
    for _ in range(draw(st.integers(1, 7))):
        parent = draw(st.integers(0, len(saves) - 1))
        s = dict(saves[parent][1])
        for n in names:
            change = draw(st.sampled_from(["same", "few", "few", "few", "all", "drop", "add"]))
            if change == "drop":
                s.pop(n, None)
            elif change == "add" or n not in s:
                s[n] = fresh(n)
            elif change == "few":
                t = s[n].clone()
                t.view(-1)[:: max(1, t.numel() // 7)] = fresh(n).view(-1)[:: max(1, t.numel() // 7)]
                s[n] = t
            elif change == "all":
                s[n] = fresh(n)
        if draw(st.booleans()) and s:
            s["alias"] = next(iter(s.values()))
        saves.append((parent, s))
    return saves, draw(st.integers(0, len(saves) - 1)), draw(st.integers(2, 6))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lineages())
def test_any_lineage_recodes_onto_any_checkpoint_and_loads_bit_exact(
    case: tuple[list[tuple[int, State]], int, int],
) -> None:
    saves, pick, keyframe_every = case
    with pytest.MonkeyPatch.context() as mp:
        # Small chunks and cheap links, so these small states make real chains.
        mp.setattr(planner, "LINK_OVERHEAD", 0)
        mp.setattr(planner, "CHAIN_BUDGET", 100.0)
        bank = wb.open("memory://")
        ids: list[str] = []
        for i, (parent, s) in enumerate(saves):
            p = ids[parent] if parent >= 0 else None
            ids.append(
                bank.save(s, run="r", step=i, parent=p, chunk_size=4096, keyframe_every=keyframe_every).id
            )
        before = Picture.of(bank)
        bank.repack(keyframe=ids[pick])
        assert Picture.of(bank) == before
        assert deltas(read_manifest(bank.storage, ids[pick])) == 0
        for cid, (_, s) in zip(ids, saves, strict=True):
            assert_same_state(bank.load(cid), s, cid[:12])
        assert bank.repack(keyframe=ids[pick]).recode_written == 0
        collect(bank)
        assert bank.verify().problems == ()
        for cid, (_, s) in zip(ids, saves, strict=True):
            assert_same_state(bank.load(cid), s, cid[:12])
