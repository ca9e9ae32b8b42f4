"""Loads of a remote bank through its local disk cache: fewer storage reads, never a wrong tensor."""

from __future__ import annotations

import multiprocessing
import os
import random
from pathlib import Path

import blake3
import pytest
import torch

import weightbank as wb
from weightbank.bank.chunks import chain_of, records_by_hash
from weightbank.format import planner
from weightbank.storage import LocalStorage
from weightbank.storage.diskcache import DiskCache

from ..conftest import seeded
from ..remote import RemoteLike
from ..s3server import SeaweedServer

CHUNK = 64 << 10


def state(seed: int) -> dict[str, torch.Tensor]:
    return {
        "a": seeded((256, 128), seed),
        "b": seeded((100,), seed + 1000, torch.bfloat16),
        "shared": seeded((64, 64), 7),
        "n": torch.arange(10 + seed),
    }


def same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> bool:
    return got.keys() == want.keys() and all(
        got[k].dtype == want[k].dtype and torch.equal(got[k].view(torch.uint8), want[k].view(torch.uint8))
        for k in want
    )


def cache_files(root: Path) -> list[Path]:
    return [p for p in root.glob("*/*") if not p.name.startswith(".")]


@pytest.fixture
def store() -> RemoteLike:
    return RemoteLike()


@pytest.fixture
def remote(store: RemoteLike, tmp_path: Path) -> wb.Bank:
    return wb.Bank(store, cache=tmp_path / "cache")


def test_defaults_cache_remote_banks_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert wb.open(tmp_path / "bank").cache is None
    assert wb.open("memory://").cache is None
    auto = wb.Bank(RemoteLike()).cache
    assert auto is not None and auto.root == Path(os.environ["WEIGHTBANK_CACHE"])
    assert auto.max_bytes == 20 << 30
    assert wb.Bank(RemoteLike(), cache=False).cache is None
    assert wb.Bank(RemoteLike(), cache_size="1MiB").cache.max_bytes == 1 << 20  # type: ignore[union-attr]
    given = wb.open("memory://", cache=tmp_path / "c", cache_size="2GiB").cache
    assert given is not None and given.root == tmp_path / "c" and given.max_bytes == 2 << 30
    mine = DiskCache(tmp_path / "d")
    assert wb.open(tmp_path / "bank", cache=mine).cache is mine
    monkeypatch.setenv("WEIGHTBANK_CACHE_SIZE", "0")
    assert wb.Bank(RemoteLike()).cache is None


def test_a_second_load_reads_nothing_from_storage(store: RemoteLike, tmp_path: Path) -> None:
    bank = wb.Bank(store)  # the default cache ($WEIGHTBANK_CACHE, a temp dir in tests)
    want = state(1)
    cid = bank.save(want, chunk_size=CHUNK).id
    store.reset()
    assert same(bank.load(cid), want)
    assert store.reads > 0
    store.reset()
    assert same(bank.load(cid), want)
    assert store.reads == 0
    # another bank object (another process, as far as the cache can tell) shares the entries
    again = wb.Bank(store)
    assert same(again.load(cid), want) and store.reads == 0
    model = torch.nn.Linear(128, 256)
    lin = wb.Bank(store).save(model.state_dict(), chunk_size=CHUNK).id
    bank.load(lin)
    store.reset()
    target = torch.nn.Linear(128, 256)
    bank.load(lin, into=target)
    assert store.reads == 0 and torch.equal(target.weight, model.weight)
    assert same(bank.load_tensors(cid, ["a"]), {"a": want["a"]}) and store.reads == 0
    s = bank.cache.stats()  # type: ignore[union-attr]
    assert s.hits > 0 and s.entries > 0 and s.errors == 0


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty", "swap"])
def test_a_damaged_entry_is_refetched_and_repaired(
    remote: wb.Bank, store: RemoteLike, tmp_path: Path, damage: str
) -> None:
    want = state(2)
    cid = remote.save(want, chunk_size=CHUNK).id
    remote.load(cid)
    files = cache_files(tmp_path / "cache")
    assert files
    for i, path in enumerate(files):
        data = bytearray(path.read_bytes())
        if damage == "flip":
            data[len(data) // 2] ^= 0x10
        elif damage == "truncate":
            data = data[: len(data) // 2]
        elif damage == "empty":
            data = bytearray()
        else:  # another entry's bytes under this name (same size or not)
            data = bytearray(files[(i + 1) % len(files)].read_bytes()) if len(files) > 1 else data[::-1]
        path.write_bytes(bytes(data))
    store.reset()
    assert same(remote.load(cid), want)
    assert store.reads > 0
    store.reset()
    assert same(remote.load(cid), want) and store.reads == 0  # repaired
    assert remote.cache.stats().discarded > 0  # type: ignore[union-attr]


def test_an_unwritable_cache_directory_never_fails_a_load(store: RemoteLike, tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    bank = wb.Bank(store, cache=tmp_path / "file" / "cache")
    want = state(3)
    cid = bank.save(want, chunk_size=CHUNK).id
    for _ in range(2):
        assert same(bank.load(cid), want)
    assert bank.cache.stats().errors > 0  # type: ignore[union-attr]
    report = bank.prefetch(cid)
    assert report.fetched_bytes > 0 and report.dropped_bytes == report.fetched_bytes


def test_bad_storage_bytes_are_caught_and_never_cached(
    remote: wb.Bank, store: RemoteLike, tmp_path: Path
) -> None:
    cid = remote.save(state(4), chunk_size=CHUNK).id
    for info in list(store.inner.list("packs/")):
        raw = bytearray(store.inner.read(info.key))
        raw[len(raw) // 3] ^= 0xFF
        store.inner.write(info.key, bytes(raw))
    with pytest.raises(wb.CorruptObject):
        remote.load(cid)
    for path in cache_files(tmp_path / "cache"):  # only verified chunks went in
        assert blake3.blake3(path.read_bytes()).hexdigest() == path.name


def training(n: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(512, 256, generator=g) * 0.05
    frozen = torch.randn(300, 64, generator=g)
    out = []
    for _ in range(n):
        out.append({"w": w.clone(), "frozen": frozen})
        w = w - 1e-5 * torch.randn(w.shape, generator=g)
    return out


def test_delta_chains_load_right_through_the_cache(
    remote: wb.Bank, store: RemoteLike, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(planner, "CHAIN_BUDGET", 100.0)  # long chains: each link on the previous step
    states = training(5)
    ids = [remote.save(s, run="ft", step=i, chunk_size=CHUNK).id for i, s in enumerate(states)]
    m = remote._catalog.get(ids[-1])
    index = records_by_hash(m)
    w = next(t for t in m.tensors if t.name == "w")
    assert all(len(chain_of(m.chunks[c], index)) == 5 for c in w.chunks), "the test needs delta chains"
    store.reset()
    assert same(remote.load(ids[-1]), states[-1])
    cold = store.read_bytes
    store.reset()
    assert same(remote.load(ids[-1]), states[-1]) and store.reads == 0
    # The next checkpoint's delta chunks start from their cached bases: one link read per chunk.
    nxt = remote.save(training(6)[-1], run="ft", step=5, chunk_size=CHUNK).id
    mn = remote._catalog.get(nxt)
    fresh = {mn.chunks[c].hash for t in mn.tensors for c in t.chunks} - {c.hash for c in m.chunks}
    store.reset()
    assert same(remote.load(nxt), training(6)[-1])
    # (small chunks: their link reads are merged into span reads of the pack)
    links = sum(mn.chunks[c].stored_len for t in mn.tensors for c in t.chunks if mn.chunks[c].hash in fresh)
    assert 1 <= store.reads <= len(fresh)
    assert store.read_bytes < min(cold, links + 2 * len(fresh) * 4096), "only the new links, not whole chains"
    # Loading older checkpoints of the run is right too (their chunks are cached on the way).
    for cid, s in zip(ids, states, strict=True):
        assert same(remote.load(cid), s)


def test_prefetch_then_load_reads_nothing(remote: wb.Bank, store: RemoteLike, tmp_path: Path) -> None:
    want = state(5)
    cid = remote.save(want, chunk_size=CHUNK).id
    unique = sum(t.numel() * t.element_size() for t in want.values())
    store.reset()
    part = remote.prefetch(cid, select="a")
    assert part.fetched_bytes == want["a"].numel() * 4 and part.cached_bytes == 0 and part.enabled
    report = remote.prefetch(cid)
    assert report.fetched_bytes + report.cached_bytes == unique
    assert report.cached_bytes == part.fetched_bytes and report.dropped_bytes == 0
    assert report.chunks == len(cache_files(tmp_path / "cache"))
    store.reset()
    assert same(remote.load(cid), want) and store.reads == 0
    assert remote.prefetch(cid).cached_bytes == unique and store.reads == 0
    local = wb.open(tmp_path / "local")
    off = local.prefetch(local.save(want).id)
    assert not off.enabled and off.fetched_bytes == off.cached_bytes == 0


# -- several processes loading through one small shared cache ------------------------------
def _loader(bank_dir: str, cache_dir: str, ids: list[str], seed: int, ops: int) -> tuple[int, int]:
    """``ops`` random loads and prefetches through a cache far smaller than the checkpoints.

    A count of operations, not a time: a slow machine runs the same work, only longer.
    Returns (loads, wrong loads).
    """
    cache = DiskCache(cache_dir, max_bytes=3 * CHUNK, rescan_interval=0.05)
    bank = wb.Bank(RemoteLike(LocalStorage(bank_dir)), cache=cache)
    rng = random.Random(seed)
    loads = wrong = 0
    for _ in range(ops):
        i = rng.randrange(len(ids))
        if rng.random() < 0.3:
            bank.prefetch(ids[i])
            continue
        loads += 1
        wrong += not same(bank.load(ids[i]), state(i))
        if rng.random() < 0.1:
            cache.evict(rng.randrange(3 * CHUNK))
    return loads, wrong


def test_two_processes_sharing_a_cache_never_load_wrong_bytes(tmp_path: Path) -> None:
    bank = wb.open(tmp_path / "bank")
    ids = [bank.save(state(i), chunk_size=CHUNK).id for i in range(4)]
    ctx = multiprocessing.get_context("spawn")
    args = [(str(tmp_path / "bank"), str(tmp_path / "cache"), ids, seed, 80) for seed in (1, 2)]
    with ctx.Pool(2) as pool:
        results = pool.starmap(_loader, args)
    assert all(loads > 0 and wrong == 0 for loads, wrong in results), results
    assert not list((tmp_path / "cache").glob("*/.*.tmp"))


@pytest.mark.s3
def test_an_s3_bank_loads_through_its_default_cache(s3_url: str, seaweed: SeaweedServer) -> None:
    bank = wb.open(s3_url, storage_options=seaweed.storage_options())
    assert bank.cache is not None and bank.cache.root == Path(os.environ["WEIGHTBANK_CACHE"])
    want = state(6)
    cid = bank.save(want, chunk_size=CHUNK).id
    assert same(bank.load(cid), want)
    again = wb.open(s3_url, storage_options=seaweed.storage_options(), create=False)
    assert same(again.load(cid), want)
    s = again.cache.stats()  # type: ignore[union-attr]
    assert s.misses == 0 and s.hits > 0
