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
the repack's lease is gone (its manifests are then as they will stay). While
a record protects its old packs it protects what the repack wrote too (its
packs and segments are named by the repack's id): a save may have read a
rewritten head before the repack finished.

A delete and a repack of the same checkpoint can cross. The delete writes
its trash entry, then reads the manifest again and adds what a new head names
(``also`` in the entry); the repack writes the new head, then looks for a
trash entry and, if there is one, notes the new head's keys as ``held`` in
its record and removes the manifest again (finishing the delete, which its
write may have undone). Each side writes before it reads the other's write,
so at least one of them sees the other: whatever locations a save can have
read stay protected for as long as the trash entry protects the checkpoint.

Example:
    >>> from weightbank.storage import open_storage
    >>> s = open_storage("memory://")
    >>> _ = begin(s, "r1", ["packs/ab/ab1-0.pack"]); [(r.repack, r.released_at) for r in read_all(s)]
    [('r1', None)]
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from ..errors import MissingObject, WeightbankError
from ..format.schema import finite, hex_digest, typed
from ..format.sealed import seal, unseal
from ..storage.base import Storage
from .layout import RELEASED, is_pack_key, is_segment_key, release_key

__all__ = ["Release", "begin", "read_all", "stamp"]


@dataclass(frozen=True)
class Release:
    """One release record: what a repack moved out of, and what it must keep for deletes it crossed.

    ``packs`` / ``segments``: the packs it moved chunks out of and the
    location segments its rewritten heads no longer name. ``held``: for a
    checkpoint deleted while the repack rewrote it, the packs and segments
    its new head named (a save may have read that head): kept as long as the
    checkpoint's trash entry protects its data.
    """

    repack: str
    packs: tuple[str, ...]
    released_at: float | None  # None: the repack may still be rewriting manifests
    key: str
    segments: tuple[str, ...] = ()
    held: dict[str, tuple[str, ...]] = field(default_factory=dict)
    problem: str = ""  # why the stored record could not be read (then ``packs`` is empty)

    def to_bytes(self) -> bytes:
        return seal(
            {
                "repack": self.repack,
                "packs": list(self.packs),
                "segments": list(self.segments),
                "held": {cid: list(keys) for cid, keys in sorted(self.held.items())},
                "released_at": self.released_at,
            }
        )

    def write(self, storage: Storage) -> None:
        storage.write(self.key, self.to_bytes())


def begin(storage: Storage, repack: str, packs: Sequence[str], segments: Sequence[str] = ()) -> Release:
    """Record ``packs`` (and ``segments``) as being released by ``repack``, before any manifest stops naming them."""
    rel = Release(repack, tuple(packs), None, release_key(repack), tuple(segments))
    rel.write(storage)
    return rel


def stamp(storage: Storage, rel: Release, when: float | None = None) -> Release:
    """Give the record its time: every manifest the repack rewrote is written by now."""
    done = replace(rel, released_at=time.time() if when is None else when)
    done.write(storage)
    return done


def _keys(obj: object, what: str) -> tuple[str, ...]:
    keys = tuple(typed(k, str, what) for k in typed(obj, list, what))
    if not all(is_pack_key(k) or is_segment_key(k) for k in keys):
        raise ValueError(f"the record names something that is neither a pack nor a segment ({what})")
    return keys


def read_all(storage: Storage) -> list[Release]:
    """Every release record; a damaged one is listed with its ``problem``."""
    out = []
    for info in storage.list(RELEASED):
        named = info.key[len(RELEASED) :].removesuffix(".json")
        try:
            body = unseal(storage.read(info.key), info.key, (), "release record").body
            if body.get("repack") != named:
                raise ValueError("the record names another repack")
            packs = _keys(body["packs"], "packs")
            if not all(map(is_pack_key, packs)):
                raise ValueError("the record names something that is not a pack")
            held = {
                hex_digest(cid, "held checkpoint"): _keys(keys, "held")
                for cid, keys in typed(body.get("held", {}), dict, "held").items()
            }
            when = body.get("released_at")
            out.append(
                Release(
                    named,
                    packs,
                    None if when is None else finite(when, "released_at"),
                    info.key,
                    _keys(body.get("segments", []), "segments"),
                    held,
                )
            )
        except MissingObject:
            continue
        except (WeightbankError, ValueError, KeyError, TypeError) as e:
            out.append(Release(named, (), None, info.key, problem=f"release record is unreadable ({e})"))
    return out
