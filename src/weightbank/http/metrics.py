"""Prometheus metrics of a serving process, fed by cache events and served requests.

Counters and histograms are updated as events happen; gauges (bytes per tier
and budget, leases in flight, resident checkpoints) and the disk cache's
counters (a remote bank's disk tier: ``tier="disk"`` in the byte gauges, and
``weightbank_disk_cache_*``) are read from the cache at scrape time. Each app gets its own registry, so several servers can live in
one process (tests) without clashing.

Example:
    >>> import torch, weightbank as wb
    >>> from weightbank.http.metrics import ServingMetrics
    >>> svc = wb.ModelService(wb.open("memory://"), wb.TensorHandler(lambda i: torch.nn.Linear(1, 1)), poll=0)
    >>> b"weightbank_budget_bytes" in ServingMetrics(svc).render()
    True
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..serving.results import CacheEvent, Prediction
from ..serving.service import ModelService

__all__ = ["ServingMetrics"]

_SECONDS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _Gauges(Collector):
    def __init__(self, service: ModelService) -> None:
        self._service = service

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        stats = self._service.cache.stats()
        used = GaugeMetricFamily(
            "weightbank_bytes", "Bytes resident per tier (incl. loads in flight)", labels=["tier"]
        )
        budget = GaugeMetricFamily("weightbank_budget_bytes", "Byte budget per tier", labels=["tier"])
        peak = GaugeMetricFamily(
            "weightbank_peak_bytes", "Highest bytes ever resident per tier", labels=["tier"]
        )
        resident = GaugeMetricFamily(
            "weightbank_resident_checkpoints", "Checkpoints resident", labels=["tier"]
        )
        for tier, t in stats.tiers.items():
            used.add_metric([tier], t.used)
            budget.add_metric([tier], t.budget)
            peak.add_metric([tier], t.peak)
            resident.add_metric([tier], stats.resident.get(tier, 0))
        disk = stats.disk
        if disk is not None:
            used.add_metric(["disk"], disk.bytes)
            budget.add_metric(["disk"], disk.max_bytes)
        yield used
        yield budget
        yield peak
        yield resident
        yield GaugeMetricFamily("weightbank_leases_in_flight", "Leases held right now", value=stats.leases)
        yield GaugeMetricFamily(
            "weightbank_loads_in_flight", "Loads running right now", value=stats.loads_in_flight
        )
        yield GaugeMetricFamily("weightbank_pinned_checkpoints", "Pinned checkpoints", value=stats.pinned)
        if disk is not None:
            for name, help_text, value in (
                ("hits", "Chunks loads read from the local disk cache", disk.hits),
                ("misses", "Chunks loads had to fetch from the bank's storage", disk.misses),
                ("hit_bytes", "Bytes read from the disk cache instead of storage", disk.hit_bytes),
                ("evictions", "Disk cache entries evicted to stay under its cap", disk.evictions),
                ("errors", "Disk cache writes that failed (the chunk was not cached)", disk.errors),
            ):
                yield CounterMetricFamily(f"weightbank_disk_cache_{name}", help_text, value=value)


class ServingMetrics:
    """Prometheus metrics for one :class:`~weightbank.serving.ModelService`; ``render()`` gives the exposition."""

    def __init__(self, service: ModelService) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.hits = Counter(
            "weightbank_cache_hits", "Requests that found their checkpoint in a tier", ["tier"], registry=r
        )
        self.misses = Counter(
            "weightbank_cache_misses", "Requests that did not find it in a tier", ["tier"], registry=r
        )
        self.load_seconds = Histogram(
            "weightbank_load_seconds",
            "Load time by source tier (host, bank)",
            ["tier"],
            buckets=_SECONDS,
            registry=r,
        )
        self.load_bytes = Counter(
            "weightbank_load_bytes", "Bytes brought to the device by source tier", ["tier"], registry=r
        )
        self.evictions = Counter(
            "weightbank_evictions", "Evictions by reason and tier left", ["reason", "tier"], registry=r
        )
        self.load_wait = Histogram(
            "weightbank_load_wait_seconds",
            "Time requests waited for a load (misses)",
            buckets=_SECONDS,
            registry=r,
        )
        self.requests = Counter(
            "weightbank_requests", "Requests served per checkpoint", ["checkpoint"], registry=r
        )
        self.request_seconds = Histogram(
            "weightbank_request_seconds",
            "Time to serve a request (resolve, lease, model)",
            buckets=_SECONDS,
            registry=r,
        )
        r.register(_Gauges(service))
        service.cache.subscribe(self._on_cache_event)
        service.on_request(self._on_request)

    def _on_cache_event(self, e: CacheEvent) -> None:
        if e.kind == "hit":
            self.hits.labels(e.tier).inc()
        elif e.kind == "miss":
            self.misses.labels(e.tier).inc()
        elif e.kind == "load":
            self.load_seconds.labels(e.tier).observe(e.seconds)
            self.load_bytes.labels(e.tier).inc(e.nbytes)
        elif e.kind == "evict":
            self.evictions.labels(e.reason, e.tier).inc()
        elif e.kind == "wait":
            self.load_wait.observe(e.seconds)

    def _on_request(self, p: Prediction) -> None:
        self.requests.labels(p.checkpoint[:12]).inc()
        self.request_seconds.observe(sum(p.timings.values()))

    def render(self) -> bytes:
        """The metrics in Prometheus' text format."""
        return generate_latest(self.registry)
