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
errors map to the :mod:`weightbank.errors` tree (a missing object is
:class:`~weightbank.errors.MissingObject`, a refused login a
:class:`~weightbank.errors.StorageError` saying to check credentials).

Example:
    >>> from weightbank.storage.fsspec import split_url
    >>> split_url("s3://bucket/team/bank")
    ('s3', 'bucket/team/bank')
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from typing import IO, Any, TypeVar

import blake3

from ..errors import ConcurrentUpdate, MissingDependency, MissingObject, StorageError, WeightbankError
from .base import ObjectInfo, RefValue, Storage

__all__ = [
    "DEFAULT_RETRIES",
    "FsspecStorage",
    "ObjectStoreBase",
    "check_key",
    "open_fsspec",
    "retrying",
    "split_url",
    "storage_options_from_env",
]

T = TypeVar("T")

DEFAULT_RETRIES = 5
#: Extras that install each protocol's fsspec implementation.
_EXTRAS = {"s3": ("s3fs", "s3"), "gs": ("gcsfs", "gcs"), "gcs": ("gcsfs", "gcs"), "az": ("adlfs", "azure")}
_EXTRAS.update({"s3a": _EXTRAS["s3"], "abfs": _EXTRAS["az"], "abfss": _EXTRAS["az"]})
_TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "Throttling",
    "ThrottlingException",
    "500",
    "502",
    "503",
    "504",
}
_TRANSIENT_ERRNOS = {
    errno.EAGAIN,
    errno.ETIMEDOUT,
    errno.ECONNRESET,
    errno.ECONNREFUSED,
    errno.ECONNABORTED,
    errno.EPIPE,
    errno.EREMOTEIO,
    errno.EBUSY,
}


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


def client_error_code(exc: BaseException) -> str | None:
    """The S3 error code (``"PreconditionFailed"``, ``"503"``...) behind ``exc``, if it came from botocore."""
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            err = response.get("Error") or {}
            code = err.get("Code")
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if code:
                return str(code)
            if status:
                return str(status)
        e = e.__cause__ or e.__context__
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth retrying (network trouble, 5xx, throttling) rather than a real answer."""
    if isinstance(exc, WeightbankError | FileNotFoundError | PermissionError | FileExistsError):
        return False
    code = client_error_code(exc)
    if code is not None:
        return code in _TRANSIENT_CODES
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    name = type(exc).__name__
    return name in {"ClientPayloadError", "ServerDisconnectedError", "ClientOSError", "IncompleteRead"} or (
        "Timeout" in name
    )


def translate(exc: BaseException, op: str, url: str, key: str) -> WeightbankError:
    """Map a backend exception to the weightbank error a caller can act on."""
    if isinstance(exc, WeightbankError):
        return exc
    code = client_error_code(exc)
    if code == "NoSuchBucket":
        return StorageError(f"{url}: the bucket does not exist; create it first")
    if isinstance(exc, FileNotFoundError) or code in ("NoSuchKey", "404", "NotFound"):
        return MissingObject(key)
    if isinstance(exc, PermissionError) or code in (
        "AccessDenied",
        "403",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
    ):
        return StorageError(f"{url}: access denied on {op} of {key!r}; check the credentials and permissions")
    err = StorageError(f"{url}: {op} of {key!r} failed: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


def retrying(
    op: str,
    url: str,
    key: str,
    fn: Callable[[], T],
    *,
    attempts: int = DEFAULT_RETRIES,
    base_delay: float = 0.1,
    max_delay: float = 5.0,
) -> T:
    """Call ``fn``; retry transient failures with exponential backoff and full jitter.

    Non-transient errors and the last transient one are translated with
    :func:`translate`. Only idempotent operations may be passed here.

    Example:
        >>> retrying("read", "mem://", "k", lambda: 42)
        42
    """
    for attempt in range(max(1, attempts)):
        try:
            return fn()
        except Exception as e:
            if attempt + 1 >= attempts or not is_transient(e):
                raise translate(e, op, url, key) from e
            time.sleep(random.uniform(0, min(max_delay, base_delay * 2**attempt)))
    raise AssertionError("unreachable")  # pragma: no cover


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


def check_key(key: str) -> None:
    """StorageError unless ``key`` is a relative ``a/b/c`` key with no empty, ``.`` or ``..`` part."""
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in key.split("/")):
        raise StorageError(f"invalid storage key {key!r}")


class ObjectStoreBase:
    """What every object-store backend does the same way, on top of its own ``read``/``size``/``list``."""

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        raise NotImplementedError

    def size(self, key: str) -> int:
        raise NotImplementedError

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        raise NotImplementedError

    def read_into(self, key: str, offset: int, buf: memoryview) -> int:
        view = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
        if not len(view):
            return 0
        data = self.read(key, offset, len(view))
        view[: len(data)] = data
        return len(data)

    def exists(self, key: str) -> bool:
        try:
            self.size(key)
        except MissingObject:
            return False
        return True

    def list_refs(self, prefix: str) -> Iterator[str]:
        for info in self.list(prefix):
            yield info.key

    def local_path(self, key: str) -> str | None:
        return None  # no local files: loads copy, and remote banks get a disk cache


class FsspecStorage(ObjectStoreBase):
    """A bank on any fsspec file system (generic: no compare-and-swap, see the module docstring)."""

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

    # -- data objects ------------------------------------------------------
    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(key)
        if length is not None and length <= 0:
            self.size(key)
            return b""
        if offset == 0 and length is None:
            whole: bytes = self._call("read", key, lambda: self.fs.cat_file(path))
            return whole
        end = None if length is None else offset + length
        if offset >= self.size(key):  # stores differ on ranges past the end: answer a short read ourselves
            return b""
        data: bytes = self._call("read", key, lambda: self.fs.cat_file(path, start=offset, end=end))
        return data

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
        try:
            data = self.read(key)
        except MissingObject:
            return None
        return RefValue(data=data, token=self._token(data))

    def check_refs(self) -> None:
        """StorageError unless refs may be written here (opened with ``conditional_writes=False``)."""
        if self._conditional is not False:
            raise StorageError(
                f"{self.url}: this store offers weightbank no compare-and-swap, so concurrent tag updates "
                "could be lost; open it with storage_options={'conditional_writes': False} to accept "
                "last-writer-wins refs (only one process may move tags at a time)"
            )

    def put_ref(self, key: str, data: bytes, expect: str | None) -> str:
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
