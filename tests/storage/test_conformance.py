"""Every storage backend passes the same contract tests (fsspec's tests/abstract is the picture)."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from weightbank.errors import ConcurrentUpdate, MissingObject, StorageError
from weightbank.storage import LocalStorage, MemoryStorage, Storage, open_storage
from weightbank.storage.fsspec import FsspecStorage


@pytest.fixture(
    params=[
        "local",
        "memory",
        pytest.param("seaweed", marks=pytest.mark.s3),
        pytest.param("moto", marks=pytest.mark.s3),
        "fsspec-generic",
    ]
)
def storage(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Storage]:
    s: Storage
    if request.param == "local":
        s = LocalStorage(tmp_path / "s")
    elif request.param == "memory":
        s = MemoryStorage()
    elif request.param == "fsspec-generic":
        # The generic fsspec backend (gs://, az://...) on fsspec's in-memory file system,
        # in its documented last-writer-wins ref mode (CAS is per process there).
        fs = fsspec.filesystem("memory", skip_instance_cache=True)
        root = f"conformance-{uuid.uuid4().hex[:8]}"
        s = FsspecStorage(f"memfs://{root}", fs, root, conditional_writes=False)
    else:
        srv = request.getfixturevalue("seaweed" if request.param == "seaweed" else "moto_s3")
        s = open_storage(f"s3://wbtest/{uuid.uuid4().hex[:12]}", srv.storage_options())
    yield s
    s.close()


def test_satisfies_protocol(storage: Storage) -> None:
    assert isinstance(storage, Storage)


def test_write_read_ranges(storage: Storage) -> None:
    storage.write("a/b/c.bin", b"0123456789")
    assert storage.read("a/b/c.bin") == b"0123456789"
    assert storage.read("a/b/c.bin", 3) == b"3456789"
    assert storage.read("a/b/c.bin", 3, 4) == b"3456"
    assert storage.read("a/b/c.bin", 8, 100) == b"89"
    assert storage.size("a/b/c.bin") == 10
    assert storage.exists("a/b/c.bin")
    assert not storage.exists("a/b/d.bin")


def test_read_into(storage: Storage) -> None:
    storage.write("k", bytes(range(256)))
    buf = bytearray(16)
    assert storage.read_into("k", 100, memoryview(buf)) == 16
    assert bytes(buf) == bytes(range(100, 116))
    short = bytearray(16)
    assert storage.read_into("k", 250, memoryview(short)) == 6


def test_overwrite_is_atomic_replace(storage: Storage) -> None:
    storage.write("k", b"one")
    storage.write("k", b"two!")
    assert storage.read("k") == b"two!"


def test_missing_objects(storage: Storage) -> None:
    with pytest.raises(MissingObject):
        storage.read("nope")
    with pytest.raises(FileNotFoundError):  # MissingObject is a FileNotFoundError too
        storage.read_into("nope", 0, memoryview(bytearray(4)))
    with pytest.raises(MissingObject):
        storage.size("nope")
    storage.delete("nope")  # absent keys are ignored


def test_streaming_writer_commit_and_abort(storage: Storage) -> None:
    w = storage.open_writer("packs/x.pack")
    w.write(b"abc")
    w.write(memoryview(b"def"))
    assert not storage.exists("packs/x.pack"), "invisible until commit"
    w.commit()
    assert storage.read("packs/x.pack") == b"abcdef"
    w2 = storage.open_writer("packs/y.pack")
    w2.write(b"partial")
    w2.abort()
    assert not storage.exists("packs/y.pack")
    assert [i.key for i in storage.list("packs/")] == ["packs/x.pack"]


def test_list_and_delete(storage: Storage) -> None:
    for k in ("m/aa/1.json", "m/ab/2.json", "p/1.pack", "mx"):
        storage.write(k, b"x" * len(k))
    keys = sorted(i.key for i in storage.list("m/"))
    assert keys == ["m/aa/1.json", "m/ab/2.json"]
    info = next(i for i in storage.list("p/"))
    assert info.size == len("p/1.pack") and info.mtime > 0
    storage.delete("m/aa/1.json")
    assert sorted(i.key for i in storage.list("m/")) == ["m/ab/2.json"]


def test_refs_compare_and_swap(storage: Storage) -> None:
    assert storage.get_ref("refs/tags/a.json") is None
    t1 = storage.put_ref("refs/tags/a.json", b"v1", None)
    with pytest.raises(ConcurrentUpdate):
        storage.put_ref("refs/tags/a.json", b"v1b", None)  # must-not-exist fails
    ref = storage.get_ref("refs/tags/a.json")
    assert ref is not None and ref.data == b"v1" and ref.token == t1
    t2 = storage.put_ref("refs/tags/a.json", b"v2", t1)
    with pytest.raises(ConcurrentUpdate):
        storage.put_ref("refs/tags/a.json", b"v3", t1)  # stale token
    ref2 = storage.get_ref("refs/tags/a.json")
    assert ref2 is not None and ref2.data == b"v2" and ref2.token == t2
    assert list(storage.list_refs("refs/tags/")) == ["refs/tags/a.json"]


def test_concurrent_cas_exactly_one_winner(storage: Storage) -> None:
    storage.put_ref("r/x", b"0", None)
    start = storage.get_ref("r/x")
    assert start is not None
    wins: list[int] = []
    losses: list[int] = []
    barrier = threading.Barrier(8)

    def go(i: int) -> None:
        barrier.wait()
        try:
            # distinct from the initial b"0": tokens may be content hashes (like S3 ETags)
            storage.put_ref("r/x", f"v{i}".encode(), start.token)
            wins.append(i)
        except ConcurrentUpdate:
            losses.append(i)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and len(losses) == 7
    final = storage.get_ref("r/x")
    assert final is not None and final.data == f"v{wins[0]}".encode()


def test_parallel_writes_and_reads(storage: Storage) -> None:
    blobs = {f"o/{i}": bytes([i]) * (1000 + i) for i in range(32)}

    def put(k: str) -> None:
        storage.write(k, blobs[k])

    threads = [threading.Thread(target=put, args=(k,)) for k in blobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k, v in blobs.items():
        assert storage.read(k) == v


def test_local_rejects_escaping_keys(tmp_path: Path) -> None:
    s = LocalStorage(tmp_path)
    for bad in ("../x", "a/../../x", "/abs", "a//b", ""):
        with pytest.raises(StorageError):
            s.write(bad, b"x")


def test_local_leaves_no_temp_files(tmp_path: Path) -> None:
    s = LocalStorage(tmp_path)
    s.write("a/b", b"x")
    w = s.open_writer("c")
    w.write(b"y")
    w.abort()
    assert list((tmp_path / "tmp").iterdir()) == []


def test_open_storage_urls(tmp_path: Path) -> None:
    assert isinstance(open_storage(tmp_path), LocalStorage)
    assert isinstance(open_storage(f"file://{tmp_path}"), LocalStorage)
    a, b = open_storage("memory://shared-x"), open_storage("memory://shared-x")
    a.write("k", b"v")
    assert b.read("k") == b"v"
    assert not open_storage("memory://").exists("k")
    with pytest.raises(StorageError, match="no storage backend"):
        open_storage("gopher://x")


def test_generic_fsspec_refuses_refs_without_compare_and_swap() -> None:
    fs = fsspec.filesystem("memory", skip_instance_cache=True)
    root = f"nocas-{uuid.uuid4().hex[:8]}"
    s = FsspecStorage(f"memfs://{root}", fs, root)
    s.write("packs/p", b"data")  # data objects are fine
    with pytest.raises(StorageError, match="conditional_writes"):
        s.put_ref("refs/tags/a.json", b"1", None)
    assert s.get_ref("refs/tags/a.json") is None
