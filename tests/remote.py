"""A memory store that looks remote (no local paths) and counts the pack bytes read from it."""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

from weightbank.bank.layout import PACKS
from weightbank.storage import MemoryStorage
from weightbank.storage.base import Storage, StorageProperties


class RemoteLike:
    """Wraps a store (a fresh memory one by default) and claims to be remote: ``local_path`` is always None, as on S3.

    ``reads`` / ``read_bytes`` count reads of pack objects (chunk data), the
    reads a disk cache exists to save. Everything else is passed through.
    """

    def __init__(self, inner: Storage | None = None, url: str = "remote://test") -> None:
        self.inner = inner if inner is not None else MemoryStorage(url)
        self.url = url
        self.properties: StorageProperties = dataclasses.replace(
            self.inner.properties, local_files=False, remote=True
        )
        self.reads = 0
        self.read_bytes = 0
        self._lock = threading.Lock()

    def _count(self, key: str, n: int) -> None:
        if key.startswith(PACKS):
            with self._lock:
                self.reads += 1
                self.read_bytes += n

    def reset(self) -> None:
        with self._lock:
            self.reads = self.read_bytes = 0

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        data = self.inner.read(key, offset, length)
        self._count(key, len(data))
        return data

    def read_into(self, key: str, offset: int, buf: memoryview) -> int:
        n = self.inner.read_into(key, offset, buf)
        self._count(key, n)
        return n

    def local_path(self, key: str) -> str | None:
        return None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)
