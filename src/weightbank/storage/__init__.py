"""Storage backends and :func:`open_storage`, which picks one from a URL.

Example:
    >>> from weightbank.storage import open_storage
    >>> open_storage("memory://").url
    'memory://'
"""

from __future__ import annotations

import os

from ..errors import StorageError
from .base import ObjectInfo, ObjectWriter, RefValue, Storage
from .local import LocalStorage
from .memory import MemoryStorage, named

__all__ = [
    "LocalStorage",
    "MemoryStorage",
    "ObjectInfo",
    "ObjectWriter",
    "RefValue",
    "Storage",
    "open_storage",
]


def open_storage(url: str | os.PathLike[str]) -> Storage:
    """Return the backend for ``url``: a path or ``file://`` → local, ``memory://[name]`` → memory.

    Object-store URLs (``s3://`` and friends) arrive with the fsspec backend.
    """
    text = os.fspath(url)
    if text.startswith("memory://"):
        name = text[len("memory://") :]
        if not name:
            return MemoryStorage()
        return named(name)
    if text.startswith("file://"):
        return LocalStorage(text[len("file://") :])
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise StorageError(
            f"no storage backend for {scheme}:// yet; use a local path or memory:// "
            "(object stores arrive with the fsspec backend)"
        )
    return LocalStorage(text)
