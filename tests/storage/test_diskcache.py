"""DiskCache: content-addressed entries, an LRU cap, damage turned into misses, processes sharing a directory."""

from __future__ import annotations

import fcntl
import multiprocessing
import os
import random
import tempfile
import time
from pathlib import Path

import blake3
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from weightbank.storage.diskcache import DiskCache, default_max_bytes, default_root


def blob(i: int, size: int) -> tuple[str, bytes]:
    """Deterministic content ``i`` of ``size`` bytes and its key (its BLAKE3, as a bank names chunks)."""
    data = random.Random(i).randbytes(size)
    return blake3.blake3(data).hexdigest(), data


def entry_files(root: Path) -> dict[str, int]:
    """name → size of every entry file (temp files excluded)."""
    out = {}
    for shard in root.iterdir() if root.is_dir() else []:
        if shard.is_dir():
            out.update({p.name: p.stat().st_size for p in shard.iterdir() if not p.name.startswith(".")})
    return out


def temp_files(root: Path) -> list[Path]:
    return list(root.glob("*/.*.tmp"))


def get(cache: DiskCache, key: str, size: int) -> bytes | None:
    buf = bytearray(size)
    return bytes(buf) if cache.read_into(key, memoryview(buf)) else None


def age(cache: DiskCache, key: str, seconds_ago: float) -> None:
    """Make entry ``key`` look last used ``seconds_ago`` (LRU order without sleeping)."""
    t = time.time() - seconds_ago
    os.utime(cache.root / key[:2] / key, (t, t))


def test_put_read_contains_discard(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path / "c", max_bytes="1MiB")
    key, data = blob(1, 1000)
    assert get(cache, key, 1000) is None
    assert cache.put(key, data) and cache.put(key, data)  # a second put of the same bytes is a no-op
    assert get(cache, key, 1000) == data
    assert (tmp_path / "c" / key[:2] / key).read_bytes() == data
    assert cache.contains(key) and cache.contains(key, 1000) and not cache.contains(key, 999)
    cache.discard(key)
    cache.discard(key)  # absent: ignored
    assert not cache.contains(key) and get(cache, key, 1000) is None
    s = cache.stats()
    assert (s.hits, s.misses, s.hit_bytes, s.puts, s.entries, s.bytes) == (1, 2, 1000, 1, 0, 0)
    assert temp_files(tmp_path / "c") == []


def test_bad_keys_are_misses_not_errors(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)
    for key in ("", "../../etc/passwd", "ABCDEF0123456789", "ab", "g" * 64):
        assert not cache.put(key, b"x")
        assert get(cache, key, 1) is None and not cache.contains(key)
        cache.discard(key)
    assert entry_files(tmp_path) == {}


def test_an_entry_of_the_wrong_size_is_a_miss_and_is_removed(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path)
    key, data = blob(2, 100)
    cache.put(key, data)
    path = tmp_path / key[:2] / key
    path.write_bytes(data[:60])  # truncated (say, by a power loss: puts do not fsync)
    assert get(cache, key, 100) is None and not path.exists()
    cache.put(key, data)
    assert get(cache, key, 100) == data
    assert cache.stats().discarded == 1


def test_lru_cap_evicts_least_recently_used_down_to_90_percent(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, max_bytes=100)
    blobs = [blob(i, 10) for i in range(10)]
    for n, (key, data) in enumerate(blobs):
        assert cache.put(key, data)
        age(cache, key, 100 - n)  # entry 0 is the oldest
    assert cache.stats().bytes == 100 and cache.stats().evictions == 0
    assert get(cache, blobs[0][0], 10) == blobs[0][1]  # a hit makes entry 0 the newest
    new_key, new_data = blob(99, 10)
    assert cache.put(new_key, new_data)  # 110 > 100: evict to 90, oldest first (1 and 2)
    files = entry_files(tmp_path)
    assert sum(files.values()) == 90
    assert blobs[0][0] in files and new_key in files
    assert blobs[1][0] not in files and blobs[2][0] not in files
    s = cache.stats()
    assert (s.evictions, s.evicted_bytes, s.bytes, s.entries) == (2, 20, 90, 9)


def test_a_blob_over_the_cap_is_refused_and_resize_evicts(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, max_bytes=50)
    key, data = blob(3, 51)
    assert not cache.put(key, data) and entry_files(tmp_path) == {}
    for i in range(5):
        cache.put(*blob(10 + i, 10))
    cache.resize(20)
    assert sum(entry_files(tmp_path).values()) <= 18
    assert cache.max_bytes == 20


def test_writes_of_other_processes_are_counted_by_rescans(tmp_path: Path) -> None:
    a = DiskCache(tmp_path, max_bytes=100, rescan_interval=0)
    b = DiskCache(tmp_path, max_bytes=100, rescan_interval=0)
    for i in range(30):
        (a if i % 2 else b).put(*blob(i, 10))
        assert sum(entry_files(tmp_path).values()) <= 100
    assert a.stats().bytes == b.stats().bytes == sum(entry_files(tmp_path).values())


def test_only_one_process_evicts_at_a_time(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, max_bytes=100)
    for i in range(5):
        cache.put(*blob(i, 10))
    with open(tmp_path / ".evict.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # another process is evicting
        assert cache.evict(0) == 0 and len(entry_files(tmp_path)) == 5
    assert cache.evict(0) == 50 and entry_files(tmp_path) == {}


def test_an_unwritable_directory_just_does_not_cache(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("not a directory")
    cache = DiskCache(tmp_path / "file" / "cache")
    key, data = blob(4, 10)
    assert not cache.put(key, data)
    assert get(cache, key, 10) is None and not cache.contains(key)
    assert cache.evict(0) == 0
    s = cache.stats()
    assert s.errors == 1 and s.entries == 0


def test_a_full_disk_leaves_no_temp_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = DiskCache(tmp_path)
    cache.put(*blob(5, 10))

    def full(*args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full)
    assert not cache.put(*blob(6, 10))
    assert temp_files(tmp_path) == [] and cache.stats().errors == 1


def test_scans_sweep_temp_files_of_dead_writers_only(tmp_path: Path) -> None:
    cache = DiskCache(tmp_path, rescan_interval=0)
    key, data = blob(7, 10)
    cache.put(key, data)
    shard = tmp_path / key[:2]
    dead = shard / f".{key}.{2**22 + 12345}.abcd1234.tmp"  # above pid_max on Linux: never alive
    live = shard / f".{key}.{os.getpid()}.abcd1234.tmp"
    dead.write_bytes(b"half")
    live.write_bytes(b"half")
    assert cache.stats().entries == 1
    assert not dead.exists() and live.exists()


def test_default_root_and_size_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WEIGHTBANK_CACHE", "/somewhere/cache")
    monkeypatch.setenv("WEIGHTBANK_CACHE_SIZE", "3GiB")
    assert default_root() == Path("/somewhere/cache") and default_max_bytes() == 3 << 30
    monkeypatch.delenv("WEIGHTBANK_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "/xdg")
    monkeypatch.delenv("WEIGHTBANK_CACHE_SIZE")
    assert default_root() == Path("/xdg/weightbank") and default_max_bytes() == 20 << 30


# -- a model of the expected contents under random operations ----------------------------
_OPS = st.lists(
    st.tuples(
        st.sampled_from(["put", "get", "discard", "truncate", "other_put", "evict"]),
        st.integers(0, 11),
    ),
    max_size=60,
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=_OPS, sizes=st.lists(st.integers(1, 40), min_size=12, max_size=12))
def test_random_operations_never_return_wrong_bytes(ops: list[tuple[str, int]], sizes: list[int]) -> None:
    cap = 100
    blobs = [blob(i, sizes[i]) for i in range(12)]
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        cache = DiskCache(root, max_bytes=cap, rescan_interval=0)
        other = DiskCache(root, max_bytes=cap, rescan_interval=0)  # a second process, as far as files go
        for op, i in ops:
            key, data = blobs[i]
            if op == "put":
                assert cache.put(key, data)
                assert get(cache, key, len(data)) == data  # a put never evicts its own entry
            elif op == "other_put":
                assert other.put(key, data)
            elif op == "get":
                assert get(cache, key, len(data)) in (None, data)
            elif op == "discard":
                cache.discard(key)
                assert get(cache, key, len(data)) is None
            elif op == "truncate":
                path = root / key[:2] / key
                if path.exists():
                    path.write_bytes(data[: len(data) // 2])
                assert get(cache, key, len(data)) is None  # never half an entry
            elif op == "evict":
                cache.evict()
            files = entry_files(root)
            assert sum(files.values()) <= cap
            for name, size in files.items():
                assert name in {k for k, _ in blobs}
                assert size == len(dict(blobs)[name]) or op == "truncate"
            assert temp_files(root) == []


# -- several processes on one directory ---------------------------------------------------
def _hammer(root: str, seed: int, ops: int) -> tuple[int, int, int]:
    """``ops`` reads-or-fills of random entries of a small shared cache (a count, not a time).

    Returns (hits, puts, wrong reads).
    """
    cache = DiskCache(root, max_bytes=64 << 10, rescan_interval=0.05)
    rng = random.Random(seed)
    hits = puts = wrong = 0
    for _ in range(ops):
        i = rng.randrange(40)
        key, data = blob(i, 1024 * (1 + i % 8))
        got = get(cache, key, len(data))
        if got is None:
            puts += cache.put(key, data)
        else:
            hits += 1
            wrong += got != data
        if rng.random() < 0.02:
            cache.evict(rng.randrange(64 << 10))
    return hits, puts, wrong


def test_two_processes_filling_evicting_and_reading_one_directory(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(2) as pool:
        results = pool.starmap(_hammer, [(str(tmp_path), 1, 1500), (str(tmp_path), 2, 1500)])
    assert all(wrong == 0 for _, _, wrong in results), results
    assert all(hits > 0 and puts > 0 for hits, puts, _ in results), results
    assert temp_files(tmp_path) == []
    cache = DiskCache(tmp_path, max_bytes=64 << 10)
    cache.evict(64 << 10)
    assert sum(entry_files(tmp_path).values()) <= 64 << 10
