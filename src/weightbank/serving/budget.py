"""Byte budgets: parsing ``"device=20GiB,host=64GiB"`` and per-tier accounting.

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

from collections.abc import Mapping
from dataclasses import dataclass

from .._sizes import format_bytes, parse_bytes
from ..errors import BudgetExceeded, InvalidName

__all__ = ["DISK", "TIERS", "TierLedger", "TierStats", "format_bytes", "parse_budget", "parse_bytes"]

TIERS = ("device", "host")
"""Memory tiers, fastest first; below the last one is the bank (through its disk cache, if remote)."""
DISK = "disk"
"""The budget entry that caps the bank's local disk cache (see :class:`~weightbank.ModelCache`)."""

_ALIASES = {
    "device": "device",
    "cuda": "device",
    "gpu": "device",
    "host": "host",
    "cpu": "host",
    "disk": DISK,
}


def parse_budget(spec: str | Mapping[str, str | int] | None) -> dict[str, int]:
    """A per-tier budget from ``"device=20GiB,host=64GiB"`` or a mapping; missing tiers get 0 bytes.

    ``cuda``/``gpu`` are accepted for ``device`` and ``cpu`` for ``host``.
    A bare size (``"8GiB"``) is the device budget. A ``disk`` entry (the cap
    of a remote bank's local disk cache) appears only when given.

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
            raise InvalidName("tier", tier_name, f"known tiers are {', '.join((*TIERS, DISK))}")
        out[tier] = parse_bytes(size)
    return out


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
