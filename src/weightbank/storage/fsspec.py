"""Object-store banks through fsspec: ``s3://``, ``gs://``, ``az://`` and any other fsspec URL.

:func:`open_fsspec` picks the backend for a URL: S3 (and S3-compatible stores)
get :class:`~weightbank.storage.s3.S3Storage`, which talks to the store through
s3fs's client with conditional writes, parallel multipart uploads and its own
listing (never a stale cache). Every other protocol gets :class:`FsspecStorage`,
which needs only fsspec's generic file-system calls.

Refs and conditional writes
---------------------------
Tags and run events are refs updated by compare-and-swap. On S3 that is a
conditional put (``If-None-Match: *`` to create, ``If-Match: <etag>`` to
replace), so two machines moving the same tag can never lose an update: the
loser gets :class:`~weightbank.errors.ConcurrentUpdate`. The first ref update
of a process probes the store once; a store that ignores the conditions is
refused with a clear error rather than silently allowed to lose updates.

A store without conditional writes (the generic backend, or an S3 clone that
ignores them) can still hold a bank when opened with
``storage_options={"conditional_writes": False}``: ref updates then re-read,
compare and write, which detects a conflict that finished before the write
but can lose one racing inside that window (last writer wins). Use it only
when a single process moves tags (e.g. rank 0, or one CI job). Checkpoints
themselves are never at risk: data objects and manifests are write-once.

Transient failures (connection resets, timeouts, 5xx, throttling) are retried
with exponential backoff and jitter (``retries`` attempts, default 5); other
errors map to the :mod:`weightbank.errors` tree (see
:mod:`weightbank.storage.retry`). What the S3 and generic backends share lives
in :mod:`weightbank.storage.objectstore`, so neither imports the other back.

Example:
    >>> from weightbank.storage.fsspec import split_url
    >>> split_url("s3://bucket/team/bank")
    ('s3', 'bucket/team/bank')
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any, TypeVar

import blake3

from ..errors import ConcurrentUpdate, CorruptObject, MissingDependency, MissingObject, StorageError
from .base import ObjectInfo, RefValue, Storage, StorageProperties
from .keys import check_key, check_prefix, check_range
from .objectstore import ObjectStoreBase
from .retry import DEFAULT_RETRIES, retrying

__all__ = ["FsspecStorage", "open_fsspec", "split_url", "storage_options_from_env"]

T = TypeVar("T")

#: Extras that install each protocol's fsspec implementation.
_EXTRAS = {"s3": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"), "az": ("adlfs", "azure")}
_EXTRAS.update({"s3a": _EXTRAS["s3"], "abfs": _EXTRAS["az"], "abfss": _EXTRAS["az"]})


def split_url(url: str) -> tuple[str, str]:
    """``proto://rest`` → ``(proto, rest)`` with trailing slashes removed; StorageError if malformed."""
    if "://" not in url:
        raise StorageError(f"{url!r} is not a URL (expected e.g. s3://bucket/prefix)")
    proto, rest = url.split("://", 1)
    rest = rest.strip("/")
    if not proto or not rest:
        raise StorageError(f"{url!r} names no bucket or path (expected e.g. {proto or 's3'}://bucket/prefix)")
    if any(p in (".", "..") for p in rest.split("/")):
        raise StorageError(f"{url!r} contains '.' or '..' path segments")
    return proto.lower(), rest


def storage_options_from_env() -> dict[str, Any]:
    """Options from ``$WEIGHTBANK_STORAGE_OPTIONS`` (a JSON object), for the CLI and servers."""
    raw = os.environ.get("WEIGHTBANK_STORAGE_OPTIONS", "").strip()
    if not raw:
        return {}
    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise StorageError(f"WEIGHTBANK_STORAGE_OPTIONS is not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise StorageError("WEIGHTBANK_STORAGE_OPTIONS must be a JSON object")
    return obj


def _import_fs_class(proto: str) -> Any:
    import fsspec

    try:
        return fsspec.get_filesystem_class(proto)
    except ImportError:
        package, extra = _EXTRAS.get(proto, (f"the fsspec implementation of {proto}://", ""))
        raise MissingDependency(f"a {proto}:// bank", package, extra) from None
    except ValueError:
        raise StorageError(
            f"no storage backend for {proto}:// (fsspec does not know that protocol)"
        ) from None


def open_fsspec(url: str, storage_options: Mapping[str, Any] | None = None) -> Storage:
    """The backend for an object-store URL; ``storage_options`` go to the fsspec file system.

    weightbank reads two keys itself: ``conditional_writes`` (``"auto"``,
    True or False — see the module docstring) and ``retries``. Without
    options, ``$WEIGHTBANK_STORAGE_OPTIONS`` (JSON) is used.

    Example:
        >>> open_fsspec("nosuchproto://x")
        Traceback (most recent call last):
        ...
        weightbank.errors.StorageError: no storage backend for nosuchproto:// (fsspec does not know that protocol)
    """
    proto, root = split_url(url)
    opts = dict(storage_options_from_env() if storage_options is None else storage_options)
    conditional = opts.pop("conditional_writes", "auto")
    if conditional not in ("auto", True, False):
        raise StorageError(f"conditional_writes must be 'auto', True or False, not {conditional!r}")
    retries = opts.pop("retries", DEFAULT_RETRIES)
    if isinstance(retries, bool) or not isinstance(retries, int) or retries < 1:
        raise StorageError(f"retries must be an int >= 1, not {retries!r}")
    cls = _import_fs_class(proto)
    if proto in ("s3", "s3a"):
        from .s3 import S3Storage

        return S3Storage(f"s3://{root}", root, opts, conditional_writes=conditional, retries=retries)
    try:
        fs = cls(**opts, skip_instance_cache=True)
    except TypeError as e:
        raise StorageError(f"{url}: bad storage_options ({e})") from None
    return FsspecStorage(f"{proto}://{root}", fs, root, conditional_writes=conditional, retries=retries)


class _SpooledWriter:
    """Streams into a local temp file; ``commit`` uploads it whole (one atomic object on a store)."""

    def __init__(self, storage: FsspecStorage, key: str) -> None:
        self._storage = storage
        self._key = key
        self._f: IO[bytes] = tempfile.NamedTemporaryFile(prefix="wb-upload-", delete=False)  # noqa: SIM115
        self._done = False

    def write(self, data: bytes | memoryview) -> None:
        self._f.write(data)

    def commit(self) -> None:
        if self._done:
            raise StorageError(f"writer for {self._key} already finished")
        self._done = True
        try:
            self._f.close()
            self._storage._put_file(self._f.name, self._key)  # streamed from disk, not held in memory
        finally:
            with contextlib.suppress(OSError):
                os.unlink(self._f.name)

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self._f.close()
            with contextlib.suppress(OSError):
                os.unlink(self._f.name)


class FsspecStorage(ObjectStoreBase):
    """A bank on any fsspec file system (generic: no compare-and-swap, see the module docstring)."""

    #: Never a true compare-and-swap: refs are refused, or last-writer-wins when opened to accept that.
    properties = StorageProperties(conditional_refs=False, local_files=False, remote=True)

    def __init__(
        self,
        url: str,
        fs: Any,
        root: str,
        *,
        conditional_writes: object = "auto",
        retries: int = DEFAULT_RETRIES,
    ) -> None:
        self.url = url
        self.fs = fs
        self.root = root.rstrip("/")
        self.retries = retries
        self._conditional = conditional_writes
        self._ref_lock = threading.Lock()

    # -- helpers -----------------------------------------------------------
    def _path(self, key: str) -> str:
        check_key(key)
        return f"{self.root}/{key}"

    def _call(self, op: str, key: str, fn: Callable[[], T]) -> T:
        return retrying(op, self.url, key, fn, attempts=self.retries)

    def _cat(self, key: str, path: str, start: int | None = None, end: int | None = None) -> bytes:
        try:
            data: bytes = self._call("read", key, lambda: self.fs.cat_file(path, start=start, end=end))
        except StorageError as e:
            if isinstance(e.__cause__, IsADirectoryError):
                raise MissingObject(key, "is a directory") from None
            raise
        return data

    # -- data objects ------------------------------------------------------
    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(key)
        want = check_range(key, offset, length)
        if want == 0:
            self.size(key)
            return b""
        if offset == 0 and want is None:
            return self._cat(key, path)
        if offset >= self.size(key):  # stores differ on ranges past the end: answer a short read ourselves
            return b""
        return self._cat(key, path, offset, None if want is None else offset + want)

    def write(self, key: str, data: bytes | memoryview) -> None:
        path = self._path(key)
        payload = bytes(data)
        self._call("write", key, lambda: self.fs.pipe_file(path, payload))

    def open_writer(self, key: str) -> _SpooledWriter:
        self._path(key)
        return _SpooledWriter(self, key)

    def _put_file(self, local: str, key: str) -> None:
        path = self._path(key)
        self._call("write", key, lambda: self.fs.put_file(local, path))

    def size(self, key: str) -> int:
        path = self._path(key)
        info = self._call("stat", key, lambda: self.fs.info(path))
        if info.get("type") == "directory":
            raise MissingObject(key, "is a directory")
        return int(info["size"])

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        check_prefix(prefix)  # now, not when the caller first iterates
        return self._list(prefix)

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        top = f"{self.root}/{base}" if base else self.root
        with contextlib.suppress(Exception):
            self.fs.invalidate_cache()
        try:
            found = self._call("list", prefix, lambda: self.fs.find(top, detail=True))
        except MissingObject:
            return
        cut = len(self.root) + 1
        for path, info in sorted(found.items()):
            key = str(path).strip("/")[cut:] if str(path).strip("/").startswith(self.root) else str(path)
            if key.startswith(prefix) and info.get("type", "file") == "file":
                yield ObjectInfo(key=key, size=int(info.get("size") or 0), mtime=_mtime(info))

    def delete(self, key: str) -> None:
        path = self._path(key)
        with contextlib.suppress(MissingObject):
            self._call("delete", key, lambda: self.fs.rm_file(path))

    # -- refs --------------------------------------------------------------
    @staticmethod
    def _token(data: bytes) -> str:
        return blake3.blake3(data).hexdigest()[:32]

    def get_ref(self, key: str) -> RefValue | None:
        path = self._path(key)
        try:
            data = self._call("read", key, lambda: self.fs.cat_file(path))
        except MissingObject:
            return None
        except StorageError as e:
            if isinstance(e.__cause__, IsADirectoryError):
                raise CorruptObject(key, detail="a directory stands where this ref belongs") from None
            raise
        return RefValue(data=bytes(data), token=self._token(data))

    def check_refs(self) -> None:
        """StorageError unless refs may be written here (opened with ``conditional_writes=False``)."""
        if self._conditional is not False:
            raise StorageError(
                f"{self.url}: this store offers weightbank no compare-and-swap, so concurrent tag updates "
                "could be lost; open it with storage_options={'conditional_writes': False} to accept "
                "last-writer-wins refs (only one process may move tags at a time)"
            )

    def put_ref(self, key: str, data: bytes, expect: str | None) -> str:
        self._path(key)
        self.check_refs()
        with self._ref_lock:
            current = self.get_ref(key)
            cur_token = current.token if current is not None else None
            if cur_token != expect:
                raise ConcurrentUpdate(key, f"expected version {expect}, found {cur_token}")
            self.write(key, data)
            return self._token(data)

    def sweep_incomplete(self, older_than: float) -> int:
        return 0  # uploads are whole-object puts from a local temp file: nothing half-written remains

    def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"


def _mtime(info: Mapping[str, Any]) -> float:
    for field in ("LastModified", "mtime", "last_modified", "updated", "created"):
        value = info.get(field)
        if value is None:
            continue
        if isinstance(value, int | float):
            return float(value)
        ts = getattr(value, "timestamp", None)
        if callable(ts):
            return float(ts())
        if isinstance(value, str):
            from datetime import datetime

            with contextlib.suppress(ValueError):
                return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    return 0.0
