"""The S3 backend on a real SeaweedFS server: multipart packs, conditional refs, retries, bad input.

The contract every backend keeps is in test_conformance.py (run against SeaweedFS
and moto too); this file covers what is particular to an object store.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import weightbank as wb
from tests.s3server import SeaweedServer
from weightbank.errors import ConcurrentUpdate, MissingDependency, NotABank, StorageError
from weightbank.storage import open_storage
from weightbank.storage import s3 as s3mod
from weightbank.storage.s3 import S3Storage

pytestmark = pytest.mark.s3

MiB = 1 << 20


def _url() -> str:
    return f"s3://wbtest/{uuid.uuid4().hex[:12]}"


@pytest.fixture
def store(seaweed: SeaweedServer) -> S3Storage:
    s = open_storage(_url(), seaweed.storage_options(part_size=5 * MiB, max_inflight=3))
    assert isinstance(s, S3Storage)
    return s


def _uploads(store: S3Storage) -> list[dict[str, Any]]:
    resp = store.fs.call_s3("list_multipart_uploads", Bucket=store.bucket, Prefix=store.prefix + "/")
    return list(resp.get("Uploads", []))


def _client_error(code: str, status: int) -> Exception:
    from botocore.exceptions import ClientError

    return ClientError(
        {"Error": {"Code": code, "Message": code}, "ResponseMetadata": {"HTTPStatusCode": status}}, "op"
    )


def _flaky(
    store: S3Storage, method: str, failures: int, code: str = "SlowDown", status: int = 503
) -> list[int]:
    """Make ``method`` fail ``failures`` times with a transient error; returns the call counter."""
    real = store.fs.call_s3
    calls = [0]

    def call(m: str, *a: Any, **kw: Any) -> Any:
        if m == method:
            calls[0] += 1
            if calls[0] <= failures:
                raise OSError("injected") from _client_error(code, status)
        return real(m, *a, **kw)

    store.fs.call_s3 = call
    return calls


def test_multipart_pack_is_invisible_until_commit_and_reads_back_by_range(store: S3Storage) -> None:
    data = os.urandom(13 * MiB + 12345)
    w = store.open_writer("packs/ab/p.pack")
    for i in range(0, len(data), MiB):
        w.write(memoryview(data)[i : i + MiB])
    assert not store.exists("packs/ab/p.pack"), "parts are uploaded but the object must not exist yet"
    assert len(_uploads(store)) == 1
    w.commit()
    assert store.size("packs/ab/p.pack") == len(data)
    assert store.read("packs/ab/p.pack") == data
    for off, n in ((0, 10), (5 * MiB - 3, 7), (10 * MiB + 1, 3 * MiB), (len(data) - 5, 100)):
        assert store.read("packs/ab/p.pack", off, n) == data[off : off + n]
    buf = bytearray(2 * MiB)
    assert store.read_into("packs/ab/p.pack", 4 * MiB, memoryview(buf)) == 2 * MiB
    assert bytes(buf) == data[4 * MiB : 6 * MiB]
    assert store.read("packs/ab/p.pack", len(data) + 10, 5) == b""
    assert _uploads(store) == []


def test_aborted_upload_leaves_nothing(store: S3Storage) -> None:
    w = store.open_writer("packs/x.pack")
    w.write(os.urandom(11 * MiB))
    assert _uploads(store)
    w.abort()
    assert not store.exists("packs/x.pack")
    assert _uploads(store) == [], "abort must also abort the multipart upload"


def test_sweep_removes_uploads_of_dead_writers_only_when_old(
    store: S3Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    w = store.open_writer("packs/dead.pack")
    w.write(os.urandom(6 * MiB))  # one part shipped, then the writer "dies" (never commits)
    w._settle_one()
    assert store.sweep_incomplete(0.0) == 0, "a young upload may belong to a live save"
    assert len(_uploads(store)) == 1
    monkeypatch.setattr(s3mod, "INCOMPLETE_TTL", 0.0)
    time.sleep(1.1)  # S3 times have second resolution
    assert store.sweep_incomplete(0.0) >= 5 * MiB
    assert _uploads(store) == []


def test_transient_errors_are_retried(store: S3Storage) -> None:
    calls = _flaky(store, "put_object", failures=2)
    store.write("k", b"v")
    assert calls[0] == 3 and store.read("k") == b"v"
    calls = _flaky(store, "upload_part", failures=2, code="InternalError", status=500)
    w = store.open_writer("packs/r.pack")
    payload = os.urandom(6 * MiB)
    w.write(payload)
    w.commit()
    assert store.read("packs/r.pack") == payload


def test_persistent_failure_is_a_storage_error_after_the_retries(seaweed: SeaweedServer) -> None:
    store = open_storage(_url(), seaweed.storage_options(retries=3))
    assert isinstance(store, S3Storage)
    calls = _flaky(store, "put_object", failures=100)
    with pytest.raises(StorageError, match="put_object"):
        store.write("k", b"v")
    assert calls[0] == 3


def test_non_transient_errors_are_not_retried(store: S3Storage) -> None:
    calls = _flaky(store, "put_object", failures=100, code="AccessDenied", status=403)
    with pytest.raises(StorageError, match="access denied"):
        store.write("k", b"v")
    assert calls[0] == 1


def test_a_failed_pack_upload_leaves_no_checkpoint(seaweed: SeaweedServer) -> None:
    bank = wb.open(_url(), storage_options=seaweed.storage_options(part_size=5 * MiB, retries=2))
    store = bank.storage
    assert isinstance(store, S3Storage)
    first = bank.save({"w": torch.randn(1000)}, run="r", step=1)
    _flaky(store, "upload_part", failures=10_000, code="InternalError", status=500)
    with pytest.raises(StorageError):
        bank.save({"w": torch.randn(4 * MiB)}, run="r", step=2, codec="raw")
    assert [c.id for c in bank.log("r")] == [first.id]
    assert _uploads(store) == [], "the failed save aborted its upload"
    assert bank.verify().ok


def _ignoring(store: S3Storage, *conditions: str) -> None:
    """Make ``store`` behave like a server that ignores the given conditional headers."""
    real = store.fs.call_s3

    def call(m: str, *a: Any, **kw: Any) -> Any:
        for c in conditions:
            kw.pop(c, None)
        return real(m, *a, **kw)

    store.fs.call_s3 = call


@pytest.mark.parametrize("ignored", [("IfNoneMatch", "IfMatch"), ("IfMatch",), ("IfNoneMatch",)])
def test_a_store_ignoring_either_condition_is_refused(
    seaweed: SeaweedServer, ignored: tuple[str, ...]
) -> None:
    store = open_storage(_url(), seaweed.storage_options())
    assert isinstance(store, S3Storage)
    _ignoring(store, *ignored)
    with pytest.raises(StorageError, match="conditional_writes"):
        store.put_ref("refs/tags/a.json", b"1", None)
    assert list(store.list("refs/")) == []


def test_a_store_that_ignores_conditions_is_refused_unless_allowed(seaweed: SeaweedServer) -> None:
    def ignoring(store: S3Storage) -> None:
        _ignoring(store, "IfNoneMatch", "IfMatch")

    url = _url()
    store = open_storage(url, seaweed.storage_options())
    assert isinstance(store, S3Storage)
    ignoring(store)
    with pytest.raises(StorageError, match="conditional_writes"):
        store.put_ref("refs/tags/a.json", b"1", None)
    assert store.get_ref("refs/tags/a.json") is None, "nothing is written when refused"
    assert list(store.list("refs/")) == [], "the probe cleans up after itself"

    unsafe = open_storage(url, seaweed.storage_options(conditional_writes=False))
    assert isinstance(unsafe, S3Storage)
    ignoring(unsafe)
    t1 = unsafe.put_ref("refs/tags/a.json", b"1", None)
    with pytest.raises(ConcurrentUpdate):  # a conflict that finished before the write is still seen
        unsafe.put_ref("refs/tags/a.json", b"2", None)
    assert unsafe.put_ref("refs/tags/a.json", b"2", t1)


def test_two_machines_moving_one_tag_conflict_instead_of_losing(seaweed: SeaweedServer) -> None:
    url = _url()
    a = wb.open(url, storage_options=seaweed.storage_options())
    b = wb.open(url, storage_options=seaweed.storage_options())
    x = a.save({"w": torch.zeros(3)}, run="r", step=1).id
    y = a.save({"w": torch.ones(3)}, run="r", step=2).id
    a.tag("prod", x)
    a.tag("prod", y, expect=x)
    with pytest.raises(ConcurrentUpdate):
        b.tag("prod", x, expect=x)  # b decided on a stale view
    assert b.resolve("prod") == y
    assert [e.new for e in b.tag_history("prod")] == [x, y]


def test_bank_on_s3_dedups_deltas_and_loads_bit_exact(seaweed: SeaweedServer) -> None:
    bank = wb.open(_url(), storage_options=seaweed.storage_options())
    g = torch.Generator().manual_seed(0)
    w = torch.randn(600_000, generator=g)
    first = bank.save({"w": w, "b": torch.arange(10)}, run="r", step=1)
    again = bank.save({"w": w, "b": torch.arange(10)}, run="r", step=2)
    assert again.save_stats.written_bytes == 0
    w2 = w.clone()
    w2[:1000] += 1e-3
    third = bank.save({"w": w2, "b": torch.arange(10)}, run="r", step=3)
    assert third.save_stats.written_bytes < first.save_stats.written_bytes
    out = bank.load("r@3")
    assert torch.equal(out["w"], w2) and torch.equal(out["b"], torch.arange(10))
    assert bank.verify().ok
    bank.delete("r@1")
    bank.gc(grace=0)
    assert torch.equal(bank.load("r@2")["w"], w)


def test_corrupted_object_on_s3_is_detected(seaweed: SeaweedServer) -> None:
    bank = wb.open(_url(), storage_options=seaweed.storage_options())
    info = bank.save({"w": torch.randn(10_000)}, run="r", step=1, codec="raw")
    store = bank.storage
    pack = bank.show(info.id).packs[0]
    data = bytearray(store.read(pack))
    data[100] ^= 0xFF
    store.write(pack, bytes(data))
    with pytest.raises(wb.CorruptObject):
        bank.load(info.id)
    assert not bank.verify().ok


def test_bad_urls_and_options(seaweed: SeaweedServer, tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="no bucket"):
        wb.open("s3://")
    with pytest.raises(StorageError, match="does not exist"):
        wb.open(f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/x", storage_options=seaweed.storage_options())
    with pytest.raises(StorageError, match="access denied"):
        wb.open(_url(), storage_options={**seaweed.storage_options(), "secret": "wrong"})
    with pytest.raises(StorageError, match="storage_options apply only"):
        wb.open(tmp_path / "b", storage_options={"key": "x"})
    with pytest.raises(StorageError, match="conditional_writes"):
        wb.open(_url(), storage_options=seaweed.storage_options(conditional_writes="maybe"))
    with pytest.raises(StorageError, match="part_size"):
        open_storage(_url(), seaweed.storage_options(part_size=1024))
    with pytest.raises(StorageError, match="bad storage_options"):
        open_storage(_url(), {**seaweed.storage_options(), "no_such_option_really": 1})


def test_a_prefix_holding_other_objects_is_not_a_bank(seaweed: SeaweedServer) -> None:
    url = _url()
    open_storage(url, seaweed.storage_options()).write("notes.txt", b"hello")
    with pytest.raises(NotABank):
        wb.open(url, storage_options=seaweed.storage_options())
    with pytest.raises(NotABank):
        wb.open(_url(), create=False, storage_options=seaweed.storage_options())


def test_missing_package_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    import fsspec

    def missing(proto: str) -> Any:
        raise ImportError(f"Install s3fs to access {proto}")

    monkeypatch.setattr(fsspec, "get_filesystem_class", missing)
    with pytest.raises(MissingDependency, match=r"weightbank\[s3\]"):
        wb.open("s3://bucket/x")
    with pytest.raises(ImportError):  # MissingDependency is an ImportError too
        wb.open("gs://bucket/x")


def test_storage_options_from_the_environment(
    seaweed: SeaweedServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = _url()
    monkeypatch.setenv("WEIGHTBANK_STORAGE_OPTIONS", json.dumps(seaweed.storage_options()))
    bank = wb.open(url)
    bank.save({"w": torch.ones(2)}, run="r", step=1, tags=["prod"])
    assert wb.open(url, create=False).resolve("prod")
    monkeypatch.setenv("WEIGHTBANK_STORAGE_OPTIONS", "[1]")
    with pytest.raises(StorageError, match="JSON object"):
        wb.open(url)


_SAVER = """
import sys, time, torch, weightbank as wb
from weightbank.storage import s3
ship = s3._MultipartWriter._ship
def slow_ship(self, part):  # a slow link: the upload stays in flight long enough to be seen and killed
    time.sleep(0.3)
    ship(self, part)
s3._MultipartWriter._ship = slow_ship
bank = wb.open(sys.argv[1], create=False)
g = torch.Generator().manual_seed(1)
state = {f"w{i}": torch.randn(2_000_000, generator=g) for i in range(8)}
print("go", flush=True)
bank.save(state, run="r", step=2, codec="raw")
print("saved", flush=True)
"""


def test_sigkill_mid_upload_leaves_no_checkpoint_and_gc_cleans_up(
    seaweed: SeaweedServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    url = _url()
    opts = seaweed.storage_options(part_size=5 * MiB)
    monkeypatch.setenv("WEIGHTBANK_STORAGE_OPTIONS", json.dumps(opts))
    bank = wb.open(url)
    keep = bank.save({"w": torch.arange(5.0)}, run="r", step=1).id
    script = tmp_path / "saver.py"
    script.write_text(_SAVER)
    proc = subprocess.Popen([sys.executable, str(script), url], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "go"
        store = bank.storage
        assert isinstance(store, S3Storage)
        deadline = time.monotonic() + 60
        while not _uploads(store) and time.monotonic() < deadline:
            time.sleep(0.05)  # wait until the save is mid-upload
        assert _uploads(store), "the save never started uploading"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        if proc.stdout is not None:
            proc.stdout.close()
    assert [c.id for c in bank.log()] == [keep], "no partial checkpoint may be visible"
    monkeypatch.setattr(s3mod, "INCOMPLETE_TTL", 0.0)
    time.sleep(1.1)
    bank.gc(grace=0)
    assert _uploads(store) == []
    live_packs = set(bank.show(keep).packs)
    assert {i.key for i in store.list("packs/")} == live_packs, "the killed save left packs behind"
    assert bank.verify().ok
    assert torch.equal(bank.load(keep)["w"], torch.arange(5.0))


def test_flaky_reads_during_load_are_retried(seaweed: SeaweedServer) -> None:
    bank = wb.open(_url(), storage_options=seaweed.storage_options())
    w = torch.randn(3_000_000)
    bank.save({"w": w}, run="r", step=1)
    store = bank.storage
    assert isinstance(store, S3Storage)
    real: Callable[..., Any] = store._get_async
    calls = [0]

    async def flaky(key: str, rng: str | None) -> tuple[bytes, str]:
        calls[0] += 1
        if calls[0] % 2 == 1:
            raise ConnectionResetError("injected reset")
        result: tuple[bytes, str] = await real(key, rng)
        return result

    store._get_async = flaky  # type: ignore[method-assign]
    assert torch.equal(bank.load("r@1")["w"], w)
    assert calls[0] >= 2


def test_cli_on_an_s3_bank(seaweed: SeaweedServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from tests.cli.test_cli import as_json, fails, ok

    url = _url()
    monkeypatch.setenv("WEIGHTBANK_STORAGE_OPTIONS", json.dumps(seaweed.storage_options()))
    src = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file({"w": torch.arange(6.0)}, str(src))
    ok("init", bank=url)
    ok("import", str(src), "--run", "r", "--step", "1", "--tag", "prod", bank=url)
    log = as_json("log", bank=url)
    assert [c["step"] for c in log] == [1]
    assert as_json("verify", bank=url)["ok"] is True
    line = fails(3, "show", "nope", bank=url)
    assert "nope" in line
    monkeypatch.setenv("WEIGHTBANK_STORAGE_OPTIONS", json.dumps({**seaweed.storage_options(), "secret": "x"}))
    assert "access denied" in fails(1, "log", bank=url)


def _lose_first_reply(store: S3Storage, method: str) -> list[int]:
    """The first ``method`` call lands on the server, but its reply is "lost" (a transient error)."""
    real = store.fs.call_s3
    calls = [0]

    def call(m: str, *a: Any, **kw: Any) -> Any:
        if m == method:
            calls[0] += 1
        out = real(m, *a, **kw)
        if m == method and calls[0] == 1:
            raise OSError("reply lost") from _client_error("RequestTimeout", 500)
        return out

    store.fs.call_s3 = call
    return calls


def test_a_ref_put_whose_reply_was_lost_is_recognised_as_ours(store: S3Storage) -> None:
    t0 = store.put_ref("refs/tags/a.json", b"v0", None)
    calls = _lose_first_reply(store, "put_object")
    t1 = store.put_ref("refs/tags/a.json", b"v1", t0)  # the retry fails its condition: it already landed
    assert calls[0] == 2
    ref = store.get_ref("refs/tags/a.json")
    assert ref is not None and ref.data == b"v1" and ref.token == t1
    store.put_ref("refs/tags/a.json", b"v2", t1)  # the token returned is the live one
    with pytest.raises(ConcurrentUpdate):
        store.put_ref("refs/tags/a.json", b"v3", t0)


def test_a_completed_upload_whose_reply_was_lost_is_not_an_error(store: S3Storage) -> None:
    calls = _lose_first_reply(store, "complete_multipart_upload")
    payload = os.urandom(11 * MiB)
    w = store.open_writer("packs/c.pack")
    w.write(payload)
    w.commit()  # the retried completion answers NoSuchUpload; the object is there, so it landed
    assert calls[0] == 2
    assert store.read("packs/c.pack") == payload


def test_a_save_with_tags_on_a_store_without_cas_fails_before_writing(seaweed: SeaweedServer) -> None:
    bank = wb.open(_url(), storage_options=seaweed.storage_options())
    store = bank.storage
    assert isinstance(store, S3Storage)
    _ignoring(store, "IfNoneMatch", "IfMatch")
    with pytest.raises(StorageError, match="conditional_writes"):
        bank.save({"w": torch.ones(3)}, run="r", step=1, tags=["prod"])
    assert bank.log() == [], "the checkpoint must not be committed when its tag cannot be"
    assert list(store.list("packs/")) == []
