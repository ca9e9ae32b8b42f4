"""CountingStorage counts every request exactly, from any thread, and changes nothing it passes on.

It also runs the whole storage conformance suite (``test_conformance.py``'s
``counting-local`` and ``counting-memory`` backends).
"""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import pytest
import torch

import weightbank as wb
import weightbank.storage
from weightbank.bank.marker import init_storage
from weightbank.errors import ConcurrentUpdate, MissingObject
from weightbank.storage import CountingStorage, LocalStorage, MemoryStorage


def _nonzero(s: CountingStorage) -> dict[str, int]:
    return {k: v for k, v in s.counts().items() if v}


def test_exported_from_the_storage_package() -> None:
    assert "CountingStorage" in weightbank.storage.__all__
    assert isinstance(CountingStorage(MemoryStorage()), weightbank.storage.Storage)


def test_counts_are_exact_for_a_known_sequence_of_calls() -> None:
    s = CountingStorage(MemoryStorage())
    assert s.counts() == dict.fromkeys(CountingStorage.METHODS, 0) and s.total() == 0
    s.write("packs/a", b"0123456789")
    s.write("packs/b", b"x")
    assert s.read("packs/a", 2, 3) == b"234"
    buf = bytearray(4)
    assert s.read_into("packs/a", 6, memoryview(buf)) == 4
    w = s.open_writer("packs/c")
    w.write(b"ab")
    w.write(b"cd")
    w.commit()
    w2 = s.open_writer("packs/d")
    w2.write(b"gone")
    w2.abort()
    assert s.exists("packs/c") and not s.exists("packs/d")
    assert s.size("packs/c") == 4
    assert sorted(i.key for i in s.list("packs/")) == ["packs/a", "packs/b", "packs/c"]
    s.delete("packs/b")
    s.delete("packs/absent")
    s.check_refs()
    token = s.put_ref("refs/tags/t.json", b"v1", None)
    with pytest.raises(ConcurrentUpdate):
        s.put_ref("refs/tags/t.json", b"v2", None)
    ref = s.get_ref("refs/tags/t.json")
    assert ref is not None and ref.token == token
    assert s.get_ref("refs/tags/none.json") is None
    assert list(s.list_refs("refs/")) == ["refs/tags/t.json"]
    assert s.sweep_incomplete(0) == 0
    assert s.local_path("packs/a") is None  # never a request
    s.close()
    assert _nonzero(s) == {
        "read": 1,
        "read_into": 1,
        "write": 2,
        "commit": 1,
        "abort": 1,
        "exists": 2,
        "size": 1,
        "list": 1,
        "delete": 2,
        "get_ref": 2,
        "put_ref": 2,
        "list_refs": 1,
        "check_refs": 1,
        "sweep_incomplete": 1,
    }
    assert s.total() == 19
    assert list(s.counts()) == list(CountingStorage.METHODS)


def test_a_failing_call_is_counted_too() -> None:
    s = CountingStorage(MemoryStorage())
    with pytest.raises(MissingObject):
        s.read("absent")
    with pytest.raises(MissingObject):
        s.size("absent")
    assert _nonzero(s) == {"read": 1, "size": 1}


def test_reset_starts_from_zero_and_counts_returns_a_copy() -> None:
    s = CountingStorage(MemoryStorage())
    s.write("k", b"v")
    snapshot = s.counts()
    snapshot["write"] = 99
    assert s.counts()["write"] == 1
    s.reset()
    assert s.total() == 0
    s.read("k")
    assert _nonzero(s) == {"read": 1}


def test_counts_are_exact_from_many_threads() -> None:
    s = CountingStorage(MemoryStorage())
    s.write("k", b"0123")
    per_thread, threads = 500, 8
    barrier = threading.Barrier(threads)

    def go() -> None:
        barrier.wait()
        buf = memoryview(bytearray(2))
        for _ in range(per_thread):
            s.read("k", 1, 1)
            s.read_into("k", 0, buf)

    workers = [threading.Thread(target=go) for _ in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    assert _nonzero(s) == {"write": 1, "read": per_thread * threads, "read_into": per_thread * threads}


def test_properties_are_the_inner_ones_without_local_files(tmp_path: Path) -> None:
    local = CountingStorage(LocalStorage(tmp_path))
    assert LocalStorage.properties.local_files
    assert local.properties == dataclasses.replace(LocalStorage.properties, local_files=False)
    assert CountingStorage(MemoryStorage()).properties == MemoryStorage.properties
    assert local.url == LocalStorage(tmp_path).url


def test_a_bank_through_it_reads_every_byte_by_counted_requests(tmp_path: Path) -> None:
    s = CountingStorage(LocalStorage(tmp_path / "bank"))
    init_storage(s, create=True)
    bank = wb.Bank(s)
    state = {f"t{i}": torch.full((1000,), float(i)) for i in range(5)}
    bank.save(state, run="r", step=1, tags=["prod"], codec="raw")
    assert s.counts()["commit"] >= 1, "the save's packs are committed writers"
    s.reset()
    loaded = bank.load("prod")
    assert all(torch.equal(loaded[k], v) for k, v in state.items())
    counts = s.counts()
    assert counts["read_into"] + counts["read"] >= 1 and counts["get_ref"] >= 1
    assert counts["write"] == counts["commit"] == counts["put_ref"] == counts["delete"] == 0, (
        "a load writes nothing"
    )
    bank.close()
