"""Release records: the packs a repack moved every chunk out of, kept while someone may still read them.

A repack copies the live chunks of partly dead packs into new packs and
rewrites the location heads of the manifests that used them; the ids stay.
A process that read a manifest before that rewrite still holds the old
locations: a load in progress, a save that chose to reuse a chunk there. So
the old packs are not freed the moment no manifest names them: the repack
writes ``released/<repack-id>.json`` first (no time: everything listed is
kept), rewrites the manifests, then stamps the record with the time. ``gc``
keeps a released pack while its record has no time, or was stamped after the
oldest live lease began or within the grace period — the rule trash entries
follow, for the same reason. After that a released pack is an ordinary
unreferenced pack (still kept if a manifest names it: a save that reused one
of its chunks before the rewrite), and the record is dropped.

A record left without a time by a repack that died is stamped by ``gc`` once
the repack's lease is gone (its manifests are then as they will stay).

Example:
    >>> from weightbank.storage import open_storage
    >>> s = open_storage("memory://")
    >>> begin(s, "r1", ["packs/ab/ab1-0.pack"]); [(r.repack, r.released_at) for r in read_all(s)]
    [('r1', None)]
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from ..errors import MissingObject, WeightbankError
from ..format.schema import finite, typed
from ..format.sealed import seal, unseal
from ..storage.base import Storage
from .layout import RELEASED, is_pack_key, release_key

__all__ = ["Release", "begin", "read_all", "stamp"]


@dataclass(frozen=True)
class Release:
    repack: str
    packs: tuple[str, ...]
    released_at: float | None  # None: the repack may still be rewriting manifests
    key: str
    problem: str = ""  # why the stored record could not be read (then ``packs`` is empty)


def begin(storage: Storage, repack: str, packs: Sequence[str]) -> None:
    """Record ``packs`` as being released by ``repack`` (before any manifest stops naming them)."""
    storage.write(release_key(repack), seal({"repack": repack, "packs": list(packs), "released_at": None}))


def stamp(storage: Storage, repack: str, packs: Sequence[str], when: float | None = None) -> None:
    """Give the record its time: every manifest the repack rewrote is written by now."""
    at = time.time() if when is None else when
    storage.write(release_key(repack), seal({"repack": repack, "packs": list(packs), "released_at": at}))


def read_all(storage: Storage) -> list[Release]:
    """Every release record; a damaged one is listed with its ``problem``."""
    out = []
    for info in storage.list(RELEASED):
        named = info.key[len(RELEASED) :].removesuffix(".json")
        try:
            body = unseal(storage.read(info.key), info.key, (), "release record").body
            if body.get("repack") != named:
                raise ValueError("the record names another repack")
            packs = tuple(typed(p, str, "pack") for p in typed(body["packs"], list, "packs"))
            if not all(map(is_pack_key, packs)):
                raise ValueError("the record names something that is not a pack")
            when = body.get("released_at")
            out.append(Release(named, packs, None if when is None else finite(when, "released_at"), info.key))
        except MissingObject:
            continue
        except (WeightbankError, ValueError, KeyError, TypeError) as e:
            out.append(Release(named, (), None, info.key, problem=f"release record is unreadable ({e})"))
    return out
