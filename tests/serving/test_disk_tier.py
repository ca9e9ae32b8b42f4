"""The disk tier: a remote bank's local disk cache keeps what the memory tiers let go."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import weightbank as wb
from weightbank.serving import ModelCache

from ..remote import RemoteLike
from .family import Family, build, make_family


@pytest.fixture
def store() -> RemoteLike:
    return RemoteLike()


@pytest.fixture
def remote_family(store: RemoteLike) -> Family:
    return make_family(wb.Bank(store), n_variants=3)


def check_output(family: Family, cid: str, model: torch.nn.Module) -> None:
    with torch.no_grad():
        assert torch.equal(model(family.x), family.expected(cid))


def test_a_model_evicted_from_memory_reloads_from_the_disk_cache(
    remote_family: Family, store: RemoteLike
) -> None:
    fam = remote_family
    cache = ModelCache(fam.bank, build, budget={"device": fam.full_bytes, "disk": "64MiB"})
    assert fam.bank.cache is not None and fam.bank.cache.max_bytes == 64 << 20
    store.reset()
    with cache.lease(fam.ids[0]) as m:
        check_output(fam, fam.ids[0], m)
    assert store.reads > 0
    assert cache.unload(fam.ids[0]) and cache.models() == []
    store.reset()
    with cache.lease(fam.ids[0]) as m:
        check_output(fam, fam.ids[0], m)
    assert store.reads == 0, "a checkpoint evicted from memory comes back from the local disk"
    for cid in fam.ids[1:]:  # each swap evicts the previous one under this device budget
        with cache.lease(cid) as m:
            check_output(fam, cid, m)
    store.reset()
    with cache.lease(fam.ids[1]) as m:
        check_output(fam, fam.ids[1], m)
    assert store.reads == 0
    s = cache.stats()
    assert s.disk is not None and s.disk.hits > 0 and s.disk.max_bytes == 64 << 20
    assert s.evictions.get("pressure", 0) > 0
    cache.close()


def test_prefetch_to_the_disk_tier_loads_nothing_into_memory(
    remote_family: Family, store: RemoteLike
) -> None:
    fam = remote_family
    cache = ModelCache(fam.bank, build, budget="device=1MiB")
    store.reset()
    report = cache.prefetch(fam.ids[2], tier="disk").wait(10)
    assert isinstance(report, wb.PrefetchReport) and report.fetched_bytes == fam.full_bytes
    assert cache.models() == [] and cache.stats().loads == 0 and store.reads > 0
    store.reset()
    assert cache.load(fam.ids[2]).tier == "device"
    assert store.reads == 0
    bad = cache.prefetch("no-such-tag", tier="disk")
    assert isinstance(bad.exception(10), wb.CheckpointNotFound)
    with pytest.raises(wb.InvalidRequest, match="tier"):
        cache.prefetch(fam.ids[0], tier="host")  # type: ignore[call-overload]
    cache.close()


def test_a_bank_without_a_disk_cache_has_no_disk_tier(tmp_path: Path) -> None:
    fam = make_family(wb.open(tmp_path / "bank"), n_variants=1)
    cache = ModelCache(fam.bank, build, budget={"disk": "1GiB"})  # nothing to cap: a local bank is on disk
    assert cache.stats().disk is None and fam.bank.cache is None
    assert cache.load(fam.ids[1]).tier == "device"  # a disk-only budget leaves the device unbounded
    report = cache.prefetch(fam.ids[0], tier="disk").wait(10)
    assert not report.enabled and cache.models()[0].checkpoint == fam.ids[1]
    cache.close()


def test_serving_metrics_report_the_disk_tier(remote_family: Family) -> None:
    from weightbank.http.metrics import ServingMetrics

    svc = wb.ModelService(remote_family.bank, wb.TensorHandler(build), poll=0)
    metrics = ServingMetrics(svc)
    svc.cache.load(remote_family.ids[0])
    text = metrics.render().decode()
    assert 'weightbank_bytes{tier="disk"}' in text and 'weightbank_budget_bytes{tier="disk"}' in text
    assert "weightbank_disk_cache_misses_total" in text and "weightbank_disk_cache_hits_total" in text
    svc.close()
