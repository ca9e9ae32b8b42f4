"""The bank's format marker (``weightbank.json``): what makes a location a bank, and which version.

Example:
    >>> from weightbank.storage import MemoryStorage
    >>> from weightbank.bank.marker import init_storage
    >>> init_storage(MemoryStorage(), create=True)
"""

from __future__ import annotations

import json
import time

from .._version import __version__
from ..errors import NotABank, UnsupportedFormat
from ..format.manifest import FORMAT_VERSION
from ..storage.base import Storage
from .layout import FORMAT_KEY

__all__ = ["init_storage"]


def init_storage(storage: Storage, *, create: bool) -> None:
    """Check the bank's format marker, or write one into an empty location when ``create``.

    NotABank for a location that holds other things (a file, a non-empty
    directory or prefix without a marker) or an unreadable marker;
    UnsupportedFormat for a bank made by a newer weightbank.

    Example:
        >>> from weightbank.storage import MemoryStorage
        >>> s = MemoryStorage(); init_storage(s, create=True); init_storage(s, create=False)
    """
    try:
        raw = storage.read(FORMAT_KEY)
    except FileNotFoundError:
        raw = None
    if raw is not None:
        try:
            marker = json.loads(raw)
            version = marker["version"]
            if marker.get("format") != "weightbank" or not isinstance(version, int):
                raise ValueError("not a weightbank marker")
        except (ValueError, KeyError, TypeError, AttributeError):
            raise NotABank(storage.url, f"{FORMAT_KEY} is unreadable") from None
        if version > FORMAT_VERSION:
            raise UnsupportedFormat(storage.url, version, FORMAT_VERSION)
        return
    # Every backend answers this the same way (a local directory that is a file is refused
    # when it is opened: LocalStorage raises NotABank).
    if any(True for _ in storage.list("")):
        raise NotABank(storage.url, f"the location is not empty and has no {FORMAT_KEY}")
    if not create:
        raise NotABank(storage.url, f"no {FORMAT_KEY} found")
    marker = {"format": "weightbank", "version": FORMAT_VERSION, "created": time.time(), "by": __version__}
    storage.write(FORMAT_KEY, json.dumps(marker).encode())
