"""Release for real: 1000 load/evict cycles return tracked bytes to zero and keep memory bounded."""

from __future__ import annotations

import gc

import psutil
import pytest
import torch

import weightbank as wb
from weightbank.serving import ModelCache

from .family import Family, build, make_family

CYCLES = 1000


def cycle(family: Family, cache: ModelCache, n: int) -> None:
    for k in range(n):
        cid = family.ids[k % len(family.ids)]
        with cache.lease(cid) as model:
            model(family.x[:1].to(cache.device))
        cache.unload(cid)


def test_load_evict_cycles_release_everything_on_cpu() -> None:
    family = make_family(wb.open("memory://"), n_variants=3)
    cache = ModelCache(family.bank, build, budget={"device": "1MiB"})
    proc = psutil.Process()
    cycle(family, cache, 100)  # warm up allocator and caches
    gc.collect()
    rss0 = proc.memory_info().rss
    cycle(family, cache, CYCLES)
    gc.collect()
    grew = proc.memory_info().rss - rss0
    s = cache.stats()
    assert s.tiers["device"].used == 0 and cache.models() == [] and len(cache._pools["device"]) == 0
    assert s.loads == CYCLES + 100 and s.evictions["unload"] == CYCLES + 100
    # 1000 cycles move ~13 MB through the cache; a leak of one copy per cycle would show as that much growth.
    assert grew < 8 * 2**20, f"RSS grew by {grew / 2**20:.1f} MiB"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_evict_cycles_return_cuda_memory_to_baseline() -> None:
    family = make_family(wb.open("memory://"), n_variants=3)
    cache = ModelCache(family.bank, build, device="cuda", budget={"device": "64MiB", "host": "64MiB"})
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    cycle(family, cache, 10)
    cycle(family, cache, CYCLES)
    torch.cuda.synchronize()
    assert cache.stats().tiers["device"].used == 0
    assert torch.cuda.memory_allocated() == base
    # LRU pressure with demotion to pinned host memory, then everything released
    for cid in family.ids * 3:
        with cache.lease(cid) as model:
            out = model(family.x.cuda())
            assert torch.allclose(out.cpu(), family.expected(cid), atol=1e-5)
    cache.close()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() == base
