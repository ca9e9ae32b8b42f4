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
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..errors import CorruptObject, InvalidState, MissingObject
from ..format.chunking import DEFAULT_CHUNK_SIZE
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
from ..format.tree import TensorRef, flatten, flatten_refs
from ..storage.base import Storage
from . import leases
from .catalog import Catalog
from .layout import manifest_key, save_id_from_pack
from .results import SaveStats

__all__ = [
    "PartTensor",
    "SavePart",
    "TensorRef",
    "TensorShard",
    "abandon_part",
    "commit_parts",
    "mark_numpy",
    "pieces_of",
]


@dataclass(frozen=True)
class TensorShard:
    """A box of a bigger tensor, for :meth:`Bank.save_part`: the local data, where it starts, the whole shape.

    Example:
        >>> import torch, weightbank as wb
        >>> wb.TensorShard(torch.zeros(2, 3), offsets=(2, 0), shape=(4, 3)).offsets
        (2, 0)
    """

    tensor: torch.Tensor
    offsets: tuple[int, ...]
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "offsets", tuple(int(o) for o in self.offsets))
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))


@dataclass(frozen=True)
class Piece:
    """One tensor (or shard of one) to write, as the save pipeline sees it."""

    name: str
    tensor: torch.Tensor
    offsets: tuple[int, ...] | None = None  # None: the piece is the whole tensor
    whole: tuple[int, ...] | None = None
    alias_of: int | None = None  # an earlier piece sharing this one's memory (whole tensors only)
    numpy: bool = False


def _check_box(name: str, t: torch.Tensor, offsets: tuple[int, ...], whole: tuple[int, ...]) -> None:
    shape = tuple(t.shape)
    if len(offsets) != len(whole) or len(shape) != len(whole):
        raise InvalidState(
            name, f"shard of {len(shape)} dims at offsets {offsets} of a {len(whole)}-dim tensor"
        )
    if any(o < 0 or o + n > w for o, n, w in zip(offsets, shape, whole, strict=True)):
        raise InvalidState(
            name, f"shard {list(shape)} at {list(offsets)} lies outside the tensor {list(whole)}"
        )


def pieces_of(
    tensors: Mapping[str, torch.Tensor | np.ndarray | TensorShard | Sequence[TensorShard]],
) -> list[Piece]:
    """The pieces of a ``save_part`` argument, checked (every value a tensor or shard(s) that fit)."""
    out: list[Piece] = []
    for name, value in tensors.items():
        if not isinstance(name, str) or not name:
            raise InvalidState(repr(name), "tensor names must be non-empty strings")
        items = [value] if isinstance(value, (torch.Tensor, TensorShard, np.ndarray)) else list(value)
        for item in items:
            if isinstance(item, np.ndarray):
                if len(items) > 1:
                    raise InvalidState(name, "a whole array cannot come with other pieces of the same name")
                _, leaves = flatten(item)  # the same checks as a save (numeric dtypes only)
                out.append(Piece(name, leaves[0].tensor, numpy=True))
            elif isinstance(item, torch.Tensor):
                if len(items) > 1:
                    raise InvalidState(name, "a whole tensor cannot come with other pieces of the same name")
                out.append(Piece(name, item.detach()))
            elif isinstance(item, TensorShard):
                _check_box(name, item.tensor, item.offsets, item.shape)
                out.append(Piece(name, item.tensor.detach(), item.offsets, item.shape))
            else:
                raise InvalidState(name, f"expected a tensor or wb.TensorShard, not {type(item).__name__}")
    return out


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
    lossy: dict[str, dict[str, Any]] = field(default_factory=dict)
    stats: SaveStats = field(default_factory=lambda: SaveStats(0, 0, 0, 0, 0, 0.0))

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
            "lossy": self.lossy,
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
        """Read a part back (CorruptObject if it is malformed).

        Example:
            >>> import torch, weightbank as wb
            >>> part = wb.open("memory://").save_part({"b": torch.ones(3)})
            >>> wb.SavePart.from_json(part.to_json()) == part
            True
        """
        try:
            packs = tuple(str(p) for p in obj["packs"])
            probe = Manifest._parse(
                {"format": SHARDED_FORMAT, "run": "", "created": 0.0, "tree": {}, "tensors": [],
                 "chunk_size": int(obj["chunk_size"]), "packs": list(packs), "chunks": obj["chunks"]}
            )  # fmt: skip
            tensors = []
            for t in obj["tensors"]:
                idx = tuple(int(c) for c in t["chunks"])
                if any(not 0 <= c < len(probe.chunks) for c in idx):
                    raise ValueError("chunk index out of range")
                has_box = "offsets" in t
                tensors.append(
                    PartTensor(
                        name=str(t["name"]),
                        dtype=str(t["dtype"]),
                        shape=tuple(int(d) for d in t["shape"]),
                        chunks=idx,
                        offsets=tuple(int(o) for o in t["offsets"]) if has_box else None,
                        whole=tuple(int(d) for d in t["whole"]) if has_box else None,
                        alias_of=None if t.get("alias_of") is None else str(t["alias_of"]),
                        numpy=bool(t.get("numpy", False)),
                    )
                )
            w, r, nc, rc, np_, sec, per = obj["stats"]
            stats = SaveStats(int(w), int(r), int(nc), int(rc), int(np_), float(sec), 0, dict(per))
            return cls(
                save_id=str(obj["save"]),
                chunk_size=probe.chunk_size,
                packs=packs,
                chunks=probe.chunks,
                tensors=tuple(tensors),
                lossy={str(k): dict(v) for k, v in dict(obj.get("lossy", {})).items()},
                stats=stats,
            )
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise CorruptObject("<save part>", detail=f"malformed part ({type(e).__name__}: {e})") from None


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


def _place(name: str, found: list[tuple[PartTensor, tuple[int, ...]]], index: dict[str, int]) -> TensorRecord:
    """The manifest record of tensor ``name`` from its pieces (with chunk indices already merged)."""
    first, chunks = found[0]
    if first.offsets is None:
        for t, idx in found[1:]:
            # A replicated tensor written by several parts: the same bytes (chunks are merged by hash).
            if t.offsets is not None or (t.dtype, t.shape, idx) != (first.dtype, first.shape, chunks):
                raise InvalidState(name, "several parts hold this whole tensor with different contents")
        alias = index.get(first.alias_of) if first.alias_of is not None else None
        if first.alias_of is not None and alias is None:
            raise InvalidState(name, f"it shares memory with {first.alias_of!r}, which must be placed first")
        return TensorRecord(name, first.dtype, first.shape, chunks, alias_of=alias, numpy=first.numpy)
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
            continue  # the same box from two parts (a replicated piece): keep one
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


def commit_parts(
    storage: Storage,
    catalog: Catalog,
    parts: Sequence[SavePart],
    *,
    header: dict[str, Any],
    state: object = None,
    tree: tuple[dict[str, Any], list[str]] | None = None,
    check_packs: bool = True,
) -> tuple[str, Manifest, SaveStats]:
    """Merge ``parts`` into one manifest and write it — the commit point — then release their leases.

    ``state`` is the checkpoint's structure with a :class:`TensorRef` where
    each tensor goes (None: a flat dict of every tensor name, in part order).
    ``tree`` gives the flattened structure instead (a tree and the name of
    each ``{"T": i}``). Every tensor of every part must be placed exactly
    once. Parts whose packs have vanished (a part of a process that died long
    ago, whose lease went stale and whose packs gc freed) are refused with
    MissingObject (``check_packs=False`` skips that for parts this process
    just wrote).
    """
    chunk_sizes = {p.chunk_size for p in parts}
    if len(chunk_sizes) > 1:
        raise InvalidState("<parts>", f"parts were written with different chunk sizes {sorted(chunk_sizes)}")
    merged = _Merger()
    pieces: dict[str, list[tuple[PartTensor, tuple[int, ...]]]] = {}
    lossy: dict[str, dict[str, Any]] = {}
    for part in parts:
        remap = merged.add_part(part)
        for t in part.tensors:
            pieces.setdefault(t.name, []).append((t, tuple(remap[c] for c in t.chunks)))
        for name, summary in part.lossy.items():
            acc = lossy.setdefault(
                name, {"codec": summary.get("codec", ""), "max_abs": 0.0, "sq_err": 0.0, "sq_ref": 0.0}
            )
            acc["max_abs"] = max(float(acc["max_abs"]), float(summary.get("max_abs", 0.0)))
            acc["sq_err"] = float(acc["sq_err"]) + float(summary.get("sq_err", 0.0))
            acc["sq_ref"] = float(acc["sq_ref"]) + float(summary.get("sq_ref", 0.0))
    if tree is not None:
        spec, names = tree
    else:
        spec, names = flatten_refs({name: TensorRef(name) for name in pieces} if state is None else state)
    spec = mark_numpy(spec, {i for i, n in enumerate(names) if n in pieces and pieces[n][0][0].numpy})
    placed = set(names)
    unplaced = [n for n in pieces if n not in placed]
    unknown = [n for n in names if n not in pieces]
    if unplaced or unknown:
        raise InvalidState(
            "<parts>",
            (f"tensors of the parts not placed in the state: {unplaced[:8]}; " if unplaced else "")
            + (f"state names tensors no part holds: {unknown[:8]}" if unknown else ""),
        )
    index: dict[str, int] = {}
    tensors: list[TensorRecord] = []
    for name in names:
        rec = _place(name, pieces[name], index)
        index[name] = len(tensors)
        tensors.append(rec)
    for key in (k for p in parts for k in p.own_packs() if check_packs):
        if not storage.exists(key):
            raise MissingObject(
                key, "a part to commit lost its pack (was its process dead long enough for gc?)"
            )
    manifest = Manifest(
        tree=spec,
        tensors=tuple(tensors),
        chunk_size=chunk_sizes.pop() if chunk_sizes else DEFAULT_CHUNK_SIZE,
        packs=tuple(merged.packs),
        chunks=tuple(merged.chunks),
        lossy={
            n: {
                "codec": s["codec"],
                "max_abs": s["max_abs"],
                "rel_err": (s["sq_err"] / s["sq_ref"]) ** 0.5 if s["sq_ref"] > 0 else 0.0,
            }
            for n, s in lossy.items()
        },
        format=SHARDED_FORMAT if any(t.shards for t in tensors) else FORMAT_VERSION,
        **header,
    )
    data = manifest.to_bytes()
    cid = digest(data)
    # The commit point: every part's packs were durable before its part existed.
    storage.write(manifest_key(cid), data)
    for part in parts:
        with contextlib.suppress(Exception):
            leases.release(storage, part.save_id)
    catalog.add(cid, manifest)
    return cid, manifest, _sum_stats([p.stats for p in parts], len(data))


def mark_numpy(node: Any, numpy: set[int]) -> Any:
    """The tree with ``{"T": i}`` turned into ``{"N": i}`` for the tensors that were numpy arrays."""
    if not numpy or not isinstance(node, dict):
        return node
    if "T" in node:
        return {"N": node["T"]} if node["T"] in numpy else node
    if "d" in node:
        return {"d": [[k, mark_numpy(v, numpy)] for k, v in node["d"]]}
    for kind in ("l", "u"):
        if kind in node:
            return {kind: [mark_numpy(v, numpy) for v in node[kind]]}
    return node


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
