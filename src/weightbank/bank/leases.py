"""Leases: how a save in flight tells ``gc`` to keep its data.

A save writes ``leases/<save-id>.json`` before it looks for reusable chunks
and deletes it after its manifest is committed. ``gc`` keeps every pack whose
save still holds a live lease, and the data of every manifest deleted after the
oldest live lease began (the save may have chosen to reuse those chunks). A
lease is stale — and ignored — when its process is gone (same host, pid no
longer alive) or it is older than ``ttl`` seconds (a save on another machine
that died).

Example:
    >>> from weightbank.storage import open_storage
    >>> from weightbank.bank import leases
    >>> s = open_storage("memory://")
    >>> leases.acquire(s, "abc"); [l.save_id for l in leases.live(s, ttl=60)]
    ['abc']
"""

from __future__ import annotations

import json
import os
import socket
import time
from dataclasses import dataclass

from .._process import pid_alive
from ..errors import WeightbankError
from ..storage.base import Storage
from .layout import LEASES, lease_key

__all__ = ["DEFAULT_TTL", "Lease", "acquire", "all_leases", "live", "release"]

#: A lease older than this (seconds) is presumed dead even if its process cannot be checked.
DEFAULT_TTL = 24 * 3600.0


@dataclass(frozen=True)
class Lease:
    save_id: str
    host: str
    pid: int
    started: float
    key: str

    def stale(self, now: float, ttl: float) -> bool:
        if now - self.started > ttl:
            return True
        if self.host == socket.gethostname():
            return not pid_alive(self.pid)
        return False


def acquire(storage: Storage, save_id: str) -> None:
    body = {"save": save_id, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    storage.write(lease_key(save_id), json.dumps(body).encode())


def release(storage: Storage, save_id: str) -> None:
    storage.delete(lease_key(save_id))


def all_leases(storage: Storage) -> list[Lease]:
    out = []
    for info in storage.list(LEASES):
        try:
            obj = json.loads(storage.read(info.key))
            out.append(
                Lease(
                    save_id=str(obj["save"]),
                    host=str(obj["host"]),
                    pid=int(obj["pid"]),
                    started=float(obj["started"]),
                    key=info.key,
                )
            )
        except (WeightbankError, ValueError, KeyError, TypeError):
            # Unreadable lease (torn by a crash on a non-atomic store): treat as
            # live until it ages out, using the object's own time.
            out.append(Lease(save_id="?", host="?", pid=-1, started=info.mtime, key=info.key))
    return out


def live(storage: Storage, ttl: float = DEFAULT_TTL) -> list[Lease]:
    now = time.time()
    return [lease for lease in all_leases(storage) if not lease.stale(now, ttl)]
