"""Byte counts for people: parsing ``"20GiB"`` and printing ``3.0 MiB`` (used by every layer).

Example:
    >>> from weightbank._sizes import format_bytes, parse_bytes
    >>> parse_bytes("1.5KiB"), format_bytes(3 * 2**20)
    (1536, '3.0 MiB')
"""

from __future__ import annotations

import re

from .errors import InvalidName

__all__ = ["format_bytes", "parse_bytes"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1 << 10,
    "mib": 1 << 20,
    "gib": 1 << 30,
    "tib": 1 << 40,
}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")


def parse_bytes(text: str | int) -> int:
    """``"20GiB"``, ``"512MB"``, ``"1.5KiB"`` or an int → bytes (binary units are powers of 1024).

    Example:
        >>> parse_bytes("20GiB") == 20 * 2**30, parse_bytes(7)
        (True, 7)
    """
    if isinstance(text, bool):
        raise InvalidName("size", str(text), "expected a byte count like 20GiB")
    if isinstance(text, int):
        if text < 0:
            raise InvalidName("size", str(text), "a byte count cannot be negative")
        return text
    m = _SIZE.match(str(text))
    unit = m.group(2).lower() if m else ""
    if m is None or unit not in _UNITS:
        raise InvalidName("size", str(text), "expected a number and a unit, e.g. 512MiB, 20GiB, 1.5GB")
    return int(float(m.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    """Human-readable bytes.

    Example:
        >>> format_bytes(3 * 2**20)
        '3.0 MiB'
    """
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover - loop always returns
