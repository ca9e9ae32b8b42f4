"""S3 and S3-compatible stores (AWS, SeaweedFS, MinIO, R2...) through s3fs's client.

* **Data objects** are written once. Small ones are a single ``PutObject``;
  packs stream through a multipart upload whose parts go up in parallel while
  the save keeps producing chunks (at most ``part_size`` × ``max_inflight``
  bytes buffered, 16 MiB × 8 by default). The object exists only after ``CompleteMultipartUpload``;
  ``abort`` (or a crash) leaves an unfinished upload that is invisible to
  readers and removed by :meth:`S3Storage.sweep_incomplete` (run by ``gc``).
* **Reads** are ranged ``GetObject`` calls; the bank's load pool (16 threads
  for a remote bank) issues them concurrently, one per chunk, each copied
  once into its destination tensor.
* **Refs** are conditional puts (see :mod:`weightbank.storage.fsspec`); the
  token is the object's ETag. ``properties.conditional_refs`` is True unless
  opened with ``conditional_writes=False``; :meth:`S3Storage.check_refs` probes
  the store once and refuses one that ignores the conditions.
* **Listing** uses ``ListObjectsV2`` directly, so a new manifest written by
  another machine is seen on the next call (no listing cache).

Options (``storage_options``) are s3fs's: ``key``/``secret``/``token``,
``endpoint_url``, ``client_kwargs``, ``config_kwargs``... plus weightbank's
``conditional_writes``, ``retries``, ``part_size`` and ``max_inflight``.
Credentials also come from the usual AWS environment variables and files.

Example:
    >>> import weightbank as wb  # doctest: +SKIP
    >>> bank = wb.open("s3://my-bucket/checkpoints",
    ...                storage_options={"endpoint_url": "http://127.0.0.1:8333"})  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import inspect
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from ..errors import ConcurrentUpdate, MissingObject, StorageError
from .base import ObjectInfo, RefValue, StorageProperties
from .keys import check_key, check_prefix, check_range
from .objectstore import ObjectStoreBase
from .retry import DEFAULT_RETRIES, client_error_code, retrying

__all__ = ["S3Storage"]

#: An unfinished multipart upload younger than this is presumed to belong to a live save.
INCOMPLETE_TTL = 24 * 3600.0
_CONFLICT = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}
#: Options fsspec itself takes on top of s3fs's own.
_FSSPEC_OPTIONS = {"use_listings_cache", "listings_expiry_time", "max_paths", "asynchronous", "loop"}
_UNSUPPORTED = {"NotImplemented", "501", "InvalidArgument", "InvalidRequest"}


def _size_option(opts: dict[str, Any], name: str, default: int, floor: int) -> int:
    value = opts.pop(name, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < floor:
        raise StorageError(f"{name} must be an int >= {floor}, not {value!r}")
    return value


class _MultipartWriter:
    """A pack streamed to S3 as parallel multipart parts; visible only after ``commit``."""

    def __init__(self, storage: S3Storage, key: str) -> None:
        self._s = storage
        self._key = key
        self._buf = bytearray()
        self._upload_id: str | None = None
        self._parts: deque[tuple[int, Future[str]]] = deque()
        self._done_parts: list[dict[str, Any]] = []
        self._next = 1
        self._done = False

    def write(self, data: bytes | memoryview) -> None:
        if self._done:
            raise StorageError(f"writer for {self._key} already finished")
        self._buf += memoryview(data).cast("B")
        size = self._s.part_size
        while len(self._buf) >= size:
            with memoryview(self._buf) as view:
                part = bytes(view[:size])  # the one copy a part costs
            del self._buf[:size]
            self._ship(part)

    def _ship(self, part: bytes) -> None:
        if self._upload_id is None:
            resp = self._s._op("create_multipart_upload", self._key, Key=self._s._k(self._key))
            self._upload_id = str(resp["UploadId"])
        while len(self._parts) >= self._s.max_inflight:
            self._settle_one()
        number = self._next
        self._next += 1
        upload_id = self._upload_id

        def upload() -> str:
            resp = self._s._op(
                "upload_part",
                self._key,
                Key=self._s._k(self._key),
                UploadId=upload_id,
                PartNumber=number,
                Body=part,
            )
            return str(resp["ETag"])

        self._parts.append((number, self._s._uploads().submit(upload)))

    def _settle_one(self) -> None:
        number, fut = self._parts.popleft()
        self._done_parts.append({"PartNumber": number, "ETag": fut.result()})

    def commit(self) -> None:
        if self._done:
            raise StorageError(f"writer for {self._key} already finished")
        self._done = True
        try:
            if self._upload_id is None:
                self._s.write(self._key, bytes(self._buf))
                return
            if self._buf or self._next == 1:
                self._done = False
                self._ship(bytes(self._buf))
                self._done = True
            self._buf = bytearray()
            while self._parts:
                self._settle_one()
            self._complete()
        except BaseException:
            self._abort_upload()
            raise

    def _complete(self) -> None:
        parts = sorted(self._done_parts, key=lambda p: p["PartNumber"])
        try:
            self._s._op(
                "complete_multipart_upload",
                self._key,
                Key=self._s._k(self._key),
                UploadId=self._upload_id,
                MultipartUpload={"Parts": parts},
            )
        except MissingObject:
            # NoSuchUpload after a retried completion: the first attempt landed if the object is there.
            if not self._s.exists(self._key):
                raise

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._abort_upload()

    def _abort_upload(self) -> None:
        for _, fut in self._parts:
            fut.cancel()
        for _, fut in self._parts:
            with contextlib.suppress(BaseException):
                fut.result()
        self._parts.clear()
        self._buf = bytearray()
        if self._upload_id is not None:
            with contextlib.suppress(Exception):
                self._s._op(
                    "abort_multipart_upload", self._key, Key=self._s._k(self._key), UploadId=self._upload_id
                )


class S3Storage(ObjectStoreBase):
    """A bank under ``s3://bucket/prefix``. See the module docstring for the contract it keeps."""

    def __init__(
        self,
        url: str,
        root: str,
        options: Mapping[str, Any] | None = None,
        *,
        conditional_writes: object = "auto",
        retries: int = DEFAULT_RETRIES,
    ) -> None:
        import s3fs

        opts = dict(options or {})
        self.part_size = _size_option(opts, "part_size", 16 << 20, 5 << 20)
        self.max_inflight = _size_option(opts, "max_inflight", 8, 1)
        self.url = url
        self.bucket, _, prefix = root.partition("/")
        self.prefix = prefix.strip("/")
        self.retries = retries
        self._conditional = conditional_writes
        self._probed = conditional_writes is False
        self.properties = StorageProperties(
            conditional_refs=conditional_writes is not False, local_files=False, remote=True
        )
        self._lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        known = set(inspect.signature(s3fs.S3FileSystem.__init__).parameters) | _FSSPEC_OPTIONS
        unknown = sorted(set(opts) - known - {"self", "kwargs"})
        if unknown:
            raise StorageError(
                f"{url}: bad storage_options: unknown {', '.join(map(repr, unknown))} (s3fs options such as "
                "'endpoint_url', 'key', 'secret', 'client_kwargs', or weightbank's 'conditional_writes', "
                "'retries', 'part_size', 'max_inflight')"
            )
        try:
            self.fs = s3fs.S3FileSystem(**opts, skip_instance_cache=True)
        except TypeError as e:
            raise StorageError(f"{url}: bad storage_options ({e})") from None

    # -- helpers -----------------------------------------------------------
    def _k(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _op(self, method: str, key: str, **kwargs: Any) -> Any:
        """One S3 call with retries on transient failures (only idempotent calls come here)."""
        return retrying(
            method,
            self.url,
            key,
            lambda: self.fs.call_s3(method, Bucket=self.bucket, **kwargs),
            attempts=self.retries,
        )

    async def _get_async(self, key: str, rng: str | None) -> tuple[bytes, str]:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self._k(key)}
        if rng is not None:
            kwargs["Range"] = rng
        resp = await self.fs._call_s3("get_object", **kwargs)
        body = resp["Body"]
        try:
            data = await body.read()
        finally:
            body.close()
        return bytes(data), str(resp.get("ETag", ""))

    def _get(self, key: str, rng: str | None = None) -> tuple[bytes, str]:
        from fsspec.asyn import sync

        def get() -> tuple[bytes, str]:
            try:
                result: tuple[bytes, str] = sync(self.fs.loop, self._get_async, key, rng)
            except Exception as e:
                if client_error_code(e) == "InvalidRange":
                    return b"", ""  # a range starting at or past the end: a short (empty) read
                raise
            return result

        return retrying("read", self.url, key, get, attempts=self.retries)

    def _uploads(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=8, thread_name_prefix="wb-s3-upload")
            return self._pool

    # -- data objects ------------------------------------------------------
    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        check_key(key)
        want = check_range(key, offset, length)
        if want == 0:
            self.size(key)
            return b""
        if offset == 0 and want is None:
            return self._get(key)[0]
        end = "" if want is None else str(offset + want - 1)
        return self._get(key, f"bytes={offset}-{end}")[0]

    def write(self, key: str, data: bytes | memoryview) -> None:
        check_key(key)
        if len(data) >= 2 * self.part_size:
            w = _MultipartWriter(self, key)
            try:
                w.write(data)
            except BaseException:
                w.abort()
                raise
            w.commit()
            return
        self._op("put_object", key, Key=self._k(key), Body=bytes(data))

    def open_writer(self, key: str) -> _MultipartWriter:
        self._k(key)
        return _MultipartWriter(self, key)

    def size(self, key: str) -> int:
        resp = self._op("head_object", key, Key=self._k(key))
        return int(resp["ContentLength"])

    def _list_raw(self, prefix: str) -> Iterator[dict[str, Any]]:
        full = self._k_prefix(prefix)
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Prefix": full}
            if token:
                kwargs["ContinuationToken"] = token
            resp = self._op("list_objects_v2", prefix, **kwargs)
            yield from resp.get("Contents", [])
            if not resp.get("IsTruncated"):
                return
            token = resp.get("NextContinuationToken")

    def _k_prefix(self, prefix: str) -> str:
        check_prefix(prefix)
        return f"{self.prefix}/{prefix}" if self.prefix else prefix

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        check_prefix(prefix)  # now, not when the caller first iterates
        return self._list(prefix)

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        cut = len(self.prefix) + 1 if self.prefix else 0
        for obj in self._list_raw(prefix):
            key = str(obj["Key"])[cut:]
            if key.startswith(prefix) and not key.endswith("/"):
                modified: Any = obj.get("LastModified")
                mtime = float(modified.timestamp()) if hasattr(modified, "timestamp") else 0.0
                yield ObjectInfo(key=key, size=int(obj.get("Size", 0)), mtime=mtime)

    def delete(self, key: str) -> None:
        with contextlib.suppress(MissingObject):
            self._op("delete_object", key, Key=self._k(key))

    # -- refs --------------------------------------------------------------
    def get_ref(self, key: str) -> RefValue | None:
        check_key(key)
        try:
            data, etag = self._get(key)
        except MissingObject:
            return None
        return RefValue(data=data, token=etag)

    def _refused(self, key: str, **cond: str) -> bool:
        """Whether a put of ``key`` under ``cond`` is refused (412) as the condition demands."""
        try:
            self._op("put_object", key, Key=self._k(key), Body=uuid.uuid4().bytes, **cond)
        except StorageError as e:
            code = client_error_code(e)
            if code in _CONFLICT:
                return True
            if code in _UNSUPPORTED:
                return False
            raise
        return False

    def _probe_conditional(self) -> None:
        """Check once that the store honours If-None-Match and If-Match; refuse refs on one that ignores either."""
        with self._lock:
            if self._probed:
                return
            probe = f"refs/.probe/{uuid.uuid4().hex}"
            try:
                created = not self._refused(probe, IfNoneMatch="*")
                honoured = (
                    created
                    and self._refused(probe, IfNoneMatch="*")
                    and self._refused(probe, IfMatch='"00000000000000000000000000000000"')
                )
            finally:
                self.delete(probe)
            if not honoured:
                raise StorageError(
                    f"{self.url}: this store ignores conditional writes (If-None-Match / If-Match), so "
                    "concurrent tag updates could be lost; open it with storage_options={'conditional_writes': "
                    "False} to accept last-writer-wins refs (only one process may move tags at a time)"
                )
            self._probed = True

    def check_refs(self) -> None:
        """StorageError if this store ignores conditional writes (probed once), unless opened to accept that."""
        if self._conditional is not False:
            self._probe_conditional()

    def put_ref(self, key: str, data: bytes, expect: str | None) -> str:
        check_key(key)
        if self._conditional is False:
            return self._put_ref_unsafe(key, data, expect)
        self._probe_conditional()
        cond = {"IfNoneMatch": "*"} if expect is None else {"IfMatch": expect}
        try:
            resp = retrying(
                "put_ref",
                self.url,
                key,
                lambda: self.fs.call_s3(
                    "put_object", Bucket=self.bucket, Key=self._k(key), Body=data, **cond
                ),
                attempts=self.retries,
            )
            return str(resp["ETag"])
        except StorageError as e:
            code = client_error_code(e)
            if not (
                code in _CONFLICT or code in ("NoSuchKey", "404") or isinstance(e.__cause__, FileExistsError)
            ):
                raise
        # A retried put whose first attempt landed also fails its condition: values
        # always differ from their predecessors, so equal bytes mean it was ours.
        current = self.get_ref(key)
        if current is not None and current.data == data:
            return current.token
        found = current.token if current is not None else None
        raise ConcurrentUpdate(key, f"expected version {expect}, found {found}")

    def _put_ref_unsafe(self, key: str, data: bytes, expect: str | None) -> str:
        with self._lock:
            current = self.get_ref(key)
            found = current.token if current is not None else None
            if found != expect:
                raise ConcurrentUpdate(key, f"expected version {expect}, found {found}")
            resp = self._op("put_object", key, Key=self._k(key), Body=data)
            return str(resp["ETag"])

    def sweep_incomplete(self, older_than: float) -> int:
        """Abort multipart uploads older than ``max(older_than, INCOMPLETE_TTL)`` under this bank."""
        cutoff = time.time() - max(older_than, INCOMPLETE_TTL)
        freed = 0
        kwargs: dict[str, Any] = {"Prefix": self._k_prefix("")}
        while True:
            resp = self._op("list_multipart_uploads", "", **kwargs)
            for up in resp.get("Uploads", []):
                started: Any = up.get("Initiated")
                ts = float(started.timestamp()) if hasattr(started, "timestamp") else time.time()
                if ts > cutoff:
                    continue
                key, upload_id = str(up["Key"]), str(up["UploadId"])
                with contextlib.suppress(Exception):
                    parts = self.fs.call_s3("list_parts", Bucket=self.bucket, Key=key, UploadId=upload_id)
                    freed += sum(int(p.get("Size", 0)) for p in parts.get("Parts", []))
                with contextlib.suppress(StorageError):
                    self._op("abort_multipart_upload", key, Key=key, UploadId=upload_id)
            if not resp.get("IsTruncated"):
                return freed
            kwargs["KeyMarker"] = resp.get("NextKeyMarker")
            kwargs["UploadIdMarker"] = resp.get("NextUploadIdMarker")

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=True)

    def __repr__(self) -> str:
        return f"S3Storage({self.url!r})"
