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

import os
import socket
import time
import uuid
from dataclasses import dataclass

from .._process import pid_alive
from ..errors import MissingObject, WeightbankError
from ..format.schema import finite, typed
from ..format.sealed import seal, unseal
from ..storage.base import Storage
from .layout import LEASES, lease_key

__all__ = ["DEFAULT_TTL", "Lease", "acquire", "all_leases", "live", "new_id", "release"]

#: A lease older than this (seconds) is presumed dead even if its process cannot be checked.
DEFAULT_TTL = 24 * 3600.0


@dataclass(frozen=True)
class Lease:
    save_id: str
    host: str
    pid: int
    started: float
    key: str
    problem: str = ""  # why the stored lease could not be read (it then counts as live until it ages out)

    def stale(self, now: float, ttl: float) -> bool:
        if now - self.started > ttl:
            return True
        if self.host == socket.gethostname():
            return not pid_alive(self.pid)
        return False


_LEGACY_KEYS = ("save", "host", "pid", "started")


def new_id() -> str:
    """A fresh save id (hex seconds, then randomness): what names a save's lease, packs and segments."""
    return f"{int(time.time()):x}{uuid.uuid4().hex[:20]}"


def acquire(storage: Storage, save_id: str) -> None:
    body = {"save": save_id, "host": socket.gethostname(), "pid": os.getpid(), "started": time.time()}
    storage.write(lease_key(save_id), seal(body))


def release(storage: Storage, save_id: str) -> None:
    storage.delete(lease_key(save_id))


def all_leases(storage: Storage) -> list[Lease]:
    out = []
    for info in storage.list(LEASES):
        # The key names the save too: a damaged lease still protects that save's packs.
        named = info.key[len(LEASES) :].removesuffix(".json")
        try:
            obj = unseal(storage.read(info.key), info.key, _LEGACY_KEYS, "lease").body
            if obj.get("save") != named:
                raise ValueError(f"lease {info.key} names another save")
            out.append(
                Lease(
                    save_id=named,
                    host=typed(obj["host"], str, "host"),
                    pid=typed(obj["pid"], int, "pid"),
                    started=finite(obj["started"], "started"),
                    key=info.key,
                )
            )
        except MissingObject:
            continue  # released between the listing and the read
        except (WeightbankError, ValueError, KeyError, TypeError) as e:
            # Unreadable lease (damaged, or torn on a non-atomic store): treat it as
            # live until it ages out, using the object's own time.
            problem = f"lease is unreadable ({e}); it protects everything until it ages out"
            out.append(Lease(named, host="?", pid=-1, started=info.mtime, key=info.key, problem=problem))
    return out


def live(storage: Storage, ttl: float = DEFAULT_TTL) -> list[Lease]:
    now = time.time()
    return [lease for lease in all_leases(storage) if not lease.stale(now, ttl)]
