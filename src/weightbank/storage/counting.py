"""A wrapper backend that counts the requests a bank makes of its storage.

:class:`CountingStorage` passes every call to an inner backend and counts it by
method, so a benchmark or a test can state how many requests an operation
issues (a load of a tag, a save, ``gc``) and check that the number does not
grow with the bank. Open a bank through it with :class:`weightbank.Bank`
after checking the format marker, the way :func:`weightbank.open` does::

    storage = CountingStorage(open_storage(url))
    init_storage(storage, create=False)        # weightbank.bank.marker
    bank = Bank(storage)

Example:
    >>> from weightbank.storage import CountingStorage, MemoryStorage
    >>> s = CountingStorage(MemoryStorage())
    >>> s.write("a/b", b"hello")
    >>> bytes(s.read("a/b", 1, 3))
    b'ell'
    >>> s.counts()["write"], s.counts()["read"], s.total()
    (1, 1, 2)
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Iterator
from typing import ClassVar

from .base import ObjectInfo, ObjectWriter, RefValue, Storage, StorageProperties
from .keys import check_key

__all__ = ["CountingStorage"]


class _CountingWriter:
    """An inner backend's ObjectWriter whose ``commit`` and ``abort`` are counted (``write`` is buffering, not a request)."""

    def __init__(self, outer: CountingStorage, inner: ObjectWriter) -> None:
        self._outer = outer
        self._inner = inner

    def write(self, data: bytes | memoryview) -> None:
        self._inner.write(data)

    def commit(self) -> None:
        self._outer._count("commit")
        self._inner.commit()

    def abort(self) -> None:
        self._outer._count("abort")
        self._inner.abort()


class CountingStorage:
    """A :class:`~weightbank.storage.base.Storage` that counts each call it passes to ``inner``.

    Counted, each under its method's name (:attr:`METHODS`): ``read``,
    ``read_into``, ``write``, ``commit`` and ``abort`` of a writer from
    ``open_writer`` (opening one sends nothing), ``exists``, ``size``,
    ``list``, ``delete``, ``get_ref``, ``put_ref``, ``list_refs``,
    ``check_refs`` (an object store may probe once) and ``sweep_incomplete``.
    A call is counted when it is made, whether or not it succeeds; a
    ``list`` or ``list_refs`` counts once however many keys it yields.

    ``properties`` are the inner backend's except ``local_files``, which is
    False: ``local_path`` returns None, so a load reads every byte through
    counted ``read_into`` calls instead of mapping files, and a local bank is
    counted the way a remote one would be asked.

    Thread-safe: the counts are kept under a lock, and every call is the
    inner backend's, which the protocol requires to be thread-safe.

    Example:
        >>> import torch, weightbank as wb
        >>> from weightbank.bank.marker import init_storage
        >>> from weightbank.storage import CountingStorage, MemoryStorage
        >>> s = CountingStorage(MemoryStorage()); _ = init_storage(s, create=True)
        >>> bank = wb.Bank(s); _ = bank.save({"w": torch.ones(4)}, run="r", step=1, tags=["prod"])
        >>> s.reset(); _ = bank.load("prod")
        >>> s.counts()["get_ref"] >= 1, s.total() == sum(s.counts().values())
        (True, True)
    """

    #: The counted methods, in the order :meth:`counts` lists them.
    METHODS: ClassVar[tuple[str, ...]] = (
        "read",
        "read_into",
        "write",
        "commit",
        "abort",
        "exists",
        "size",
        "list",
        "delete",
        "get_ref",
        "put_ref",
        "list_refs",
        "check_refs",
        "sweep_incomplete",
    )

    def __init__(self, inner: Storage) -> None:
        self.inner = inner
        self.url = inner.url
        self._properties = dataclasses.replace(inner.properties, local_files=False)
        self._lock = threading.Lock()
        self._counts = dict.fromkeys(self.METHODS, 0)

    @property
    def properties(self) -> StorageProperties:
        """The inner backend's properties with ``local_files=False`` (see the class docstring)."""
        return self._properties

    def _count(self, method: str) -> None:
        with self._lock:
            self._counts[method] += 1

    def counts(self) -> dict[str, int]:
        """Calls so far by method: every name in :attr:`METHODS`, zeros included.

        Example:
            >>> from weightbank.storage import CountingStorage, MemoryStorage
            >>> s = CountingStorage(MemoryStorage()); _ = s.exists("k")
            >>> {k: v for k, v in s.counts().items() if v}
            {'exists': 1}
        """
        with self._lock:
            return dict(self._counts)

    def total(self) -> int:
        """Every counted call so far.

        Example:
            >>> from weightbank.storage import CountingStorage, MemoryStorage
            >>> s = CountingStorage(MemoryStorage()); _ = list(s.list("")); _ = s.get_ref("r")
            >>> s.total()
            2
        """
        with self._lock:
            return sum(self._counts.values())

    def reset(self) -> None:
        """Set every count back to zero.

        Example:
            >>> from weightbank.storage import CountingStorage, MemoryStorage
            >>> s = CountingStorage(MemoryStorage()); _ = s.exists("k"); s.reset(); s.total()
            0
        """
        with self._lock:
            self._counts = dict.fromkeys(self.METHODS, 0)

    # -- the Storage protocol ------------------------------------------------------------------------
    def check_refs(self) -> None:
        self._count("check_refs")
        self.inner.check_refs()

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        self._count("read")
        return self.inner.read(key, offset, length)

    def read_into(self, key: str, offset: int, buf: memoryview) -> int:
        self._count("read_into")
        return self.inner.read_into(key, offset, buf)

    def write(self, key: str, data: bytes | memoryview) -> None:
        self._count("write")
        self.inner.write(key, data)

    def open_writer(self, key: str) -> ObjectWriter:
        return _CountingWriter(self, self.inner.open_writer(key))

    def exists(self, key: str) -> bool:
        self._count("exists")
        return self.inner.exists(key)

    def size(self, key: str) -> int:
        self._count("size")
        return self.inner.size(key)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        self._count("list")
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self._count("delete")
        self.inner.delete(key)

    def get_ref(self, key: str) -> RefValue | None:
        self._count("get_ref")
        return self.inner.get_ref(key)

    def put_ref(self, key: str, data: bytes, expect: str | None) -> str:
        self._count("put_ref")
        return self.inner.put_ref(key, data, expect)

    def list_refs(self, prefix: str) -> Iterator[str]:
        self._count("list_refs")
        return self.inner.list_refs(prefix)

    def local_path(self, key: str) -> str | None:
        # Never a file to map: every byte a load reads is a counted read_into (see the class docstring).
        check_key(key)
        return None

    def sweep_incomplete(self, older_than: float) -> int:
        self._count("sweep_incomplete")
        return self.inner.sweep_incomplete(older_than)

    def close(self) -> None:
        self.inner.close()
