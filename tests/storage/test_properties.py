"""The layers above read a backend's capabilities from ``properties``, never from its type or attributes."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import weightbank as wb
from weightbank.bank.caching import is_remote
from weightbank.bank.marker import init_storage
from weightbank.errors import NotABank, StorageError
from weightbank.storage import (
    LocalStorage,
    MemoryStorage,
    ObjectInfo,
    ObjectWriter,
    RefValue,
    Storage,
    StorageProperties,
)


class Wrapper:
    """A backend of no known class: every call goes to ``inner``, the properties are its own."""

    def __init__(self, inner: Storage, properties: StorageProperties, refs_refused: bool = False) -> None:
        self.inner = inner
        self.url = inner.url
        self.properties = properties
        self.refs_refused = refs_refused
        self.writes: list[str] = []

    def check_refs(self) -> None:
        if self.refs_refused:
            raise StorageError("no compare-and-swap here")

    def write(self, key: str, data: bytes | memoryview) -> None:
        self.writes.append(key)
        self.inner.write(key, data)

    # Everything else goes straight to ``inner``, spelled out so mypy checks Wrapper against Storage.
    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        return self.inner.read(key, offset, length)

    def read_into(self, key: str, offset: int, buf: memoryview) -> int:
        return self.inner.read_into(key, offset, buf)

    def open_writer(self, key: str) -> ObjectWriter:
        return self.inner.open_writer(key)

    def exists(self, key: str) -> bool:
        return self.inner.exists(key)

    def size(self, key: str) -> int:
        return self.inner.size(key)

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        return self.inner.list(prefix)

    def delete(self, key: str) -> None:
        self.inner.delete(key)

    def get_ref(self, key: str) -> RefValue | None:
        return self.inner.get_ref(key)

    def put_ref(self, key: str, data: bytes, expect: str | None) -> str:
        return self.inner.put_ref(key, data, expect)

    def list_refs(self, prefix: str) -> Iterator[str]:
        return self.inner.list_refs(prefix)

    def local_path(self, key: str) -> str | None:
        return self.inner.local_path(key)

    def sweep_incomplete(self, older_than: float) -> int:
        return self.inner.sweep_incomplete(older_than)

    def close(self) -> None:
        self.inner.close()


def test_remote_is_read_from_properties_not_guessed_from_the_class() -> None:
    local_like = Wrapper(MemoryStorage(), dataclasses.replace(MemoryStorage.properties))
    remote_like = Wrapper(MemoryStorage(), dataclasses.replace(MemoryStorage.properties, remote=True))
    assert isinstance(local_like, Storage)
    assert not is_remote(local_like) and is_remote(remote_like)
    assert wb.Bank(local_like).cache is None
    assert wb.Bank(remote_like).cache is not None


def test_a_save_that_moves_tags_asks_check_refs_before_writing_data() -> None:
    inner = MemoryStorage()
    bank = wb.Bank(Wrapper(inner, MemoryStorage.properties))
    storage = Wrapper(inner, MemoryStorage.properties, refs_refused=True)
    with pytest.raises(StorageError, match="compare-and-swap"):
        wb.Bank(storage).save({"w": torch.ones(2)}, run="r", step=1, tags=["prod"])
    assert storage.writes == [] and bank.log() == []


def test_a_new_bank_needs_an_empty_location_on_every_backend(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "notes.txt").write_text("x")
    wrapped = Wrapper(LocalStorage(tmp_path / "d"), LocalStorage.properties)
    with pytest.raises(NotABank, match="not empty"):
        init_storage(wrapped, create=True)
    assert wrapped.writes == []
    with pytest.raises(NotABank, match="it is a file"):
        wb.open(tmp_path / "d" / "notes.txt")
