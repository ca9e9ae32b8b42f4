"""Byte budgets: parsing ``"20GiB"`` / ``"device=20GiB,host=64GiB"`` and per-tier accounting.

A :class:`TierLedger` is the one place a tier's bytes are counted. Every byte a
load will add is *reserved* before it is allocated, and a reservation that
would pass the budget is refused, so the tier's resident bytes never exceed
its budget, not even for an instant; ``peak`` records the highest count ever
reached, for tests and metrics to check that claim.

Example:
    >>> from weightbank.serving.budget import parse_budget, parse_bytes
    >>> parse_bytes("1.5KiB"), parse_budget("device=2MiB,host=1GB")
    (1536, {'device': 2097152, 'host': 1000000000})
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import BudgetExceeded, InvalidName

__all__ = ["TIERS", "TierLedger", "TierStats", "format_bytes", "parse_budget", "parse_bytes"]

TIERS = ("device", "host")
"""Serving tiers, fastest first; below the last one is the bank itself."""

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
_ALIASES = {"device": "device", "cuda": "device", "gpu": "device", "host": "host", "cpu": "host"}


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


def parse_budget(spec: str | Mapping[str, str | int] | None) -> dict[str, int]:
    """A per-tier budget from ``"device=20GiB,host=64GiB"`` or a mapping; missing tiers get 0 bytes.

    ``cuda``/``gpu`` are accepted for ``device`` and ``cpu`` for ``host``.
    A bare size (``"8GiB"``) is the device budget.

    Example:
        >>> parse_budget({"cuda": "1KiB"})
        {'device': 1024, 'host': 0}
    """
    out = dict.fromkeys(TIERS, 0)
    if spec is None:
        return out
    items: list[tuple[str, str | int]]
    if isinstance(spec, str):
        items = []
        for part in (p.strip() for p in spec.split(",") if p.strip()):
            name, sep, value = part.partition("=")
            items.append((name.strip(), value.strip()) if sep else ("device", name.strip()))
    else:
        items = list(spec.items())
    for tier_name, size in items:
        tier = _ALIASES.get(tier_name.lower())
        if tier is None:
            raise InvalidName("tier", tier_name, f"known tiers are {', '.join(TIERS)}")
        out[tier] = parse_bytes(size)
    return out


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


@dataclass(frozen=True)
class TierStats:
    """One tier's bytes at a moment: resident (incl. reserved for loads in flight), budget, and peak."""

    tier: str
    used: int
    budget: int
    peak: int


class TierLedger:
    """Counts one tier's bytes; refuses any reservation that would pass the budget.

    Not thread-safe by itself: the cache calls it under its lock.

    Example:
        >>> led = TierLedger("device", 100)
        >>> led.reserve(60); led.release(20); led.used, led.peak
        (40, 60)
    """

    def __init__(self, tier: str, budget: int) -> None:
        self.tier = tier
        self.budget = budget
        self.used = 0
        self.peak = 0

    @property
    def free(self) -> int:
        return self.budget - self.used

    def fits(self, nbytes: int) -> bool:
        return self.used + nbytes <= self.budget

    def reserve(self, nbytes: int, ref: str = "") -> None:
        """Count ``nbytes`` more; BudgetExceeded (and nothing counted) if that would pass the budget."""
        if not self.fits(nbytes):
            raise BudgetExceeded(
                self.tier, needed=nbytes, used=self.used, budget=self.budget, ref=ref, transient=True
            )
        self.used += nbytes
        self.peak = max(self.peak, self.used)

    def release(self, nbytes: int) -> None:
        self.used -= nbytes
        if self.used < 0:  # an accounting bug, never a user error
            raise AssertionError(f"{self.tier} ledger went negative ({self.used})")

    def stats(self) -> TierStats:
        return TierStats(tier=self.tier, used=self.used, budget=self.budget, peak=self.peak)
