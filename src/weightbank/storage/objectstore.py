"""What every object-store backend (S3, generic fsspec) does the same way, on top of its own calls.

A backend subclasses :class:`ObjectStoreBase` and supplies ``read``, ``size``
and ``list``; the base adds ``read_into``, ``exists``, ``list_refs`` and
``local_path`` in terms of them, with the shared key and range checks of
:mod:`weightbank.storage.keys`. Objects in a store are never local files, so
``local_path`` is always None (loads copy, and a bank on a store gets a disk
cache).

Example:
    >>> from weightbank.storage.objectstore import ObjectStoreBase
    >>> ObjectStoreBase().local_path("packs/ab/x-0.pack") is None
    True
"""

from __future__ import annotations

from collections.abc import Iterator

from ..errors import MissingObject
from .base import ObjectInfo
from .keys import check_key, check_prefix, check_range

__all__ = ["ObjectStoreBase"]


class ObjectStoreBase:
    """The shared half of an object-store backend: subclasses supply ``read``, ``size`` and ``list``."""

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        raise NotImplementedError

    def size(self, key: str) -> int:
        raise NotImplementedError

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        raise NotImplementedError

    def read_into(self, key: str, offset: int, buf: memoryview) -> int:
        check_key(key)
        view = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
        want = check_range(key, offset, len(view))
        if not want:
            return 0
        data = self.read(key, offset, want)
        view[: len(data)] = data
        return len(data)

    def exists(self, key: str) -> bool:
        check_key(key)
        try:
            self.size(key)
        except MissingObject:
            return False
        return True

    def list_refs(self, prefix: str) -> Iterator[str]:
        check_prefix(prefix)  # now, not when the caller first iterates
        return (info.key for info in self.list(prefix))

    def local_path(self, key: str) -> str | None:
        check_key(key)
        return None  # no local files: loads copy, and remote banks get a disk cache
