"""Removing index pages no root names any more (``gc`` calls this).

A compaction rewrites only the pages it touches; the ones it replaced stay
until no kept root names them and they are older than gc's grace period (a
reader that read a root just before it was replaced still finds its pages).
With any root unreadable nothing is removed: its pages cannot be known.

Example:
    >>> from weightbank.storage import open_storage
    >>> sweep_pages(open_storage("memory://"), older_than=0.0)
    0
"""

from __future__ import annotations

import time

from ...errors import IndexDamaged, MissingObject
from ...storage.base import Storage
from ..layout import INDEX_PAGES
from .pages import chunk_dir, chunk_filters, id_dir, run_index
from .store import read_root
from .view import PageCache, list_gens

__all__ = ["referenced_pages", "sweep_pages"]


def referenced_pages(storage: Storage, cache: PageCache | None = None) -> set[str]:
    """Every page a kept root names, directly or through a directory page. IndexDamaged if one is unreadable."""
    cache = cache or PageCache(storage, limit=64)
    out: set[str] = set()
    for gen in list_gens(storage):
        root = read_root(storage, gen)
        if root is None:
            continue
        for _, key, _ in root.runs.values():
            out.add(key)
            out.update(p.key for p in run_index(cache.get(key), key))
        if root.ids is not None:
            out.add(root.ids)
            out.update(k for _, k, _ in id_dir(cache.get(root.ids), root.ids))
        if root.chunks is not None:
            out.add(root.chunks)
            out.update(k for k, _ in chunk_dir(cache.get(root.chunks), root.chunks).values())
            out.update(chunk_filters(cache.get(root.chunks), root.chunks).values())
        if root.recent is not None:
            out.add(root.recent)
    return out


#: Pages younger than this are kept whatever gc's grace: a compaction writes its pages before the
#: root that names them, and gc(grace=0) must not take them in between.
PAGE_GRACE = 3600.0


def sweep_pages(storage: Storage, older_than: float) -> int:
    """Delete pages no root names whose mtime is before ``older_than`` (epoch seconds) and older than
    :data:`PAGE_GRACE`; how many went."""
    older_than = min(older_than, time.time() - PAGE_GRACE)
    try:
        keep = referenced_pages(storage)
    except (IndexDamaged, MissingObject):
        return 0  # a root or directory we cannot read may name any page: keep them all
    n = 0
    for info in storage.list(INDEX_PAGES):
        if info.key not in keep and info.mtime < older_than:
            storage.delete(info.key)
            n += 1
    return n
