"""The key, prefix and byte-range checks every backend applies before it touches its store.

Keys are untrusted: a manifest read back from storage names its pack keys, and
a crafted (or damaged) manifest can name any string. So every backend refuses
the same keys, before any I/O, with a :class:`~weightbank.errors.StorageError`
(never the ``ValueError`` an OS raises for a NUL, nor a path that escapes the
bank's root). A safe key is ``a/b/c``:

* segments are non-empty and never ``.`` or ``..``; no leading ``/``;
* no control character (C0, DEL, C1), no backslash (a separator somewhere);
* valid Unicode (a lone surrogate has no UTF-8 encoding);
* at most 1024 UTF-8 bytes in all (S3's limit) and 255 per segment (a file name's).

Byte ranges are checked the same way: offsets and lengths are non-negative
integers. A range past the end of an object is a short read, however far
past (``2**64`` included), never an ``OverflowError`` or a huge allocation.

Example:
    >>> from weightbank.storage.keys import check_key
    >>> check_key("packs/ab/x-0.pack")
    'packs/ab/x-0.pack'
    >>> check_key("packs/\\x00")
    Traceback (most recent call last):
    ...
    weightbank.errors.StorageError: invalid storage key 'packs/\\x00': contains a control character
"""

from __future__ import annotations

import re

from ..errors import StorageError

__all__ = ["MAX_KEY_BYTES", "MAX_POSITION", "MAX_SEGMENT_BYTES", "check_key", "check_prefix", "check_range"]

#: Longest key in UTF-8 bytes (S3 refuses longer ones).
MAX_KEY_BYTES = 1024
#: Longest path segment in UTF-8 bytes (a file name on common file systems).
MAX_SEGMENT_BYTES = 255
#: The last byte position any backend can address (POSIX ``off_t``); every object ends before it.
MAX_POSITION = 2**63 - 1

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _problem(text: str, *, prefix: bool) -> str | None:
    """Why ``text`` is no safe key (or prefix), or None."""
    if not isinstance(text, str):
        return f"is a {type(text).__name__}, not a string"
    if not text:
        return None if prefix else "is empty"
    if "\\" in text:
        return "contains a backslash"
    if _CONTROL.search(text):
        return "contains a control character"
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        return "is not valid Unicode"
    if len(raw) > MAX_KEY_BYTES:
        return f"is longer than {MAX_KEY_BYTES} bytes"
    if text.startswith("/"):
        return "is absolute"
    parts = text.split("/")
    if prefix:
        parts = parts[:-1] if parts[-1] == "" else parts  # "packs/" is a prefix, "packs//" is not
    if any(p in ("", ".", "..") for p in parts):
        return "has an empty, '.' or '..' segment"
    if any(len(p.encode("utf-8")) > MAX_SEGMENT_BYTES for p in parts):
        return f"has a segment longer than {MAX_SEGMENT_BYTES} bytes"
    return None


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe storage key (see the module docstring), else StorageError saying why.

    Example:
        >>> check_key("a/../b")
        Traceback (most recent call last):
        ...
        weightbank.errors.StorageError: invalid storage key 'a/../b': has an empty, '.' or '..' segment
    """
    why = _problem(key, prefix=False)
    if why is not None:
        raise StorageError(f"invalid storage key {key!r}: {why}")
    return key


def check_prefix(prefix: str) -> str:
    """Return ``prefix`` if it is ``""`` or a safe key, optionally ending in ``/``; else StorageError.

    Example:
        >>> check_prefix("packs/"), check_prefix("")
        ('packs/', '')
    """
    why = _problem(prefix, prefix=True)
    if why is not None:
        raise StorageError(f"invalid storage prefix {prefix!r}: {why}")
    return prefix


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_range(key: str, offset: int, length: int | None = None) -> int | None:
    """Validate a read of ``length`` bytes (None: to the end) at ``offset``; return the length to ask for.

    StorageError unless both are non-negative integers. The returned length is
    clipped so the read ends by :data:`MAX_POSITION` (0 when the offset lies
    past it): such a read is short at the end of the object anyway, and the
    clip keeps every backend's arithmetic in range.

    Example:
        >>> check_range("k", 10, 2**64), check_range("k", 2**64, 1), check_range("k", 0)
        (9223372036854775797, 0, None)
    """
    if not _is_int(offset) or offset < 0 or (length is not None and (not _is_int(length) or length < 0)):
        raise StorageError(
            f"invalid byte range of {key!r}: offset {offset!r}, length {length!r} "
            "(both must be non-negative integers)"
        )
    room = max(0, MAX_POSITION - offset)
    if length is None:
        return None if room else 0
    return min(length, room)
