"""Frozen results of the serving layer: resident models, cache statistics, cache events, predictions.

Example:
    >>> from weightbank.serving.results import CacheEvent
    >>> CacheEvent(kind="hit", checkpoint="ab" * 32, tier="device").kind
    'hit'
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..storage.diskcache import DiskCacheStats
from .budget import TierStats

__all__ = ["CacheEvent", "CacheStats", "ModelStatus", "Prediction"]


@dataclass(frozen=True)
class ModelStatus:
    """One resident checkpoint: where it lives, what it costs, who uses it."""

    checkpoint: str
    tier: Literal["device", "host"]
    nbytes: int
    """Bytes of all its tensors (shared ones included)."""
    unique_bytes: int
    """Bytes only it holds in its tier: what evicting it would free."""
    leases: int
    pinned: bool
    loaded_at: float
    """Wall-clock time (``time.time()``) it became resident in this tier."""
    last_used: float
    """Wall-clock time of its last lease."""


@dataclass(frozen=True)
class CacheStats:
    """Counters and gauges of a :class:`~weightbank.ModelCache` at one moment."""

    tiers: dict[str, TierStats]
    hits: dict[str, int]
    """Per tier, requests that found the checkpoint there."""
    misses: dict[str, int]
    """Per tier, requests that did not (a device miss is a host hit or a host miss, i.e. a bank read)."""
    loads: int
    load_seconds: float
    bytes_loaded: dict[str, int]
    """Bytes brought onto the device, by source tier (``host`` promotions, ``bank`` reads)."""
    bytes_reused: int
    """Bytes loads found already resident on the device (shared tensors): the swap-by-difference saving."""
    evictions: dict[str, int]
    """By reason: ``pressure``, ``ttl``, ``unload``, ``demote`` (device → host)."""
    leases: int
    loads_in_flight: int
    resident: dict[str, int]
    pinned: int
    queue_wait_seconds: float
    """Total time requests spent waiting for a load."""
    disk: DiskCacheStats | None = None
    """The bank's local disk cache (the disk tier of a remote bank); None when it has none."""

    @property
    def hit_rate(self) -> float:
        """Device hits per request."""
        total = self.hits.get("device", 0) + self.misses.get("device", 0)
        return self.hits.get("device", 0) / total if total else 0.0


@dataclass(frozen=True)
class CacheEvent:
    """Something the cache did, as passed to listeners (metrics exporters)."""

    kind: Literal["hit", "miss", "load", "evict", "wait"]
    checkpoint: str
    tier: str
    """hit/miss: the tier asked; load: the source tier (host or bank); evict: the tier left."""
    seconds: float = 0.0
    nbytes: int = 0
    reason: str = ""


@dataclass(frozen=True)
class Prediction:
    """One served request: the handler's JSON-safe output and the checkpoint that produced it."""

    output: Any
    checkpoint: str
    ref: str
    """What the request named (after picking a route's arm)."""
    route: str | None = None
    arm: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
