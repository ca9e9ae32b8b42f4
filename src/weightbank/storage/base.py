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

Optional capability: a backend whose refs may be unusable (an object store
without conditional writes) defines ``check_refs()``, which raises
StorageError when ``put_ref`` would be refused; the bank calls it before a
save that moves tags writes any data.

Call order used by the bank on save (the crash-safety argument rests on it):
``open_writer`` → ``ObjectWriter.write`` … → ``commit`` for every pack, then
``write`` of the manifest, then ``put_ref`` for tags. Loads call ``read_into``
concurrently from several threads; every method must be thread-safe.

Example:
    >>> from weightbank.storage import open_storage
    >>> s = open_storage("memory://")
    >>> s.write("a/b", b"hello")
    >>> bytes(s.read("a/b", 1, 3))
    b'ell'
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

__all__ = ["ObjectInfo", "ObjectWriter", "RefValue", "Storage"]


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

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        """Return ``length`` bytes of ``key`` from ``offset`` (to the end if None).

        Raises MissingObject if the key is absent. Returns fewer bytes only at
        the end of the object.
        """

    def read_into(self, key: str, offset: int, buf: memoryview) -> int:
        """Fill ``buf`` from ``key`` at ``offset``; return bytes read (short only at EOF)."""

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
        """Remove a data object; absent keys are ignored."""

    def get_ref(self, key: str) -> RefValue | None:
        """Current value of a ref, or None if it does not exist."""

    def put_ref(self, key: str, data: bytes, expect: str | None) -> str:
        """Compare-and-swap a ref; return the new token. ConcurrentUpdate on mismatch."""

    def list_refs(self, prefix: str) -> Iterator[str]:
        """Keys of the refs under ``prefix``."""

    def local_path(self, key: str) -> str | None:
        """A filesystem path holding the object's bytes, if the backend has one (enables mmap loads)."""

    def sweep_incomplete(self, older_than: float) -> int:
        """Remove leftovers of writes that never committed (temp files of killed writers, unfinished uploads).

        Never touches a write still in progress; ``older_than`` (seconds) is a
        floor on the age of what may go. Returns the bytes freed.
        """

    def close(self) -> None:
        """Release resources (connections, file handles)."""
