"""Exclusive bank-wide locks made of one ref (``refs/locks/<name>.json``): one holder at a time.

A lock is created put-if-absent, so of two processes taking it at once
exactly one gets it. A lock whose holder is gone (a dead process on this
host, or older than ``ttl`` seconds) is taken over by compare-and-swap
against the stale value, so two processes breaking the same stale lock
still end with one holder. Only maintenance that must not run twice at once
uses one (``repack``: two repacks could each move a manifest's chunks while
a save reuses them).

Example:
    >>> from weightbank.storage import open_storage
    >>> s = open_storage("memory://")
    >>> with hold(s, "repack", "r1"):
    ...     try:
    ...         with hold(s, "repack", "r2"): pass
    ...     except ConcurrentUpdate as e: print("r1" in str(e))
    True
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
import time
from collections.abc import Iterator

from .._process import pid_alive
from ..errors import ConcurrentUpdate, WeightbankError
from ..format.schema import finite, typed
from ..format.sealed import seal, unseal
from ..storage.base import Storage
from .layout import lock_key

__all__ = ["DEFAULT_TTL", "hold"]

#: A lock older than this (seconds) is presumed dead even if its process cannot be checked.
DEFAULT_TTL = 24 * 3600.0


#: Holders this process holds a lock for right now (a lock of this process naming another holder
#: is left over from a block whose release failed: stale).
_ACTIVE: set[str] = set()
_ACTIVE_LOCK = threading.Lock()


def _stale(body: dict[str, object], now: float, ttl: float) -> bool:
    started = finite(body["started"], "started")
    if now - started > ttl:
        return True
    if typed(body["host"], str, "host") != socket.gethostname():
        return False
    pid = typed(body["pid"], int, "pid")
    if pid == os.getpid():
        with _ACTIVE_LOCK:
            return typed(body["holder"], str, "holder") not in _ACTIVE
    return not pid_alive(pid)


@contextlib.contextmanager
def hold(storage: Storage, name: str, holder: str, *, ttl: float = DEFAULT_TTL) -> Iterator[None]:
    """Hold lock ``name`` for ``holder`` inside the block; ConcurrentUpdate if someone else holds it."""
    key = lock_key(name)
    body = {"holder": holder, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    data = seal(body)
    try:
        storage.put_ref(key, data, None)
    except ConcurrentUpdate:
        current = storage.get_ref(key)
        if current is None:
            storage.put_ref(key, data, None)  # released meanwhile: one more try (ConcurrentUpdate if lost)
        else:
            try:
                other = unseal(current.data, key, (), "lock").body
                stale = _stale(other, time.time(), ttl)
                who = f"{typed(other['holder'], str, 'holder')} (pid {other['pid']} on {other['host']})"
            except (WeightbankError, ValueError, KeyError, TypeError):
                stale, who = True, "an unreadable lock"  # a damaged lock protects nothing: take it over
            if not stale:
                raise ConcurrentUpdate(
                    key,
                    f"the {name} lock is held by {who}: wait for it, or remove {key} if that process is gone",
                ) from None
            storage.put_ref(key, data, current.token)  # ConcurrentUpdate if another breaker was first
    with _ACTIVE_LOCK:
        _ACTIVE.add(holder)
    try:
        yield
    except BaseException:
        with contextlib.suppress(Exception):
            _release(storage, key, data)
        raise
    else:
        _release(storage, key, data)  # a failure here is the caller's to see (the lock is stale for the next)
    finally:
        with _ACTIVE_LOCK:
            _ACTIVE.discard(holder)


def _release(storage: Storage, key: str, data: bytes) -> None:
    mine = storage.get_ref(key)
    if mine is not None and mine.data == data:
        storage.delete(key)
