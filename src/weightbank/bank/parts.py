"""Two-phase saves: several processes write parts, one process commits the checkpoint.

A *part* is what one process wrote for a checkpoint: its chunks are durable in
packs, and a lease (``leases/<save-id>.json``, naming that process) keeps
``gc`` away from them. A part is a small JSON document — tensor records
(whole tensors, or shards: boxes of a bigger tensor), their chunk records and
the keys of the packs holding them — so it can travel to the committing
process any way the job likes (a ``torch.distributed`` gather, a queue, a
file).

Committing merges the parts into one manifest and writes it: that is the
commit point, exactly as for a single-process save. Then every part's lease
is released. Nothing is visible before the commit, and a part whose process
died before it is never committed: its lease goes stale and ``gc`` frees its
packs.

A commit trusts no part (it may have come a long way): each is checked
(:mod:`.part_checks`), the manifest they make is parsed exactly as every
reader will parse it before it is written, and every pack they point at —
their own and the older ones whose chunks they reused — must still exist.
Nothing is written unless all of that holds. A manifest write that reports
failure may still have landed, so packs are never deleted after it.

Pieces of one tensor from several parts must tile it exactly (DCP's planner
guarantees this for DTensor / FSDP2 state dicts); a tensor that arrives as
one piece covering all of it is stored as an ordinary tensor, so a sharded
manifest (format 2) is written only when some tensor really is in pieces.

Example:
    >>> import torch, weightbank as wb
    >>> bank = wb.open("memory://")
    >>> w = torch.arange(8.0).reshape(4, 2)
    >>> p0 = bank.save_part({"w": wb.TensorShard(w[:2], offsets=(0, 0), shape=(4, 2))})
    >>> p1 = bank.save_part({"w": wb.TensorShard(w[2:], offsets=(2, 0), shape=(4, 2))})
    >>> info = bank.commit([p0, wb.SavePart.from_json(p1.to_json())], run="r", step=1)
    >>> torch.equal(bank.load(info.id)["w"], w)
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..errors import CorruptObject, InvalidState, MissingObject, UnsupportedFormat
from ..format.chunking import DEFAULT_CHUNK_SIZE
from ..format.dtypes import dtype_from_name
from ..format.hashing import digest
from ..format.manifest import (
    FORMAT_VERSION,
    SHARDED_FORMAT,
    ChunkRecord,
    Manifest,
    ShardRecord,
    TensorRecord,
    check_tiling,
)
from ..format.schema import LossySums, int_tuple, typed
from ..format.stored import Draft, encode, open_object, seal_segment
from ..format.tree import TensorRef, flatten_refs, map_tensors
from ..storage.base import Storage
from . import leases
from .catalog import Catalog
from .layout import manifest_key, save_id_from_pack, segment_key
from .part_checks import part_problem
from .pieces import Piece, TensorShard, pieces_of
from .results import SaveStats

__all__ = [
    "Merged",
    "PartTensor",
    "Piece",
    "SavePart",
    "TensorRef",
    "TensorShard",
    "abandon_part",
    "commit_parts",
    "load_parts",
    "mark_numpy",
    "merge_parts",
    "pieces_of",
    "publish",
    "require_packs",
]


@dataclass(frozen=True)
class PartTensor:
    """A tensor (or one shard of it) in a part: its chunks index the part's chunk table."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...] = ()
    offsets: tuple[int, ...] | None = None
    whole: tuple[int, ...] | None = None
    alias_of: str | None = None
    numpy: bool = False

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        out["chunks"] = list(self.chunks)
        if self.offsets is not None and self.whole is not None:
            out["offsets"], out["whole"] = list(self.offsets), list(self.whole)
        if self.alias_of is not None:
            out["alias_of"] = self.alias_of
        if self.numpy:
            out["numpy"] = True
        return out


@dataclass(frozen=True)
class SavePart:
    """What one process wrote for a checkpoint not committed yet (see the module docstring).

    ``to_json()`` gives a JSON-safe dict; :meth:`from_json` reads it back in
    the committing process. ``stats`` counts what this part wrote and reused.

    Example:
        >>> import torch, weightbank as wb
        >>> part = wb.open("memory://").save_part({"b": torch.ones(3)})
        >>> [t.name for t in wb.SavePart.from_json(part.to_json()).tensors]
        ['b']
    """

    save_id: str
    chunk_size: int
    packs: tuple[str, ...]
    chunks: tuple[ChunkRecord, ...]
    tensors: tuple[PartTensor, ...]
    lossy: dict[str, LossySums] = field(default_factory=dict)
    stats: SaveStats = field(default_factory=lambda: SaveStats(0, 0, 0, 0, 0, 0.0))
    #: Manifest segments (hash → key) of checkpoints this part's save read after its lease began:
    #: the commit names them instead of writing them again. Not in ``to_json``: a part read back
    #: proves nothing about them, and its commit writes every segment.
    segments: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    def own_packs(self) -> list[str]:
        """The packs this part wrote (the others hold chunks it reused)."""
        return [p for p in self.packs if save_id_from_pack(p) == self.save_id]

    def to_json(self) -> dict[str, Any]:
        s = self.stats
        return {
            "save": self.save_id,
            "chunk_size": self.chunk_size,
            "packs": list(self.packs),
            "chunks": [c.to_json() for c in self.chunks],
            "tensors": [t.to_json() for t in self.tensors],
            "lossy": {name: sums.to_json() for name, sums in self.lossy.items()},
            "stats": [
                s.written_bytes,
                s.reused_bytes,
                s.new_chunks,
                s.reused_chunks,
                s.packs,
                s.seconds,
                s.per_codec,
            ],
        }

    @classmethod
    def from_json(cls, obj: Any) -> SavePart:
        """Read a part back, checked as :meth:`check` does (CorruptObject if it is malformed).

        Example:
            >>> import torch, weightbank as wb
            >>> part = wb.open("memory://").save_part({"b": torch.ones(3)})
            >>> wb.SavePart.from_json(part.to_json()) == part
            True
        """
        try:
            packs = tuple(typed(p, str) for p in typed(obj["packs"], list))
            try:
                probe = Manifest.from_json(
                    {"format": SHARDED_FORMAT, "run": "", "created": 0.0, "tree": {"d": []}, "tensors": [],
                     "chunk_size": obj["chunk_size"], "packs": list(packs), "chunks": obj["chunks"]},
                    "<save part>",
                )  # fmt: skip
            except CorruptObject as e:
                raise CorruptObject("<save part>", detail=f"malformed part ({e.detail})") from None
            tensors = []
            for t in typed(obj["tensors"], list):
                has_box = "offsets" in typed(t, dict)
                tensors.append(
                    PartTensor(
                        name=typed(t["name"], str),
                        dtype=typed(t["dtype"], str),
                        shape=int_tuple(t["shape"]),
                        chunks=int_tuple(t["chunks"]),
                        offsets=int_tuple(t["offsets"]) if has_box else None,
                        whole=int_tuple(t["whole"]) if has_box else None,
                        alias_of=None if t.get("alias_of") is None else typed(t["alias_of"], str),
                        numpy=bool(t.get("numpy", False)),
                    )
                )
            *counts, sec, per = typed(obj["stats"], list)
            w, r, nc, rc, np_ = (typed(n, int) for n in counts)
            per = {typed(k, str): typed(v, int) for k, v in typed(per, dict).items()}
            stats = SaveStats(w, r, nc, rc, np_, float(typed(sec, (int, float))), 0, per)
            part = cls(
                save_id=typed(obj["save"], str),
                chunk_size=probe.chunk_size,
                packs=packs,
                chunks=probe.chunks,
                tensors=tuple(tensors),
                lossy={
                    typed(k, str): LossySums.from_json(v)
                    for k, v in typed(obj.get("lossy", {}), dict).items()
                },
                stats=stats,
            )
        except (KeyError, TypeError, ValueError, IndexError, AttributeError, OverflowError) as e:
            raise CorruptObject("<save part>", detail=f"malformed part ({type(e).__name__}: {e})") from None
        part.check()
        return part

    def check(self) -> None:
        """CorruptObject unless every record is consistent: the part makes a manifest a load can read.

        Pack keys are pack keys, chunk indices point into the chunk table,
        every dtype is one this torch build has, boxes lie inside their
        tensors, and each tensor's (or box's) chunks add up to its bytes.

        Example:
            >>> import torch, weightbank as wb
            >>> wb.open("memory://").save_part({"b": torch.ones(3)}).check()  # consistent: nothing raised
        """
        problem = part_problem(self)
        if problem is not None:
            raise CorruptObject("<save part>", detail=f"malformed part {self.save_id!r}: {problem}")


def abandon_part(storage: Storage, part: SavePart) -> None:
    """Delete a part that will never be committed: its own packs, then its lease."""
    for key in part.own_packs():
        with contextlib.suppress(Exception):
            storage.delete(key)
    with contextlib.suppress(Exception):
        leases.release(storage, part.save_id)


class _Merger:
    """The chunk and pack tables of the manifest being built from parts."""

    def __init__(self) -> None:
        self.packs: dict[str, int] = {}
        self.chunks: list[ChunkRecord] = []
        self.by_hash: dict[str, int] = {}

    def add_part(self, part: SavePart) -> list[int]:
        """Merge ``part``'s chunk table; return its chunk indices in the merged table."""
        out = []
        for rec in part.chunks:
            idx = self.by_hash.get(rec.hash)
            if idx is None:  # identical bytes from several parts are listed once
                pidx = self.packs.setdefault(part.packs[rec.pack], len(self.packs))
                idx = self.by_hash[rec.hash] = len(self.chunks)
                self.chunks.append(
                    ChunkRecord(rec.hash, rec.raw_len, rec.codec, pidx, rec.offset, rec.stored_len, rec.args)
                )
            out.append(idx)
        return out


def _place(
    name: str, found: list[tuple[PartTensor, tuple[int, ...]]], placed: dict[str, tuple[int, TensorRecord]]
) -> TensorRecord:
    """The record of tensor ``name`` from its pieces (chunk indices merged); ``placed``: name -> (index, record)."""
    first, chunks = found[0]
    if first.offsets is None:
        for t, idx in found[1:]:
            # A replicated tensor written by several parts: the same bytes (chunks are merged by hash).
            if (t.offsets, t.alias_of, t.dtype, t.shape, idx) != (
                None,
                first.alias_of,
                first.dtype,
                first.shape,
                chunks,
            ):
                raise InvalidState(name, "several parts hold this whole tensor with different contents")
        if first.alias_of is None:
            return TensorRecord(name, first.dtype, first.shape, chunks, numpy=first.numpy)
        alias, target = placed.get(first.alias_of, (None, None))
        if alias is None or target is None:
            raise InvalidState(name, f"it shares memory with {first.alias_of!r}, which must be placed first")
        if (
            target.shards
            or target.alias_of is not None
            or (target.dtype, target.shape) != (first.dtype, first.shape)
        ):
            raise InvalidState(
                name,
                f"it shares memory with {first.alias_of!r}, which is not a whole tensor of its dtype and shape",
            )
        return TensorRecord(name, first.dtype, first.shape, alias_of=alias, numpy=first.numpy)
    whole = first.whole or ()
    shards: dict[tuple[int, ...], ShardRecord] = {}
    for t, idx in found:
        if t.offsets is None or t.whole != whole or t.dtype != first.dtype:
            raise InvalidState(
                name, "its pieces disagree on the tensor's shape or dtype, or mix whole and shards"
            )
        if 0 in t.shape:
            continue  # an empty box (a rank with no rows of an unevenly sharded tensor) holds nothing
        prev = shards.get(t.offsets)
        if prev is not None:
            if prev.shape != t.shape:
                raise InvalidState(name, f"two pieces start at {list(t.offsets)} with different shapes")
            # The same box from two parts (a replicated piece) is kept once, so it must hold the same
            # bytes: chunks are merged by hash, so equal bytes have equal chunk indices.
            if prev.chunks != idx:
                raise InvalidState(
                    name, f"several parts hold its box at {list(t.offsets)} with different contents"
                )
            continue
        shards[t.offsets] = ShardRecord(t.offsets, t.shape, idx)
    boxes = tuple(sorted(shards.values(), key=lambda s: s.offsets))
    if not boxes and 0 in whole:
        return TensorRecord(name, first.dtype, whole)
    if len(boxes) == 1 and boxes[0].shape == whole and not any(boxes[0].offsets):
        return TensorRecord(name, first.dtype, whole, boxes[0].chunks)
    try:
        check_tiling(name, whole, boxes)
    except ValueError as e:
        raise InvalidState(name, f"its pieces do not tile the tensor {list(whole)}: {e}") from None
    return TensorRecord.sharded(name, first.dtype, whole, boxes)


@dataclass(frozen=True)
class Merged:
    """A manifest built from parts, checked, not written yet: its id, the record and its bytes.

    A format-3 manifest comes as a ``draft`` (``data`` is then empty): its
    stored object names where its segments are, which :func:`publish` decides.
    """

    cid: str
    manifest: Manifest
    data: bytes
    draft: Draft | None = None
    segment_bytes: int = 0  # what storing its segments wrote


def merge_parts(
    parts: Sequence[SavePart],
    *,
    header: dict[str, Any],
    state: object = None,
    tree: tuple[dict[str, Any], list[str]] | None = None,
    compact: bool = False,
) -> Merged:
    """Merge ``parts`` into one manifest, checked as a reader will check it; nothing is written.

    ``compact``: a format-3 manifest (what a bank of layout 3 writes: id over
    the content alone, see :mod:`weightbank.format.stored`); else format 1/2.
    ``state`` / ``tree``: as for :func:`commit_parts`. InvalidState if the
    parts do not fit together (or the manifest they make would not load),
    CorruptObject if a part is malformed.
    """
    for part in parts:
        part.check()
    chunk_sizes = {p.chunk_size for p in parts}
    if len(chunk_sizes) > 1:
        raise InvalidState("<parts>", f"parts were written with different chunk sizes {sorted(chunk_sizes)}")
    merged = _Merger()
    pieces: dict[str, list[tuple[PartTensor, tuple[int, ...]]]] = {}
    lossy: dict[str, LossySums] = {}
    for part in parts:
        remap = merged.add_part(part)
        for t in part.tensors:
            pieces.setdefault(t.name, []).append((t, tuple(remap[c] for c in t.chunks)))
        for name, sums in part.lossy.items():
            lossy[name] = lossy[name] + sums if name in lossy else sums
    if tree is not None:
        spec, names = tree
    else:
        spec, names = flatten_refs({name: TensorRef(name) for name in pieces} if state is None else state)
    spec = mark_numpy(spec, {i for i, n in enumerate(names) if n in pieces and pieces[n][0][0].numpy})
    in_state = set(names)
    unplaced = [n for n in pieces if n not in in_state]
    unknown = [n for n in names if n not in pieces]
    if unplaced or unknown:
        raise InvalidState(
            "<parts>",
            (f"tensors of the parts not placed in the state: {unplaced[:8]}; " if unplaced else "")
            + (f"state names tensors no part holds: {unknown[:8]}" if unknown else ""),
        )
    placed: dict[str, tuple[int, TensorRecord]] = {}
    tensors: list[TensorRecord] = []
    for name in names:
        rec = _place(name, pieces[name], placed)
        placed[name] = (len(tensors), rec)
        tensors.append(rec)
    manifest = Manifest(
        tree=spec,
        tensors=tuple(tensors),
        chunk_size=chunk_sizes.pop() if chunk_sizes else DEFAULT_CHUNK_SIZE,
        packs=tuple(merged.packs),
        chunks=tuple(merged.chunks),
        lossy={name: sums.summary() for name, sums in lossy.items()},
        format=SHARDED_FORMAT if any(t.shards for t in tensors) else FORMAT_VERSION,
        **header,
    )
    draft = encode(manifest) if compact else None
    data = b"" if draft is not None else manifest.to_bytes()
    cid = draft.cid if draft is not None else digest(data)
    try:
        # Every reader (log, load, gc) parses the manifest like this: one it would refuse must never be
        # written, or it would stop gc and log for the whole bank.
        if draft is not None:
            probe = open_object(draft.object({h: h for h in draft.segments}), manifest_key(cid), cid)
            check = probe.manifest(draft.segments)
        else:
            check = Manifest.from_bytes(data, manifest_key(cid))
        for rec in check.tensors:
            dtype_from_name(rec.dtype)
    except (CorruptObject, UnsupportedFormat) as e:
        raise InvalidState("<parts>", f"the parts make a manifest no reader would accept: {e}") from None
    if draft is not None:
        return Merged(cid, draft.manifest, b"", draft)
    return Merged(cid, manifest, data)


def require_packs(storage: Storage, packs: Sequence[str], pool: Executor | None = None) -> None:
    """MissingObject unless every pack in ``packs`` exists (checked in parallel, on ``pool`` if given).

    Example:
        >>> from weightbank.storage import open_storage
        >>> from weightbank.bank.parts import require_packs
        >>> require_packs(open_storage("memory://"), [])  # nothing to check: nothing raised
    """
    keys = list(dict.fromkeys(packs))
    if not keys:
        return
    if pool is None and len(keys) > 1:
        with ThreadPoolExecutor(max_workers=min(8, len(keys)), thread_name_prefix="wb-check") as own:
            found = list(own.map(storage.exists, keys))
    elif pool is None:
        found = [storage.exists(keys[0])]
    else:
        found = list(pool.map(storage.exists, keys))
    missing = [k for k, ok in zip(keys, found, strict=True) if not ok]
    if missing:
        raise MissingObject(
            missing[0],
            f"{len(missing)} pack(s) the parts need are gone (was a part's process dead long enough "
            "for gc to free its packs, or the checkpoints whose chunks it reused?)",
        )


def _place_segments(storage: Storage, parts: Sequence[SavePart], merged: Merged, writer: str) -> Merged:
    """A draft's segments stored under the lease ``writer`` (those a part's save proved present are
    named, not written again); the merged manifest with its stored bytes."""
    draft = merged.draft
    if draft is None:
        return merged
    known = {h: k for p in parts for h, k in p.segments.items()}
    keys = {h: known.get(h) or segment_key(writer, h) for h in draft.segments}
    todo = [(keys[h], seal_segment(text)) for h, text in draft.segments.items() if h not in known]
    # Named by a save holding a live lease until the manifest is written: gc keeps them.
    if len(todo) > 1:
        with ThreadPoolExecutor(max_workers=min(8, len(todo)), thread_name_prefix="wb-seg") as pool:
            list(pool.map(lambda kv: storage.write(*kv), todo))
    else:
        for k, data in todo:
            storage.write(k, data)
    extra = sum(len(data) for _, data in todo)
    manifest = draft.placed(keys)
    return Merged(merged.cid, manifest, draft.object(keys), None, extra)


def publish(
    storage: Storage,
    catalog: Catalog,
    parts: Sequence[SavePart],
    merged: Merged,
    *,
    not_committed: Callable[[], None] | None = None,
    lease_held: bool = False,
) -> tuple[str, Manifest, SaveStats]:
    """Write the manifest — the commit point — then release the parts' leases; (id, manifest, stats).

    A write can report failure and still have landed (an object store's reply
    lost after the object was stored, retries used up): the manifest is then
    looked for, and if it is there the checkpoint exists and this returns as a
    success. Otherwise the error propagates with every lease held and every
    pack in place — never delete packs once their manifest may exist.

    ``lease_held``: this process holds the first part's lease (a one-process
    save), so a format-3 manifest's segments are written under it; otherwise
    (parts from other processes, whose leases may be stale) under a lease of
    the commit's own, held until the manifest is written.
    """
    catalog.writable()
    own = None if lease_held or merged.draft is None else leases.new_id()
    if own is not None:
        leases.acquire(storage, own)
    try:
        return _publish(storage, catalog, parts, merged, own or parts[0].save_id, not_committed)
    finally:
        if own is not None:
            with contextlib.suppress(Exception):
                leases.release(storage, own)


def _publish(
    storage: Storage,
    catalog: Catalog,
    parts: Sequence[SavePart],
    merged: Merged,
    writer: str,
    not_committed: Callable[[], None] | None,
) -> tuple[str, Manifest, SaveStats]:
    # The catalog's add entry goes first: a manifest never exists without one, and an entry
    # without its manifest counts for nothing (readers check), so a crash between is harmless.
    wrote = sorted({k for p in parts for k in p.own_packs()})
    try:
        merged = _place_segments(storage, parts, merged, writer)
        entry = catalog.intend(merged.cid, merged.manifest, [p.save_id for p in parts], wrote)
    except BaseException:
        if not_committed is not None:
            not_committed()  # no manifest was attempted: the caller may give the parts up
        raise
    stats = _sum_stats([p.stats for p in parts], len(merged.data) + merged.segment_bytes)
    key = manifest_key(merged.cid)
    try:
        storage.write(key, merged.data)
    except Exception:
        landed = False
        with contextlib.suppress(Exception):
            landed = storage.exists(key)  # named by its content: an object there is this checkpoint
        if not landed:
            raise
    for part in parts:
        with contextlib.suppress(Exception):
            leases.release(storage, part.save_id)
    catalog.add(merged.cid, merged.manifest, merged.data, entry)
    catalog.maybe_compact()
    return merged.cid, merged.manifest, stats


def commit_parts(
    storage: Storage,
    catalog: Catalog,
    parts: Sequence[SavePart],
    *,
    header: dict[str, Any],
    state: object = None,
    tree: tuple[dict[str, Any], list[str]] | None = None,
    check_packs: bool = True,
    pool: Executor | None = None,
) -> tuple[str, Manifest, SaveStats]:
    """Merge ``parts`` into one manifest and write it — the commit point — then release their leases.

    ``state`` is the checkpoint's structure with a :class:`TensorRef` where
    each tensor goes (None: a flat dict of every tensor name, in part order).
    ``tree`` gives the flattened structure instead (a tree and the name of
    each ``{"T": i}``). Every tensor of every part must be placed exactly
    once. Every pack the parts point at — their own and those of older
    checkpoints whose chunks they reused — must still exist: a part of a
    process that died long ago (its lease stale, its packs freed by gc) is
    refused with MissingObject (``check_packs=False`` skips that for a part
    this process just wrote under a lease it still holds). ``pool`` runs
    those checks. Nothing is written unless every check passes; if the
    manifest write itself fails, see :func:`publish` (the parts stay as they
    were, so the commit can be retried).
    """
    merged = merge_parts(parts, header=header, state=state, tree=tree, compact=catalog.compact_manifests)
    if check_packs:
        require_packs(storage, merged.manifest.packs, pool)
    return publish(storage, catalog, parts, merged)


def load_parts(parts: object) -> list[SavePart]:
    """The parts a ``commit`` is given: SavePart objects or their ``to_json()`` dicts, checked.

    InvalidState if ``parts`` is not a list (or other iterable) of those;
    CorruptObject if one of them is malformed.

    Example:
        >>> import torch, weightbank as wb
        >>> from weightbank.bank.parts import load_parts
        >>> part = wb.open("memory://").save_part({"b": torch.ones(3)})
        >>> [p.save_id == part.save_id for p in load_parts([part.to_json()])]
        [True]
    """
    if isinstance(parts, (str, bytes, Mapping, SavePart)) or not isinstance(parts, Iterable):
        raise InvalidState("parts", f"expected a list of parts, not {type(parts).__name__}")
    out = []
    for p in parts:
        if isinstance(p, SavePart):
            p.check()
            out.append(p)
        elif isinstance(p, Mapping):
            out.append(SavePart.from_json(p))
        else:
            raise InvalidState("parts", f"expected a SavePart or its to_json() dict, not {type(p).__name__}")
    return out


def mark_numpy(node: Any, numpy: set[int]) -> Any:
    """The tree with ``{"T": i}`` turned into ``{"N": i}`` for the tensors that were numpy arrays."""
    if not numpy:
        return node
    return map_tensors(node, lambda n: {"N": n["T"]} if n.get("T") in numpy else n)


def _sum_stats(stats: Iterable[SaveStats], manifest_bytes: int) -> SaveStats:
    per_codec: dict[str, int] = {}
    total = SaveStats(0, 0, 0, 0, 0, 0.0)
    for s in stats:
        for codec, n in s.per_codec.items():
            per_codec[codec] = per_codec.get(codec, 0) + n
        total = SaveStats(
            total.written_bytes + s.written_bytes,
            total.reused_bytes + s.reused_bytes,
            total.new_chunks + s.new_chunks,
            total.reused_chunks + s.reused_chunks,
            total.packs + s.packs,
            max(total.seconds, s.seconds),
        )
    return SaveStats(
        total.written_bytes,
        total.reused_bytes,
        total.new_chunks,
        total.reused_chunks,
        total.packs,
        total.seconds,
        manifest_bytes,
        per_codec,
    )
