"""Local-directory storage: the default backend.

Durability: a data object is written to ``<root>/tmp/``, fsynced, renamed into
place, and the directory holding it is fsynced, so after ``write`` returns the
object survives a power cut and a reader never sees a partial file. Refs are
replaced the same way under an exclusive ``flock`` on ``<root>/refs/.lock``,
which makes compare-and-swap safe between processes on one machine (and on
NFS servers that honour flock).

Everything here is a file on this machine: ``properties.local_files`` is True
and ``local_path`` gives the file, which loads mmap. A directory standing where
an object or a ref belongs (no bank makes one) is MissingObject for a data
object and CorruptObject for a ref, never an ``IsADirectoryError``.

Example:
    >>> import tempfile
    >>> from weightbank.storage.local import LocalStorage
    >>> s = LocalStorage(tempfile.mkdtemp())
    >>> s.write("packs/x", b"abc"); s.size("packs/x")
    3
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import blake3

from .._process import pid_alive
from ..errors import ConcurrentUpdate, CorruptObject, MissingObject, NotABank, StorageError
from .base import ObjectInfo, RefValue, StorageProperties
from .durable import fsync_dir
from .keys import check_key, check_prefix, check_range

__all__ = ["LocalStorage"]

_TMP = "tmp"
#: A temp file untouched this long is a leftover even if a process with its pid exists (pid reuse).
_TMP_TTL = 24 * 3600.0


class _LocalWriter:
    """Streams into ``tmp/`` and renames into place on commit."""

    def __init__(self, storage: LocalStorage, key: str) -> None:
        self._storage = storage
        self._key = key
        self._tmp = storage._new_tmp()
        self._f = open(self._tmp, "wb", buffering=0)  # noqa: SIM115 - closed in commit/abort
        self._done = False

    def write(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = self._f.write(view)
            if n is None:  # pragma: no cover - only for non-blocking files
                continue
            view = view[n:]

    def commit(self) -> None:
        if self._done:
            raise StorageError(f"writer for {self._key} already finished")
        self._done = True
        try:
            os.fsync(self._f.fileno())
            self._f.close()
            self._storage._publish(self._tmp, self._key)
        except BaseException:
            self._cleanup()
            raise

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        self._cleanup()

    def _cleanup(self) -> None:
        with contextlib.suppress(OSError):
            self._f.close()
        with contextlib.suppress(OSError):
            os.unlink(self._tmp)


class LocalStorage:
    """A bank in a directory on a POSIX filesystem; NotABank if ``root`` is a file."""

    #: flock + rename refs; every object a file here.
    properties = StorageProperties(conditional_refs=True, local_files=True, remote=False)

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()
        self.url = str(self.root)
        if self.root.exists() and not self.root.is_dir():
            raise NotABank(self.url, "it is a file")

    # -- helpers ---------------------------------------------------------
    def _path(self, key: str) -> Path:
        check_key(key)
        return self.root / key

    def _new_tmp(self) -> Path:
        tmpdir = self.root / _TMP
        tmpdir.mkdir(parents=True, exist_ok=True)
        # The writer's pid is in the name, so a sweep can tell a killed writer's leftovers from a live write.
        return tmpdir / f"{os.getpid()}-{uuid.uuid4().hex}.part"

    def _ensure_parent(self, path: Path) -> None:
        parent = path.parent
        if parent.is_dir():
            return
        # Create missing directories and fsync each one's parent so the new
        # directory entries are as durable as the file about to land in them.
        missing = []
        p = parent
        while not p.is_dir():
            missing.append(p)
            p = p.parent
        for d in reversed(missing):
            with contextlib.suppress(FileExistsError):
                d.mkdir()
            fsync_dir(d.parent)

    def _publish(self, tmp: Path, key: str) -> None:
        dest = self._path(key)
        try:
            self._ensure_parent(dest)
            os.replace(tmp, dest)
        except (IsADirectoryError, NotADirectoryError, FileExistsError) as e:
            # A directory where the object belongs, or a file where one of its directories does.
            raise StorageError(
                f"{self.url}: cannot write {key!r}: {e.strerror}; run `weightbank verify`"
            ) from e
        fsync_dir(dest.parent)

    # -- data objects ----------------------------------------------------
    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        path = self._path(key)
        want = check_range(key, offset, length)
        try:
            with open(path, "rb", buffering=0) as f:
                # Never ask the OS for more than the file holds (nor seek past 2**63): a crafted
                # length or offset is a short read, not a MemoryError or an OverflowError.
                n = max(0, os.fstat(f.fileno()).st_size - offset)
                n = n if want is None else min(n, want)
                if not n:
                    return b""
                f.seek(offset)
                return _read_exactly(f, n)
        except (FileNotFoundError, NotADirectoryError):
            raise MissingObject(key) from None
        except IsADirectoryError:
            raise MissingObject(key, "is a directory") from None

    def read_into(self, key: str, offset: int, buf: memoryview) -> int:
        path = self._path(key)
        view = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
        check_range(key, offset, len(view))
        try:
            fd = os.open(path, os.O_RDONLY)
        except (FileNotFoundError, NotADirectoryError):
            raise MissingObject(key) from None
        try:
            st = os.fstat(fd)
            if stat.S_ISDIR(st.st_mode):
                raise MissingObject(key, "is a directory")
            total = 0
            want = min(len(view), max(0, st.st_size - offset))
            while total < want:
                n = os.preadv(fd, [view[total:want]], offset + total)
                if n == 0:
                    break
                total += n
            return total
        finally:
            os.close(fd)

    def write(self, key: str, data: bytes | memoryview) -> None:
        check_key(key)
        w = _LocalWriter(self, key)
        try:
            w.write(data)
        except BaseException:
            w.abort()
            raise
        w.commit()

    def open_writer(self, key: str) -> _LocalWriter:
        check_key(key)
        return _LocalWriter(self, key)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        path = self._path(key)
        try:
            st = path.stat()
        except (FileNotFoundError, NotADirectoryError):
            raise MissingObject(key) from None
        if stat.S_ISDIR(st.st_mode):
            raise MissingObject(key, "is a directory")
        return st.st_size

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        check_prefix(prefix)  # now, not when the caller first iterates
        return self._list(prefix)

    def _list(self, prefix: str) -> Iterator[ObjectInfo]:
        # Walk only the directory the prefix points into.
        base = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        top = self.root / base if base else self.root
        if not top.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(top):
            rel_dir = os.path.relpath(dirpath, self.root)
            if rel_dir == _TMP or rel_dir.startswith(_TMP + os.sep):
                dirnames.clear()
                continue
            for name in filenames:
                key = name if rel_dir == "." else f"{rel_dir.replace(os.sep, '/')}/{name}"
                if not key.startswith(prefix) or name.endswith(".lock"):
                    continue
                try:
                    st = os.stat(os.path.join(dirpath, name))
                except FileNotFoundError:
                    continue  # deleted while listing
                yield ObjectInfo(key=key, size=st.st_size, mtime=st.st_mtime)

    def delete(self, key: str) -> None:
        path = self._path(key)
        with contextlib.suppress(FileNotFoundError, NotADirectoryError, IsADirectoryError):
            path.unlink()  # a directory is no object: nothing of ours to delete

    # -- refs --------------------------------------------------------------
    def _lock(self) -> int:
        lockdir = self.root / "refs"
        lockdir.mkdir(parents=True, exist_ok=True)
        fd = os.open(lockdir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    @staticmethod
    def _token(data: bytes) -> str:
        return blake3.blake3(data).hexdigest()[:32]

    def get_ref(self, key: str) -> RefValue | None:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except IsADirectoryError:
            raise CorruptObject(key, detail="a directory stands where this ref belongs") from None
        return RefValue(data=data, token=self._token(data))

    def check_refs(self) -> None:
        return None  # flock + rename: refs always work here

    def put_ref(self, key: str, data: bytes, expect: str | None) -> str:
        check_key(key)
        fd = self._lock()
        try:
            current = self.get_ref(key)
            cur_token = current.token if current is not None else None
            if cur_token != expect:
                raise ConcurrentUpdate(key, f"expected version {expect}, found {cur_token}")
            self.write(key, data)
            return self._token(data)
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def list_refs(self, prefix: str) -> Iterator[str]:
        return (info.key for info in self.list(prefix))  # files only: a directory is never listed

    def local_path(self, key: str) -> str | None:
        path = self._path(key)
        return str(path) if path.is_file() else None

    def sweep_incomplete(self, older_than: float) -> int:
        freed = 0
        now = time.time()
        tmpdir = self.root / _TMP
        if not tmpdir.is_dir():
            return 0
        for path in tmpdir.iterdir():
            try:
                st = path.stat()
                pid = int(path.name.split("-", 1)[0])
            except (OSError, ValueError):
                continue
            age = now - st.st_mtime
            writer_gone = not pid_alive(pid)
            if age >= older_than and (writer_gone or age > _TMP_TTL):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    freed += st.st_size
        return freed

    def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"LocalStorage({self.url!r})"


def _read_exactly(f: io.FileIO, n: int) -> bytes:
    """``n`` bytes from ``f`` (fewer only at EOF): one ``read()`` stops at 2 GiB on Linux."""
    data = f.read(n)
    if data is None or len(data) >= n:
        return data or b""
    parts, got = [data], len(data)
    while got < n:
        more = f.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)
