"""A bank's local disk cache: which one a bank gets, and prefetching a checkpoint into it.

A remote bank (its storage has no local files: ``s3://`` and other object
stores) caches every chunk it loads in a :class:`~weightbank.storage.diskcache.DiskCache`
at ``$WEIGHTBANK_CACHE`` (default ``~/.cache/weightbank``), capped at
``$WEIGHTBANK_CACHE_SIZE`` (default 20 GiB). Entries are named by the hash of
a chunk's decoded bytes, so banks and processes share one directory safely.
A local directory or memory bank reads its storage as fast as a cache would,
so it gets none unless asked for one.

``prefetch`` counts an entry of the right size as cached without reading it:
a damaged one is still caught (and fetched again) by the load that reads it.

Example:
    >>> import tempfile
    >>> from weightbank.bank.caching import choose_cache
    >>> from weightbank.storage import MemoryStorage
    >>> choose_cache(MemoryStorage(), None) is None, choose_cache(MemoryStorage(), tempfile.mkdtemp()) is not None
    (True, True)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from .._sizes import parse_bytes
from ..format.manifest import Manifest
from ..storage.base import Storage
from ..storage.diskcache import DiskCache, default_max_bytes, default_root
from .reader import prefetch_chunks
from .results import PrefetchReport

__all__ = ["CacheSpec", "choose_cache", "is_remote", "prefetch"]

CacheSpec = bool | str | os.PathLike[str] | DiskCache | None
"""``None``: the default (a cache for remote banks only); ``False``: none; ``True``: the
default directory even for a local bank; a path: that directory; a :class:`DiskCache`: that one."""


def is_remote(storage: Storage) -> bool:
    """Whether ``storage`` keeps its bytes across a network (its ``properties.remote``), not in local files or memory.

    Example:
        >>> from weightbank.storage import MemoryStorage
        >>> is_remote(MemoryStorage())
        False
    """
    return storage.properties.remote


def choose_cache(storage: Storage, cache: CacheSpec, size: int | str | None = None) -> DiskCache | None:
    """The disk cache a bank on ``storage`` uses (None: it reads storage directly).

    ``size`` caps a cache made here (default ``$WEIGHTBANK_CACHE_SIZE`` or 20 GiB;
    0 means no cache) and resizes a given :class:`DiskCache`.

    Example:
        >>> import tempfile
        >>> from weightbank.storage import MemoryStorage
        >>> choose_cache(MemoryStorage(), tempfile.mkdtemp(), "1GiB").max_bytes
        1073741824
    """
    if isinstance(cache, DiskCache):
        if size is not None:
            cache.resize(size)
        return cache
    if cache is False or (cache is None and not is_remote(storage)):
        return None
    cap = default_max_bytes() if size is None else parse_bytes(size)
    if cap == 0:
        return None
    root = default_root() if cache is None or cache is True else cache
    return DiskCache(root, cap)


def prefetch(
    storage: Storage,
    cache: DiskCache | None,
    cid: str,
    manifest: Manifest,
    indices: Sequence[int],
    pool: ThreadPoolExecutor,
) -> PrefetchReport:
    """Fetch and verify the chunks of ``manifest``'s tensors at ``indices`` into ``cache`` (see ``Bank.prefetch``).

    Example:
        >>> import tempfile, torch, weightbank as wb
        >>> bank = wb.open("memory://", cache=tempfile.mkdtemp()); cid = bank.save({"w": torch.ones(2)}).id
        >>> bank.prefetch(cid).fetched_bytes
        8
    """
    if cache is None:
        return PrefetchReport(cid, 0, 0, 0, enabled=False)
    chunks = {manifest.chunks[c].hash for i in indices for c in manifest.tensors[i].chunks}
    fetched, cached, dropped = prefetch_chunks(storage, cache, cid, manifest, indices, pool)
    return PrefetchReport(cid, len(chunks), fetched, cached, dropped)
