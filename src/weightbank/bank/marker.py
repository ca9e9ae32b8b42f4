"""The bank's format marker (``weightbank.json``): what makes a location a bank, and which version.

Example:
    >>> from weightbank.storage import MemoryStorage
    >>> from weightbank.bank.marker import init_storage
    >>> init_storage(MemoryStorage(), create=True)
    3
"""

from __future__ import annotations

import json
import time

from .._version import __version__
from ..errors import NotABank, StorageError, UnsupportedFormat
from ..storage.base import Storage
from .layout import FORMAT_KEY

__all__ = [
    "BANK_VERSION",
    "COMPACT_VERSION",
    "INDEXED_VERSION",
    "bank_version",
    "init_storage",
    "mark_indexed",
]

#: The bank layout this code writes: 1 = manifests only; 2 = manifests + the catalog index;
#: 3 = as 2, and saves write format-3 manifests (id over content, locations apart, segments).
BANK_VERSION = 3
#: The first layout with a catalog index (older releases refuse it, so none writes past the index).
INDEXED_VERSION = 2
#: The first layout whose saves write format-3 manifests (older releases cannot read those).
COMPACT_VERSION = 3


def _parse(storage: Storage, raw: bytes) -> dict[str, object]:
    try:
        marker = json.loads(raw)
        if marker.get("format") != "weightbank" or not isinstance(marker["version"], int):
            raise ValueError("not a weightbank marker")
    except (ValueError, KeyError, TypeError, AttributeError):
        raise NotABank(storage.url, f"{FORMAT_KEY} is unreadable") from None
    return dict(marker)


def bank_version(storage: Storage, *, missing: int | None = None) -> int:
    """The layout version the bank's marker states (``missing`` if it has none; NotABank if that is None)."""
    try:
        raw = storage.read(FORMAT_KEY)
    except FileNotFoundError:
        if missing is not None:
            return missing
        raise NotABank(storage.url, f"no {FORMAT_KEY} found") from None
    version = _parse(storage, raw)["version"]
    assert isinstance(version, int)  # _parse checked it
    return version


def mark_indexed(storage: Storage) -> None:
    """Say the bank is of the newest layout (the last step of an upgrade: the index is complete)."""
    marker = _parse(storage, storage.read(FORMAT_KEY))
    marker.update(version=BANK_VERSION, upgraded=time.time(), upgraded_by=__version__)
    storage.write(FORMAT_KEY, json.dumps(marker).encode())


def init_storage(storage: Storage, *, create: bool) -> int:
    """Check the bank's format marker, or write one into an empty location when ``create``; the layout version.

    NotABank for a location that holds other things (a file, a non-empty
    directory or prefix without a marker) or an unreadable marker;
    UnsupportedFormat for a bank made by a newer weightbank.

    Example:
        >>> from weightbank.storage import MemoryStorage
        >>> s = MemoryStorage(); init_storage(s, create=True), init_storage(s, create=False)
        (3, 3)
    """
    try:
        raw = storage.read(FORMAT_KEY)
    except FileNotFoundError:
        raw = None
    if raw is not None:
        version = _parse(storage, raw)["version"]
        assert isinstance(version, int)  # _parse checked it
        if version > BANK_VERSION:
            raise UnsupportedFormat(storage.url, version, BANK_VERSION)
        return version
    # Every backend answers this the same way (a local directory that is a file is refused
    # when it is opened: LocalStorage raises NotABank).
    if any(True for _ in storage.list("")):
        raise NotABank(storage.url, f"the location is not empty and has no {FORMAT_KEY}")
    if not create:
        raise NotABank(storage.url, f"no {FORMAT_KEY} found")
    # The catalog index's log is made of refs: a store that cannot hold them gets a format-1 bank.
    version = BANK_VERSION if _refs_work(storage) else 1
    marker = {"format": "weightbank", "version": version, "created": time.time(), "by": __version__}
    storage.write(FORMAT_KEY, json.dumps(marker).encode())
    return version


def _refs_work(storage: Storage) -> bool:
    if storage.properties.conditional_refs:
        return True  # compare-and-swap claimed; a save's check_refs verifies it (S3 probes once, then)
    try:
        storage.check_refs()
    except StorageError:
        return False
    return True
