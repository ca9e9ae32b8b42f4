"""Storage backends and :func:`open_storage`, which picks one from a URL.

One module holds the protocol (:mod:`~weightbank.storage.base`: ``Storage`` and
its ``StorageProperties``), one each implementation (``local``, ``memory``,
``fsspec``, ``s3``); the S3 and generic object-store backends share
``objectstore`` and ``retry``; every backend checks keys and ranges with
``keys``; ``durable`` fsyncs directories; ``diskcache`` is the local cache a
remote bank reads through; ``counting`` wraps any backend and counts its
requests.

Example:
    >>> from weightbank.storage import open_storage
    >>> open_storage("memory://").url
    'memory://'
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from ..errors import StorageError
from .base import ObjectInfo, ObjectWriter, RefValue, Storage, StorageProperties
from .counting import CountingStorage
from .local import LocalStorage
from .memory import MemoryStorage, named

__all__ = [
    "CountingStorage",
    "LocalStorage",
    "MemoryStorage",
    "ObjectInfo",
    "ObjectWriter",
    "RefValue",
    "Storage",
    "StorageProperties",
    "open_storage",
]


def open_storage(url: str | os.PathLike[str], storage_options: Mapping[str, Any] | None = None) -> Storage:
    """Return the backend for ``url``.

    A path or ``file://`` → local directory, ``memory://[name]`` → memory,
    ``s3://bucket/prefix`` → S3 (s3fs), any other ``proto://`` → that fsspec
    file system (``gs://`` with gcsfs, ``az://`` with adlfs...).
    ``storage_options`` go to the object store's client (see
    :mod:`weightbank.storage.fsspec`); they are refused for local and memory URLs.
    """
    text = os.fspath(url)
    if storage_options and ("://" not in text or text.startswith(("memory://", "file://"))):
        raise StorageError(f"storage_options apply only to object-store URLs, not {text!r}")
    if text.startswith("memory://"):
        name = text[len("memory://") :]
        if not name:
            return MemoryStorage()
        return named(name)
    if text.startswith("file://"):
        return LocalStorage(text[len("file://") :])
    if "://" in text:
        from .fsspec import open_fsspec

        return open_fsspec(text, storage_options)
    return LocalStorage(text)
