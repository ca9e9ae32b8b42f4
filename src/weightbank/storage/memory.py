"""In-memory storage, for tests and throwaway banks.

``memory://`` opens a fresh private store; ``memory://name`` opens the store
of that name, shared by every ``open`` of the same name in this process (the
registry is explicit: :func:`forget` drops one).

Example:
    >>> from weightbank.storage.memory import MemoryStorage
    >>> s = MemoryStorage(); s.write("k", b"v"); s.exists("k")
    True
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Iterator

from ..errors import ConcurrentUpdate, MissingObject
from .base import ObjectInfo, RefValue, StorageProperties
from .keys import check_key, check_prefix, check_range

__all__ = ["MemoryStorage", "forget", "named"]

_REGISTRY: dict[str, MemoryStorage] = {}
_REGISTRY_LOCK = threading.Lock()


def named(name: str) -> MemoryStorage:
    """The process-wide memory store called ``name`` (created on first use)."""
    with _REGISTRY_LOCK:
        store = _REGISTRY.get(name)
        if store is None:
            store = _REGISTRY[name] = MemoryStorage(f"memory://{name}")
        return store


def forget(name: str) -> None:
    """Drop the named memory store from the registry."""
    with _REGISTRY_LOCK:
        _REGISTRY.pop(name, None)


class _MemoryWriter:
    def __init__(self, storage: MemoryStorage, key: str) -> None:
        self._storage = storage
        self._key = key
        self._parts: list[bytes] = []
        self._done = False

    def write(self, data: bytes | memoryview) -> None:
        self._parts.append(bytes(data))

    def commit(self) -> None:
        self._done = True
        self._storage.write(self._key, b"".join(self._parts))
        self._parts = []

    def abort(self) -> None:
        self._done = True
        self._parts = []


class MemoryStorage:
    """A dict of bytes with the same contract as the disk backends (keys checked the same way too)."""

    #: One lock guards every ref of the process; nothing is a file, nothing crosses a network.
    properties = StorageProperties(conditional_refs=True, local_files=False, remote=False)

    def __init__(self, url: str = "memory://") -> None:
        self.url = url
        self._objects: dict[str, tuple[bytes, float]] = {}
        self._refs: dict[str, tuple[bytes, str]] = {}
        self._lock = threading.Lock()
        self._counter = itertools.count(1)

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        check_key(key)
        want = check_range(key, offset, length)
        with self._lock:
            obj = self._objects.get(key)
        if obj is None:
            raise MissingObject(key)
        data = obj[0]
        return data[offset:] if want is None else data[offset : offset + want]

    def read_into(self, key: str, offset: int, buf: memoryview) -> int:
        view = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
        data = self.read(key, offset, len(view))
        view[: len(data)] = data
        return len(data)

    def write(self, key: str, data: bytes | memoryview) -> None:
        check_key(key)
        blob = bytes(data)
        with self._lock:
            self._objects[key] = (blob, time.time())

    def open_writer(self, key: str) -> _MemoryWriter:
        return _MemoryWriter(self, check_key(key))

    def exists(self, key: str) -> bool:
        check_key(key)
        with self._lock:
            return key in self._objects

    def size(self, key: str) -> int:
        check_key(key)
        with self._lock:
            obj = self._objects.get(key)
        if obj is None:
            raise MissingObject(key)
        return len(obj[0])

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        check_prefix(prefix)
        with self._lock:
            items = [(k, len(v[0]), v[1]) for k, v in self._objects.items() if k.startswith(prefix)]
        return iter([ObjectInfo(key=k, size=n, mtime=t) for k, n, t in items])

    def delete(self, key: str) -> None:
        check_key(key)
        with self._lock:
            self._objects.pop(key, None)
            self._refs.pop(key, None)  # refs are objects too on every other backend: delete removes either

    def get_ref(self, key: str) -> RefValue | None:
        check_key(key)
        with self._lock:
            ref = self._refs.get(key)
        return None if ref is None else RefValue(data=ref[0], token=ref[1])

    def check_refs(self) -> None:
        return None  # one lock per store: refs always work here

    def put_ref(self, key: str, data: bytes, expect: str | None) -> str:
        check_key(key)
        with self._lock:
            cur = self._refs.get(key)
            cur_token = cur[1] if cur is not None else None
            if cur_token != expect:
                raise ConcurrentUpdate(key, f"expected version {expect}, found {cur_token}")
            token = str(next(self._counter))
            self._refs[key] = (bytes(data), token)
            return token

    def list_refs(self, prefix: str) -> Iterator[str]:
        check_prefix(prefix)
        with self._lock:
            keys = [k for k in self._refs if k.startswith(prefix)]
        return iter(keys)

    def local_path(self, key: str) -> str | None:
        check_key(key)
        return None

    def sweep_incomplete(self, older_than: float) -> int:
        return 0  # a memory write is never left half-done

    def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"MemoryStorage({self.url!r})"
