"""A local disk cache of content-addressed blobs (a remote bank's chunks), shared safely by processes.

Each entry is one file, ``<root>/<key[:2]>/<key>``, whose name is the hex
digest of its bytes (for a bank: the BLAKE3 of a chunk's raw, decoded bytes).
The cache knows nothing of formats and never checks contents: the reader
hashes what it gets, and a damaged entry is :meth:`DiskCache.discard`-ed and
fetched again, so a bad entry costs a refetch, never a wrong load.

Why several processes (and threads) may share one directory:

* **No partial file is ever visible.** An entry is written to a temp file in
  its shard directory (``.<key>.<pid>.<random>.tmp``) and renamed into place;
  two writers of one key write the same bytes, and the last rename wins. No
  fsync: after a power loss an entry may be short or empty, which the size
  check or the reader's hash turns into a miss.
* **Eviction is unlink.** A process still reading an evicted file keeps its
  open inode; one that has not opened it yet sees a miss. One process evicts
  at a time (a non-blocking ``flock`` on ``<root>/.evict.lock``; the others
  skip), so two never evict the same bytes twice over.
* **Least recently used goes first.** A hit bumps the file's mtime (``atime``
  is unreliable under ``noatime``/``relatime``); eviction removes the oldest
  entries until the total is 90% of the cap, so one write over the cap does
  not trigger an eviction per write.
* **Counts stay honest.** Each process keeps a running total of the bytes in
  the directory and rescans it every ``rescan_interval`` seconds, and before
  any eviction, so other processes' writes and evictions are counted.
* **A cache failure never fails a caller.** A full disk, an unwritable or
  vanished directory, a bad key: every method catches it, counts it in
  ``stats().errors`` where it was a write, and reports a miss or a skipped put.

Example:
    >>> import tempfile
    >>> from weightbank.storage.diskcache import DiskCache
    >>> cache = DiskCache(tempfile.mkdtemp(), max_bytes="1MiB")
    >>> key = "ab" * 32
    >>> cache.put(key, b"hello")
    True
    >>> buf = bytearray(5); cache.read_into(key, memoryview(buf)), bytes(buf)
    (True, b'hello')
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from .._process import pid_alive
from .._sizes import parse_bytes

__all__ = [
    "DEFAULT_MAX_BYTES",
    "ENV_DIR",
    "ENV_SIZE",
    "DiskCache",
    "DiskCacheStats",
    "default_max_bytes",
    "default_root",
]

#: Cap of a cache weightbank makes by itself (``$WEIGHTBANK_CACHE_SIZE`` overrides it).
DEFAULT_MAX_BYTES = 20 << 30
#: Environment variable naming the cache directory (default: ``$XDG_CACHE_HOME/weightbank``).
ENV_DIR = "WEIGHTBANK_CACHE"
#: Environment variable with the default cap, e.g. ``50GiB`` (``0`` disables the default cache).
ENV_SIZE = "WEIGHTBANK_CACHE_SIZE"

_LOW_WATER = 0.9
_KEY = re.compile(r"^[0-9a-f]{16,128}$")
_SHARD = re.compile(r"^[0-9a-f]{2}$")
_TEMP = re.compile(r"^\.([0-9a-f]+)\.(\d+)\.[0-9a-f]+\.tmp$")
#: A temp file this old is an orphan even if a process with its pid exists (pids are reused).
_TEMP_MAX_AGE = 3600.0
#: A hit re-stamps an entry's mtime only when it is older than this (one syscall saved per hot hit).
_TOUCH_AFTER = 1.0
_LOCK_NAME = ".evict.lock"


def default_root() -> Path:
    """``$WEIGHTBANK_CACHE``, else ``$XDG_CACHE_HOME/weightbank``, else ``~/.cache/weightbank``.

    Example:
        >>> import os
        >>> from weightbank.storage.diskcache import default_root
        >>> default_root().name == "weightbank" or "WEIGHTBANK_CACHE" in os.environ
        True
    """
    env = os.environ.get(ENV_DIR)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "weightbank"


def default_max_bytes() -> int:
    """``$WEIGHTBANK_CACHE_SIZE`` parsed (``"50GiB"``), else :data:`DEFAULT_MAX_BYTES`; InvalidName if it is bad.

    Example:
        >>> from weightbank.storage.diskcache import default_max_bytes
        >>> default_max_bytes() >= 0
        True
    """
    env = os.environ.get(ENV_SIZE, "").strip()
    return parse_bytes(env) if env else DEFAULT_MAX_BYTES


@dataclass(frozen=True)
class DiskCacheStats:
    """A disk cache's contents (as of its last scan plus this process's changes) and this process's counters."""

    root: str
    max_bytes: int
    bytes: int
    """Bytes in the directory: the last scan, plus what this process wrote or evicted since."""
    entries: int
    hits: int
    misses: int
    hit_bytes: int
    """Bytes served from the cache (each one a byte not fetched from the bank's storage)."""
    puts: int
    """Entries this process wrote."""
    put_bytes: int
    evictions: int
    """Entries this process removed to stay under the cap."""
    evicted_bytes: int
    discarded: int
    """Entries found damaged (wrong size here, wrong hash by the reader) and removed."""
    errors: int
    """Writes that failed (full disk, unwritable directory): the bytes were simply not cached."""


class DiskCache:
    """A size-capped, least-recently-used directory of blobs named by their hex digest.

    Thread-safe, and safe to share between processes (see the module
    docstring). ``max_bytes`` accepts ``"20GiB"``; a blob bigger than the cap
    is never stored.

    Example:
        >>> import tempfile
        >>> from weightbank.storage.diskcache import DiskCache
        >>> cache = DiskCache(tempfile.mkdtemp(), max_bytes=10)
        >>> cache.put("cd" * 32, b"0123456789"), cache.put("ef" * 32, b"ab"), cache.stats().entries
        (True, True, 1)
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        max_bytes: int | str = DEFAULT_MAX_BYTES,
        *,
        rescan_interval: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.root = Path(root).expanduser()
        self._max = parse_bytes(max_bytes)
        self.rescan_interval = rescan_interval
        self._clock = clock
        self._lock = threading.Lock()
        self._bytes = 0
        self._entries = 0
        self._scanned_at: float | None = None
        self._hits = self._misses = self._hit_bytes = 0
        self._puts = self._put_bytes = 0
        self._evictions = self._evicted_bytes = 0
        self._discarded = self._errors = 0

    def __repr__(self) -> str:
        return f"DiskCache({str(self.root)!r}, max_bytes={self._max})"

    @property
    def max_bytes(self) -> int:
        """The cap in bytes (change it with :meth:`resize`)."""
        return self._max

    # -- reads ------------------------------------------------------------------------
    def read_into(self, key: str, buf: memoryview) -> bool:
        """Fill ``buf`` with entry ``key``; False (a miss) if absent, of another size, or unreadable.

        The bytes are not checked: the caller verifies them and calls
        :meth:`discard` on a mismatch.

        Example:
            >>> import tempfile
            >>> from weightbank.storage.diskcache import DiskCache
            >>> DiskCache(tempfile.mkdtemp()).read_into("ab" * 32, memoryview(bytearray(4)))
            False
        """
        path = self._path(key)
        if path is None:
            return self._miss()
        try:
            f = open(path, "rb", buffering=0)  # noqa: SIM115 - closed below, after the fstat and the read
        except OSError:
            return self._miss()
        with f:
            try:
                st = os.fstat(f.fileno())
                if st.st_size != len(buf):
                    self._drop(path)
                    return self._miss()
                pos = 0
                while pos < len(buf):
                    n = f.readinto(buf[pos:])
                    if not n:
                        break
                    pos += n
            except OSError:
                return self._miss()
        if pos != len(buf):  # shrank under us: only a damaged entry can
            self._drop(path)
            return self._miss()
        if time.time() - st.st_mtime > _TOUCH_AFTER:
            with contextlib.suppress(OSError):
                os.utime(path)
        with self._lock:
            self._hits += 1
            self._hit_bytes += len(buf)
        return True

    def entry_path(self, key: str) -> str | None:
        """The file entry ``key`` is (or would be) kept in; None for a key that is not a chunk hash.

        Example:
            >>> import tempfile
            >>> from weightbank.storage.diskcache import DiskCache
            >>> DiskCache(tempfile.mkdtemp()).entry_path("ab" * 32).endswith("ab" * 32)
            True
        """
        path = self._path(key)
        return None if path is None else str(path)

    def contains(self, key: str, size: int | None = None) -> bool:
        """Whether entry ``key`` exists (of ``size`` bytes, if given); a yes counts as a use for LRU.

        Example:
            >>> import tempfile
            >>> from weightbank.storage.diskcache import DiskCache
            >>> c = DiskCache(tempfile.mkdtemp()); _ = c.put("ab" * 32, b"x")
            >>> c.contains("ab" * 32, 1), c.contains("ab" * 32, 2)
            (True, False)
        """
        path = self._path(key)
        if path is None:
            return False
        try:
            st = path.stat()
        except OSError:
            return False
        if size is not None and st.st_size != size:
            return False
        if time.time() - st.st_mtime > _TOUCH_AFTER:
            with contextlib.suppress(OSError):
                os.utime(path)
        return True

    # -- writes -----------------------------------------------------------------------
    def put(self, key: str, data: bytes | bytearray | memoryview) -> bool:
        """Store ``data`` as entry ``key``; returns whether it is now cached (never raises).

        A blob bigger than the cap is refused. Entries already present are left
        as they are. Storing may evict least recently used entries.

        Example:
            >>> import tempfile
            >>> from weightbank.storage.diskcache import DiskCache
            >>> DiskCache(tempfile.mkdtemp(), max_bytes=4).put("ab" * 32, b"too big")
            False
        """
        path = self._path(key)
        size = len(data)
        if path is None or size > self._max:
            return False
        try:
            if path.stat().st_size == size:
                return True
        except OSError:
            pass
        tmp = path.parent / f".{key}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "xb") as f:
                f.write(data)
            os.replace(tmp, path)
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            with self._lock:
                self._errors += 1
            if e.errno == errno.ENOSPC:
                self._evict(int(self._bytes * _LOW_WATER))  # room for the next put, not this one
            return False
        with self._lock:
            self._puts += 1
            self._put_bytes += size
            self._bytes += size
            self._entries += 1
        self._maybe_evict(keep=path)
        return True

    def discard(self, key: str) -> None:
        """Remove entry ``key`` (the caller found it damaged); absent entries are ignored.

        Example:
            >>> import tempfile
            >>> from weightbank.storage.diskcache import DiskCache
            >>> c = DiskCache(tempfile.mkdtemp()); _ = c.put("ab" * 32, b"x"); c.discard("ab" * 32)
            >>> c.contains("ab" * 32)
            False
        """
        path = self._path(key)
        if path is not None:
            self._drop(path)

    def resize(self, max_bytes: int | str) -> None:
        """Change the cap (``"100GiB"``); evicts now if the cache is over the new one.

        Example:
            >>> import tempfile
            >>> from weightbank.storage.diskcache import DiskCache
            >>> c = DiskCache(tempfile.mkdtemp()); c.resize("1KiB"); c.max_bytes
            1024
        """
        self._max = parse_bytes(max_bytes)
        self._maybe_evict(force_scan=True)

    def evict(self, target: int | None = None) -> int:
        """Remove least recently used entries until at most ``target`` bytes remain (default: 90% of the cap).

        Returns the bytes removed (0 when another process is evicting right now).

        Example:
            >>> import tempfile
            >>> from weightbank.storage.diskcache import DiskCache
            >>> c = DiskCache(tempfile.mkdtemp()); _ = c.put("ab" * 32, b"xyz")
            >>> c.evict(0), c.stats().entries
            (3, 0)
        """
        return self._evict(int(self._max * _LOW_WATER) if target is None else target)

    def stats(self) -> DiskCacheStats:
        """Contents and counters (rescanning the directory when the last scan is stale).

        Example:
            >>> import tempfile
            >>> from weightbank.storage.diskcache import DiskCache
            >>> DiskCache(tempfile.mkdtemp(), max_bytes="1KiB").stats().max_bytes
            1024
        """
        self._refresh()
        with self._lock:
            return DiskCacheStats(
                root=str(self.root),
                max_bytes=self._max,
                bytes=self._bytes,
                entries=self._entries,
                hits=self._hits,
                misses=self._misses,
                hit_bytes=self._hit_bytes,
                puts=self._puts,
                put_bytes=self._put_bytes,
                evictions=self._evictions,
                evicted_bytes=self._evicted_bytes,
                discarded=self._discarded,
                errors=self._errors,
            )

    # -- internals ----------------------------------------------------------------------
    def _path(self, key: str) -> Path | None:
        if not isinstance(key, str) or not _KEY.match(key):
            return None
        return self.root / key[:2] / key

    def _miss(self) -> bool:
        with self._lock:
            self._misses += 1
        return False

    def _drop(self, path: Path) -> None:
        try:
            size = path.stat().st_size
            path.unlink()
        except OSError:
            return
        with self._lock:
            self._discarded += 1
            self._bytes = max(0, self._bytes - size)
            self._entries = max(0, self._entries - 1)

    def _scan(self) -> list[tuple[int, int, Path]]:
        """Every entry as (mtime in ns, size, path); removes temp files of writers that died."""
        found: list[tuple[int, int, Path]] = []
        now = time.time()
        for shard in _scandir(self.root):
            if not (_SHARD.match(shard.name) and shard.is_dir(follow_symlinks=False)):
                continue
            for entry in _scandir(Path(shard.path)):
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                temp = _TEMP.match(entry.name)
                if temp is not None:
                    if now - st.st_mtime > _TEMP_MAX_AGE or not pid_alive(int(temp.group(2))):
                        with contextlib.suppress(OSError):
                            os.unlink(entry.path)
                elif _KEY.match(entry.name) and entry.name.startswith(shard.name):
                    found.append((st.st_mtime_ns, st.st_size, Path(entry.path)))
        with self._lock:
            self._bytes = sum(size for _, size, _ in found)
            self._entries = len(found)
            self._scanned_at = self._clock()
        return found

    def _refresh(self) -> None:
        with self._lock:
            now, at = self._clock(), self._scanned_at
            if at is not None and now - at < self.rescan_interval:
                return
            self._scanned_at = now  # claimed: other threads keep the running total meanwhile
        self._scan()

    def _maybe_evict(self, *, force_scan: bool = False, keep: Path | None = None) -> None:
        if force_scan:
            self._scan()
        else:
            self._refresh()
        if self._bytes > self._max:
            self._evict(int(self._max * _LOW_WATER), above=self._max, keep=keep)

    def _evict(self, target: int, *, above: int | None = None, keep: Path | None = None) -> int:
        """Down to ``target`` bytes, oldest first, sparing ``keep`` (a put never evicts its own entry).

        Nothing happens unless the rescanned total is over ``above`` (default: ``target``).
        """
        with self._exclusive() as mine:
            if not mine:
                return 0
            entries = self._scan()
            total = sum(size for _, size, _ in entries)
            if total <= (target if above is None else above):
                return 0
            freed = removed = 0
            for _, size, path in sorted(entries, key=lambda e: e[0]):
                if total - freed <= target:
                    break
                if path == keep:
                    continue
                try:
                    path.unlink()
                except FileNotFoundError:
                    pass  # another process discarded it: gone all the same
                except OSError:
                    continue
                freed += size
                removed += 1
            with self._lock:
                self._bytes = max(0, self._bytes - freed)
                self._entries = max(0, self._entries - removed)
                self._evictions += removed
                self._evicted_bytes += freed
            return freed

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[bool]:
        """Yield True while this process holds the eviction lock; False if another holds it (or no lock file)."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.root / _LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError:
            yield False
            return
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _scandir(path: Path) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return list(it)
    except OSError:
        return []
