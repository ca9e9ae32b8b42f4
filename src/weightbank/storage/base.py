"""The storage backend protocol: the only thing the bank asks of a place to keep bytes.

Two kinds of object live in a backend:

* **Data objects** (packs, manifests, the format file): written once, never
  changed, read by byte range. ``write`` and ``open_writer(...).commit()`` make an
  object visible atomically and durably: a reader sees all of it or nothing,
  and after the call returns the bytes survive a crash (fsync on POSIX, a
  completed upload on an object store). No rename is required of the backend.
* **Refs** (tags): small mutable objects updated by compare-and-swap.
  ``get_ref`` returns the bytes and an opaque version token; ``put_ref`` writes
  only if the ref is still at the expected token (``None`` = must not exist),
  else raises :class:`~weightbank.errors.ConcurrentUpdate`. Tokens may be
  content hashes (as S3 ETags are), so writers must make every new value
  differ from the old one — tag and event records carry a timestamp for this. On S3 this is a
  conditional put (If-Match / If-None-Match); on a local disk a lock + rename.

Keys are untrusted (a manifest names its pack keys): every method refuses an
unsafe key or byte range with :class:`~weightbank.errors.StorageError` before
any I/O, by the checks in :mod:`weightbank.storage.keys`. A range past the end
of an object is a short read, however far past.

Capabilities
------------
What differs between backends is data, :class:`StorageProperties` in
``properties``, never something a caller finds out with ``isinstance`` or
``getattr``: whether refs are a true compare-and-swap (``conditional_refs``),
whether objects are local files (``local_files``: ``local_path`` returns them,
and the bank mmaps raw tensors), and whether every read crosses a network
(``remote``: the bank gives the store a disk cache and more load threads).
A wrapper backend (fault injection, counting) states its own, usually its
inner backend's with ``dataclasses.replace``.

Call order
----------
1. ``properties``: any time; constant for the backend's life.
2. Open: ``read`` of the format marker (``list("")`` to see whether a new
   location is empty, then ``write`` of the marker when creating).
3. Save: ``check_refs()`` first when the save will move refs (StorageError if
   ``put_ref`` would be refused, so no data is written for a save that cannot
   finish), then ``open_writer`` → ``ObjectWriter.write`` … → ``commit`` for every
   pack, then ``write`` of the manifest, then ``put_ref`` for tags. The
   crash-safety argument rests on this order.
4. Load: ``local_path`` (only when ``properties.local_files``), else
   ``read_into`` concurrently from several threads.
5. gc: ``list``, ``delete``, ``sweep_incomplete``; then ``close``.

Every method must be thread-safe.

Example:
    >>> from weightbank.storage import open_storage
    >>> s = open_storage("memory://")
    >>> s.write("a/b", b"hello")
    >>> bytes(s.read("a/b", 1, 3))
    b'ell'
    >>> s.properties.remote, s.properties.conditional_refs
    (False, True)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["ObjectInfo", "ObjectWriter", "RefValue", "Storage", "StorageProperties"]


@dataclass(frozen=True, kw_only=True)
class StorageProperties:
    """What a backend can do, as data (restic's backend ``Properties`` is the picture).

    Attributes:
        conditional_refs: ``put_ref`` is a true compare-and-swap for every process
            and machine that opens the location: of writers racing from one token,
            exactly one wins. False: refs are last-writer-wins (a store without
            conditional writes, opened to accept that) or refused altogether —
            ``check_refs`` says which. An S3 store claims it and ``check_refs``
            verifies it once, refusing a store that ignores the conditions.
        local_files: every data object is a file on this machine and
            ``local_path`` returns its path (loads mmap raw tensors); False:
            ``local_path`` always returns None.
        remote: every read crosses a network (a round trip each): a bank on it
            gets a local disk cache by default and loads with more threads.

    Example:
        >>> from weightbank.storage import LocalStorage
        >>> LocalStorage.properties
        StorageProperties(conditional_refs=True, local_files=True, remote=False)
    """

    conditional_refs: bool
    local_files: bool
    remote: bool


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: its key, size in bytes and last-modified time (epoch seconds)."""

    key: str
    size: int
    mtime: float


@dataclass(frozen=True)
class RefValue:
    """The current bytes of a ref and the token a compare-and-swap must present."""

    data: bytes
    token: str


class ObjectWriter(Protocol):
    """A streaming write of one data object; invisible until :meth:`commit`.

    Call order: ``write`` any number of times, then exactly one of ``commit``
    (durable and visible on return) or ``abort`` (nothing left behind).
    """

    def write(self, data: bytes | memoryview) -> None:
        """Append bytes to the object being written."""

    def commit(self) -> None:
        """Make the object durable, then visible under its key."""

    def abort(self) -> None:
        """Discard everything written; the key stays absent."""


@runtime_checkable
class Storage(Protocol):
    """Where a bank keeps its bytes. See the module docstring for the contract."""

    url: str

    @property
    def properties(self) -> StorageProperties:
        """What this backend can do (see :class:`StorageProperties`); constant for its life."""

    def check_refs(self) -> None:
        """StorageError now if ``put_ref`` would be refused (an object store without compare-and-swap).

        Called before a save that moves refs writes any data. May ask the store
        once (S3 probes its conditional writes); free on backends whose refs
        always work.
        """

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        """Return ``length`` bytes of ``key`` from ``offset`` (to the end if None).

        Raises MissingObject if the key is absent (or is a directory, on a file
        system). Returns fewer bytes only at the end of the object, and none
        for an offset past it; StorageError for a negative or non-integer range.
        """

    def read_into(self, key: str, offset: int, buf: memoryview) -> int:
        """Fill ``buf`` from ``key`` at ``offset``; return bytes read (short only at EOF, 0 past it)."""

    def write(self, key: str, data: bytes | memoryview) -> None:
        """Write a whole object atomically and durably (overwrites an object of the same key)."""

    def open_writer(self, key: str) -> ObjectWriter:
        """Start a streaming write of ``key`` (see :class:`ObjectWriter`)."""

    def exists(self, key: str) -> bool:
        """Whether a data object ``key`` exists."""

    def size(self, key: str) -> int:
        """Size in bytes of ``key``; MissingObject if absent."""

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        """Every data object whose key starts with ``prefix`` (no order promised)."""

    def delete(self, key: str) -> None:
        """Remove a data object or a ref; absent keys are ignored."""

    def get_ref(self, key: str) -> RefValue | None:
        """Current value of a ref, or None if it does not exist.

        CorruptObject if something that is no ref stands at the key (a directory, on a file system).
        """

    def put_ref(self, key: str, data: bytes, expect: str | None) -> str:
        """Compare-and-swap a ref; return the new token. ConcurrentUpdate on mismatch."""

    def list_refs(self, prefix: str) -> Iterator[str]:
        """Keys of the refs under ``prefix`` (only keys ``get_ref`` can read: never a directory)."""

    def local_path(self, key: str) -> str | None:
        """A filesystem path holding the object's bytes (``properties.local_files`` backends only), else None."""

    def sweep_incomplete(self, older_than: float) -> int:
        """Remove leftovers of writes that never committed (temp files of killed writers, unfinished uploads).

        Never touches a write still in progress; ``older_than`` (seconds) is a
        floor on the age of what may go. Returns the bytes freed.
        """

    def close(self) -> None:
        """Release resources (connections, file handles)."""
