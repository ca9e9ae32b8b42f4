"""Every storage backend passes the same contract tests (fsspec's tests/abstract is the picture)."""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import fsspec
import pytest

from weightbank.errors import ConcurrentUpdate, CorruptObject, MissingObject, NotABank, StorageError
from weightbank.storage import CountingStorage, LocalStorage, Storage, StorageProperties, open_storage
from weightbank.storage.fsspec import FsspecStorage
from weightbank.storage.memory import forget


@pytest.fixture(
    params=[
        "local",
        "memory",
        pytest.param("seaweed", marks=pytest.mark.s3),
        pytest.param("moto", marks=pytest.mark.s3),
        "fsspec-generic",
        "counting-local",
        "counting-memory",
    ]
)
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Storage]]:
    """Opens a handle on one fresh location; each call is another client of the same location."""
    opened: list[Storage] = []
    if request.param == "local":
        make: Callable[[], Storage] = lambda: LocalStorage(tmp_path / "s")  # noqa: E731
    elif request.param == "memory":
        name = f"conformance-{uuid.uuid4().hex[:8]}"
        make = lambda: open_storage(f"memory://{name}")  # noqa: E731
        request.addfinalizer(lambda: forget(name))
    elif request.param == "fsspec-generic":
        # The generic fsspec backend (gs://, az://...) on fsspec's in-memory file system,
        # in its documented last-writer-wins ref mode (CAS is per process there).
        fs = fsspec.filesystem("memory", skip_instance_cache=True)
        root = f"conformance-{uuid.uuid4().hex[:8]}"
        make = lambda: FsspecStorage(f"memfs://{root}", fs, root, conditional_writes=False)  # noqa: E731
    elif request.param == "counting-local":
        # The request-counting wrapper passes the whole contract through to what it wraps.
        make = lambda: CountingStorage(LocalStorage(tmp_path / "s"))  # noqa: E731
    elif request.param == "counting-memory":
        name = f"conformance-{uuid.uuid4().hex[:8]}"
        make = lambda: CountingStorage(open_storage(f"memory://{name}"))  # noqa: E731
        request.addfinalizer(lambda: forget(name))
    else:
        srv = request.getfixturevalue("seaweed" if request.param == "seaweed" else "moto_s3")
        url = f"s3://wbtest/{uuid.uuid4().hex[:12]}"
        make = lambda: open_storage(url, srv.storage_options())  # noqa: E731

    def open_one() -> Storage:
        s = make()
        opened.append(s)
        return s

    yield open_one
    for s in opened:
        s.close()


@pytest.fixture
def storage(opener: Callable[[], Storage]) -> Storage:
    return opener()


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


# -- keys read back from storage are untrusted: every backend refuses unsafe ones the same way ---------------

UNSAFE_KEYS = [
    "packs/ab/x\x00.pack",  # NUL: the OS raised ValueError for it
    "a\nb",
    "tab\there",
    "del\x7f",
    "c1\x85control",
    "back\\slash",
    "lone\udc80surrogate",  # JSON can hold it; no UTF-8 encoding can
    "../x",
    "a/../../x",
    "a/./b",
    "/abs",
    "a//b",
    "a/",
    "",
    "k" * 1025,  # longer than any store takes
    "a/" + "s" * 256,  # a path segment longer than any file system takes
]

KEY_OPS: dict[str, Callable[[Storage, str], object]] = {
    "read": lambda s, k: s.read(k),
    "read-range": lambda s, k: s.read(k, 1, 2),
    "read_into": lambda s, k: s.read_into(k, 0, memoryview(bytearray(4))),
    "write": lambda s, k: s.write(k, b"x"),
    "open_writer": lambda s, k: s.open_writer(k),
    "exists": lambda s, k: s.exists(k),
    "size": lambda s, k: s.size(k),
    "delete": lambda s, k: s.delete(k),
    "get_ref": lambda s, k: s.get_ref(k),
    "put_ref": lambda s, k: s.put_ref(k, b"x", None),
    "local_path": lambda s, k: s.local_path(k),
}


@pytest.mark.parametrize("key", UNSAFE_KEYS, ids=ascii)
def test_unsafe_keys_are_a_storage_error_for_every_call(storage: Storage, key: str) -> None:
    for name, op in KEY_OPS.items():
        with pytest.raises(StorageError, match="invalid storage key") as info:
            op(storage, key)
        assert not isinstance(info.value, MissingObject), name
    assert list(storage.list("")) == [], "nothing was written"


@pytest.mark.parametrize("prefix", ["a\x00", "../", "/abs", "a//", "x\n"], ids=ascii)
def test_unsafe_prefixes_are_a_storage_error(storage: Storage, prefix: str) -> None:
    with pytest.raises(StorageError, match="invalid storage prefix"):
        list(storage.list(prefix))
    with pytest.raises(StorageError, match="invalid storage prefix"):
        list(storage.list_refs(prefix))


def test_keys_with_unusual_but_safe_characters_work(storage: Storage) -> None:
    for key in ("refs/tags/v1.0+rc=2,b-c_d.json", "unicod\u00e9/\u6f22\u5b57", "a/" + "s" * 255):
        storage.write(key, b"v")
        assert storage.read(key) == b"v"


# -- absurd offsets and lengths (a crafted manifest can name any) ----------------------------------------------


@pytest.mark.parametrize(
    ("offset", "length"),
    [
        (0, 2**45),
        (3, 2**45),
        (2**45, None),
        (2**45, 10),
        (2**63 - 1, 1),
        (2**63, None),
        (2**64, 8),
        (0, 2**64),
    ],
    ids=str,
)
def test_absurd_ranges_read_short_not_crash(storage: Storage, offset: int, length: int | None) -> None:
    storage.write("k", b"0123456789")
    want = b"0123456789"[offset : None if length is None else offset + length]
    assert storage.read("k", offset, length) == want


@pytest.mark.parametrize("offset", [10, 11, 2**45, 2**63 - 1, 2**63, 2**64])
def test_read_into_past_the_end_reads_nothing(storage: Storage, offset: int) -> None:
    storage.write("k", b"0123456789")
    buf = bytearray(b"untouched")
    assert storage.read_into("k", offset, memoryview(buf)) == 0
    assert bytes(buf) == b"untouched"


def test_negative_or_non_integer_ranges_are_a_storage_error(storage: Storage) -> None:
    storage.write("k", b"0123456789")
    for offset, length in [(-1, None), (-5, 2), (0, -1), (1.5, None), (0, 2.0), (True, None)]:
        with pytest.raises(StorageError, match="invalid byte range"):
            storage.read("k", offset, length)  # type: ignore[arg-type]
    for bad in (-1, 1.5):
        with pytest.raises(StorageError, match="invalid byte range"):
            storage.read_into("k", bad, memoryview(bytearray(2)))  # type: ignore[arg-type]


# -- a ref whose key holds a directory (or other objects below it) ---------------------------------------------


def test_objects_below_a_ref_key_never_break_the_ref_calls(storage: Storage) -> None:
    # On a file system this makes refs/tags/d.json a directory; on an object store it is only a prefix.
    storage.write("refs/tags/d.json/inner", b"x")
    try:
        ref = storage.get_ref("refs/tags/d.json")
    except StorageError:
        ref = None
        with pytest.raises(StorageError):
            storage.put_ref("refs/tags/d.json", b"v", None)
    else:
        assert ref is None
    assert "refs/tags/d.json" not in set(storage.list_refs("refs/tags/"))


# -- properties are data, and they must be honest ---------------------------------------------------------------


def test_properties_are_frozen_data(storage: Storage) -> None:
    props = storage.properties
    assert isinstance(props, StorageProperties)
    with pytest.raises(dataclasses.FrozenInstanceError):
        props.remote = not props.remote  # type: ignore[misc]
    assert not (props.remote and props.local_files), "a backend with local files is not remote"


def test_local_files_property_is_honest(storage: Storage) -> None:
    storage.write("packs/ab/p.pack", b"payload")
    path = storage.local_path("packs/ab/p.pack")
    if storage.properties.local_files:
        assert path is not None and Path(path).is_file() and Path(path).read_bytes() == b"payload"
        assert storage.local_path("packs/ab/absent.pack") is None
    else:
        assert path is None


def test_conditional_refs_property_is_honest_across_clients(opener: Callable[[], Storage]) -> None:
    """A backend claiming conditional refs lets exactly one of many clients win each compare-and-swap."""
    clients = [opener() for _ in range(4)]
    first = clients[0]
    first.check_refs()  # every backend in this suite may hold refs
    if not first.properties.conditional_refs:
        pytest.skip("last-writer-wins refs make no promise across clients")
    start = first.put_ref("r/x", b"0", None)
    wins: list[int] = []
    barrier = threading.Barrier(8)

    def go(i: int) -> None:
        barrier.wait()
        with contextlib.suppress(ConcurrentUpdate):
            clients[i % len(clients)].put_ref("r/x", f"v{i}".encode(), start)
            wins.append(i)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    final = clients[-1].get_ref("r/x")
    assert final is not None and final.data == f"v{wins[0]}".encode()


def test_check_refs_predicts_whether_put_ref_works(storage: Storage) -> None:
    storage.check_refs()
    assert storage.put_ref("refs/tags/p.json", b"1", None)
    fs = fsspec.filesystem("memory", skip_instance_cache=True)
    refusing = FsspecStorage("memfs://nocas-x", fs, "nocas-x")
    assert not refusing.properties.conditional_refs
    with pytest.raises(StorageError, match="conditional_writes"):
        refusing.check_refs()
    with pytest.raises(StorageError, match="conditional_writes"):
        refusing.put_ref("refs/tags/p.json", b"1", None)


def test_local_storage_on_a_file_is_not_a_bank(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotABank, match="it is a file"):
        LocalStorage(tmp_path / "f")


def test_local_directory_where_a_ref_or_object_belongs(tmp_path: Path) -> None:
    s = LocalStorage(tmp_path)
    (tmp_path / "refs" / "tags" / "d.json").mkdir(parents=True)
    (tmp_path / "packs" / "dir.pack").mkdir(parents=True)
    with pytest.raises(CorruptObject, match="directory"):
        s.get_ref("refs/tags/d.json")
    with pytest.raises(CorruptObject, match="directory"):
        s.put_ref("refs/tags/d.json", b"v", None)
    assert list(s.list_refs("refs/")) == []
    for op in (lambda: s.read("packs/dir.pack"), lambda: s.size("packs/dir.pack")):
        with pytest.raises(MissingObject, match="directory"):
            op()
    with pytest.raises(MissingObject, match="directory"):
        s.read_into("packs/dir.pack", 0, memoryview(bytearray(4)))
    assert not s.exists("packs/dir.pack") and s.local_path("packs/dir.pack") is None
    assert list(s.list("")) == []
