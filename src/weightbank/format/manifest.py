"""The manifest: one immutable JSON document per checkpoint.

A checkpoint's id is the BLAKE3 hash of its manifest bytes, so a manifest is
verified by its own name, and two manifests never collide. It records who made
the checkpoint and why (run, step, parent, metrics, config, message, meta, env),
the state's structure (the JSON tree of :mod:`weightbank.format.tree`), each
tensor (name, dtype, shape, which chunks), and where every chunk lives::

    chunks: [[hash, raw_len, codec, pack_index, offset, stored_len, args?], ...]

``args`` is the codec's slot for its parameters (a delta's ``base`` hash, its
chain ``depth`` in links, its decode ``cost`` and ``gen``, the generations since
its keyframe), so new codecs need no format change. A delta's base chain is
always listed in the same table. ``lossy`` (present only for a checkpoint
saved with a lossy codec) maps each quantized tensor to its
:class:`~.schema.LossySummary`: codec, measured ``max_abs`` and relative L2
error ``rel_err``.

A tensor saved in pieces by several processes (a ``torch.distributed`` job)
is *sharded*: instead of ``chunks`` it lists ``shards``, each a box of the
whole tensor (``offsets`` and ``shape`` per dimension) with the chunks of that
box's bytes in row-major order. The shards tile the tensor exactly (no gap,
no overlap), so a reader assembles it whatever the writer's world size was::

    {"name": "w", "dtype": "float32", "shape": [8, 4],
     "shards": [{"offsets": [0, 0], "shape": [4, 4], "chunks": [0]},
                {"offsets": [4, 0], "shape": [4, 4], "chunks": [1]}]}

``format`` is bumped only for changes an older reader would misread; such
readers refuse with UnsupportedFormat. Format 1 is every manifest without
sharded tensors, format 2 one with them; both are one JSON document whose
hash is the checkpoint id. Format 3 (what banks of layout 3 write) stores the
same fields apart: the content, whose hash is the id, and the locations
(pack, offset, codec, stored length), which a repack may rewrite — see
:mod:`.stored`. In memory every format is this one :class:`Manifest`, and
:meth:`Manifest.to_json` gives the one-document form of any of them (trash
entries keep that).

Example:
    >>> from weightbank.format.manifest import Manifest
    >>> m = Manifest(run="r", step=1, parent=None, created=0.0)
    >>> Manifest.from_bytes(m.to_bytes(), "x").run
    'r'
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Any

import blake3

from ..errors import CorruptObject, UnsupportedFormat
from .chunking import DEFAULT_CHUNK_SIZE
from .codecs import CODECS
from .delta import DELTA
from .dtypes import itemsize
from .jsonsafe import check, decode
from .schema import MAX_READ_CHUNK_SIZE, DeltaArgs, LossySummary, hex_digest, int_tuple, max_stored_len, typed
from .tree import check_tree

__all__ = [
    "COMPACT_FORMAT",
    "FORMAT_VERSION",
    "MAX_CORNERS",
    "MAX_SHARDS",
    "NEWEST_FORMAT",
    "SHARDED_FORMAT",
    "ChunkRecord",
    "Manifest",
    "ShardRecord",
    "TensorRecord",
    "check_tiling",
]

#: The bank layout version, and the format of every manifest without sharded tensors.
FORMAT_VERSION = 1
#: The format of a manifest holding sharded tensors (older readers refuse it, never misread it).
SHARDED_FORMAT = 2
#: The format of a manifest stored as content + locations (:mod:`.stored`): id over content only.
COMPACT_FORMAT = 3
#: The newest manifest format this code reads.
NEWEST_FORMAT = COMPACT_FORMAT
#: More segment keys than this in one manifest is refused as malformed (as :mod:`.stored` does).
MAX_SEGMENT_KEYS = 1 << 20
#: More dimensions than this in one tensor is refused as malformed.
MAX_DIMS = 64
#: More shards than this in one tensor is refused as malformed.
MAX_SHARDS = 1 << 16
#: The tiling check looks at ``2**k`` corners of each shard (``k``: the dimensions the
#: layout splits); a layout with more corners than this is refused, which bounds the check.
MAX_CORNERS = 1 << 20


@dataclass(frozen=True)
class ChunkRecord:
    """Where one chunk lives and how it is coded."""

    hash: str
    raw_len: int
    codec: str
    pack: int
    offset: int
    stored_len: int
    args: DeltaArgs | None = None

    def to_json(self) -> list[Any]:
        row: list[Any] = [self.hash, self.raw_len, self.codec, self.pack, self.offset, self.stored_len]
        if self.args is not None:
            row.append(self.args.to_json())
        return row

    @property
    def depth(self) -> int:
        """Delta links above this chunk's keyframe (0 for a standalone chunk)."""
        return self.args.depth if self.args is not None else 0

    @property
    def cost(self) -> float:
        """Decode cost of this chunk's chain relative to a keyframe load (0 for a standalone chunk)."""
        return self.args.cost if self.args is not None else 0.0

    @property
    def gen(self) -> int:
        """Generations since this chunk's keyframe (0 for a standalone chunk)."""
        return self.args.gen if self.args is not None else 0

    @classmethod
    def from_json(cls, row: Any, n_packs: int, chunk_size: int) -> ChunkRecord:
        """One row of a chunk table, checked (ValueError/TypeError say which field is wrong).

        UnsupportedFormat for a codec this version does not know.
        """
        typed(row, list, "chunk")
        if len(row) not in (6, 7):
            raise ValueError("chunk rows have 6 or 7 fields")
        h = hex_digest(row[0], "chunk hash")
        raw_len, pack, offset, stored_len = (
            typed(row[i], int, what)
            for i, what in ((1, "raw_len"), (3, "pack"), (4, "offset"), (5, "stored_len"))
        )
        codec = typed(row[2], str, "codec")
        if codec not in CODECS:
            raise UnsupportedFormat(f"codec {codec[:40]!r}", codec, sorted(CODECS))
        if not 0 <= pack < n_packs or offset < 0:
            raise ValueError(f"chunk {h[:12]} points outside its pack table")
        if not 0 <= raw_len <= chunk_size or not 0 <= stored_len <= max_stored_len(raw_len):
            raise ValueError(f"chunk {h[:12]} claims {raw_len} raw / {stored_len} stored bytes")
        if codec == DELTA:
            if len(row) != 7:
                raise ValueError(f"delta chunk {h[:12]} has no codec args")
            args: DeltaArgs | None = DeltaArgs.from_json(row[6])
        elif len(row) == 7:
            raise ValueError(f"{codec} chunk {h[:12]} has codec args")
        else:
            args = None
        return cls(h, raw_len, codec, pack, offset, stored_len, args)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


@dataclass(frozen=True)
class ShardRecord:
    """One box of a sharded tensor: where it starts, its shape, and its chunks (row-major bytes)."""

    offsets: tuple[int, ...]
    shape: tuple[int, ...]
    chunks: tuple[int, ...] = ()

    @property
    def numel(self) -> int:
        return _numel(self.shape)

    def to_json(self) -> dict[str, Any]:
        return {"offsets": list(self.offsets), "shape": list(self.shape), "chunks": list(self.chunks)}


@dataclass(frozen=True)
class TensorRecord:
    """One tensor of the state: name, dtype, shape and its chunks (indices into ``Manifest.chunks``).

    A sharded tensor also lists its ``shards``; its ``chunks`` are then every
    shard's chunks, shard after shard (what dedup, verify and gc look at).
    Build one with :meth:`sharded`.
    """

    name: str
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...] = ()
    alias_of: int | None = None
    numpy: bool = False
    shards: tuple[ShardRecord, ...] = ()

    @classmethod
    def sharded(
        cls, name: str, dtype: str, shape: tuple[int, ...], shards: tuple[ShardRecord, ...]
    ) -> TensorRecord:
        """A record made of ``shards`` (its ``chunks`` follow from theirs)."""
        chunks = tuple(c for s in shards for c in s.chunks)
        return cls(name=name, dtype=dtype, shape=shape, chunks=chunks, shards=shards)

    @property
    def numel(self) -> int:
        return _numel(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.alias_of is not None:
            out["alias_of"] = self.alias_of
        elif self.shards:
            out["shards"] = [s.to_json() for s in self.shards]
        else:
            out["chunks"] = list(self.chunks)
        if self.numpy:
            out["numpy"] = True
        return out


@dataclass(frozen=True)
class Manifest:
    """Everything about one checkpoint except the tensor bytes themselves."""

    run: str
    step: int | None
    parent: str | None
    created: float
    message: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    tree: dict[str, Any] = field(default_factory=lambda: {"d": []})
    tensors: tuple[TensorRecord, ...] = ()
    chunk_size: int = DEFAULT_CHUNK_SIZE
    packs: tuple[str, ...] = ()
    chunks: tuple[ChunkRecord, ...] = ()
    lossy: dict[str, LossySummary] = field(default_factory=dict)
    format: int = FORMAT_VERSION
    #: Storage keys of the segments a format-3 manifest is stored in (what gc must keep for it).
    segments: tuple[str, ...] = ()

    # -- derived -----------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Logical bytes of every tensor (aliases counted once)."""
        return sum(t.nbytes for t in self.tensors if t.alias_of is None)

    @property
    def stored_bytes(self) -> int:
        """Bytes this checkpoint's chunks occupy in packs (shared chunks counted in full)."""
        return sum(c.stored_len for c in self.chunks)

    def content_key(self, index: int) -> str:
        """A key equal for two tensors exactly when their dtype, shape and bytes are equal.

        Derived from chunk hashes, so it costs no I/O: the serving pool keys
        resident tensors by it to hold shared tensors once.
        """
        t = self.tensors[index]
        base = self.tensors[t.alias_of] if t.alias_of is not None else t
        parts = [t.dtype, ",".join(map(str, t.shape)), *(self.chunks[c].hash for c in base.chunks)]
        # The same chunks cut along other boxes are other bytes: a sharded key names its boxes.
        parts += [f"{s.offsets}+{s.shape}" for s in base.shards]
        return blake3.blake3("|".join(parts).encode()).hexdigest()

    @property
    def sharded(self) -> bool:
        """Whether any tensor is stored in shards (such a manifest has format 2)."""
        return any(t.shards for t in self.tensors)

    def decoded_metrics(self) -> dict[str, Any]:
        return dict(decode(self.metrics))

    def decoded_meta(self) -> dict[str, Any]:
        return dict(decode(self.meta))

    # -- bytes -------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": self.format,
            "run": self.run,
            "step": self.step,
            "parent": self.parent,
            "created": self.created,
            "message": self.message,
            "metrics": self.metrics,
            "config": self.config,
            "meta": self.meta,
            "env": self.env,
            "tree": self.tree,
            "chunk_size": self.chunk_size,
            "tensors": [t.to_json() for t in self.tensors],
            "packs": list(self.packs),
            "chunks": [c.to_json() for c in self.chunks],
        }
        if self.lossy:
            out["lossy"] = {name: summary.to_json() for name, summary in self.lossy.items()}
        if self.format >= COMPACT_FORMAT:
            out["segments"] = list(self.segments)
        return out

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode()

    @classmethod
    def from_bytes(cls, data: bytes, key: str) -> Manifest:
        """Parse and validate all of it; CorruptObject for anything malformed, UnsupportedFormat if too new.

        Every field is checked once, here (tree, metadata, chunk table, tensor
        table, depth of every nesting), so a manifest that parses can be
        walked, decoded and loaded without another check, and a bad one is a
        CorruptObject that leaves every other checkpoint usable.
        """
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptObject(key, detail=f"manifest is not valid JSON ({e})") from None
        except RecursionError:
            raise CorruptObject(key, detail="manifest is nested too deeply to be one") from None
        if isinstance(obj, dict) and obj.get("format") == COMPACT_FORMAT:
            # Format 3 is stored as content + locations (:mod:`.stored`), never as one document.
            raise CorruptObject(key, detail="a one-document manifest claims format 3")
        return cls.from_json(obj, key)

    @classmethod
    def from_json(cls, obj: Any, key: str) -> Manifest:
        """A manifest from its parsed JSON (as stored, or embedded in a trash entry), checked whole like
        :meth:`from_bytes`; ``key`` names it in errors."""
        if not isinstance(obj, dict):
            raise CorruptObject(key, detail="manifest is not a JSON object")
        fmt = obj.get("format")
        if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt > NEWEST_FORMAT:
            raise UnsupportedFormat(key, fmt, NEWEST_FORMAT)
        try:
            return cls._parse(obj)
        except UnsupportedFormat as e:
            raise UnsupportedFormat(key, e.found, e.supported) from None
        except (KeyError, TypeError, ValueError, IndexError, OverflowError, RecursionError) as e:
            raise CorruptObject(key, detail=f"manifest is malformed ({type(e).__name__}: {e})") from None

    @classmethod
    def _parse(cls, obj: dict[str, Any]) -> Manifest:
        fmt = typed(obj["format"], int, "format")
        if not 1 <= fmt <= NEWEST_FORMAT:
            raise ValueError(f"format {fmt} is not one this reader knows")
        chunk_size = typed(obj["chunk_size"], int, "chunk_size")
        if not 1 <= chunk_size <= MAX_READ_CHUNK_SIZE:
            raise ValueError(f"chunk_size {chunk_size} is out of range")
        packs = tuple(typed(p, str, "pack") for p in typed(obj["packs"], list, "packs"))
        chunks = [
            ChunkRecord.from_json(row, len(packs), chunk_size) for row in typed(obj["chunks"], list, "chunks")
        ]
        listed = {c.hash for c in chunks}
        if any(c.args is not None and c.args.base not in listed for c in chunks):
            raise ValueError("a delta chunk's base is not in the chunk table")
        tensors: list[TensorRecord] = []
        for t in typed(obj["tensors"], list, "tensors"):
            tensors.append(_parse_tensor(t, len(tensors), tensors, chunks, fmt))
        tree = typed(obj["tree"], dict, "tree")
        check_tree(tree, len(tensors))
        step = obj.get("step")
        if step is not None and typed(step, int, "step") < 0:
            raise ValueError("step is negative")
        created = float(typed(obj["created"], (int, float), "created"))
        if not math.isfinite(created):
            raise ValueError("created is not a finite time")
        names = {t.name for t in tensors}
        lossy = {
            typed(name, str, "lossy tensor"): LossySummary.from_json(v)
            for name, v in typed(obj.get("lossy", {}), dict, "lossy").items()
        }
        if not set(lossy) <= names:
            raise ValueError("lossy names a tensor the manifest does not hold")
        segments: tuple[str, ...] = ()
        if fmt >= COMPACT_FORMAT:
            keys = typed(obj.get("segments", []), list, "segments")
            if len(keys) > MAX_SEGMENT_KEYS:
                raise ValueError("too many segments")
            segments = tuple(typed(k, str, "segment key") for k in keys)
        return cls(
            format=fmt,
            segments=segments,
            run=typed(obj["run"], str, "run"),
            step=step,
            parent=None if obj.get("parent") is None else hex_digest(obj["parent"], "parent"),
            created=created,
            message=typed(obj.get("message", ""), str, "message"),
            metrics=check(typed(obj.get("metrics", {}), dict, "metrics"), "metrics"),
            config=check(typed(obj.get("config", {}), dict, "config"), "config"),
            meta=check(typed(obj.get("meta", {}), dict, "meta"), "meta"),
            env=check(typed(obj.get("env", {}), dict, "env"), "env"),
            tree=tree,
            chunk_size=chunk_size,
            tensors=tuple(tensors),
            packs=packs,
            chunks=tuple(chunks),
            lossy=lossy,
        )


def _parse_tensor(
    t: Any, i: int, earlier: list[TensorRecord], chunks: list[ChunkRecord], fmt: int
) -> TensorRecord:
    typed(t, dict, "tensor")
    shape = int_tuple(t["shape"], "shape")
    if any(d < 0 for d in shape) or len(shape) > MAX_DIMS:
        raise ValueError("a tensor has a negative dimension or too many of them")
    alias = t.get("alias_of")
    if alias is not None and not (0 <= typed(alias, int, "alias_of") < i):
        raise ValueError("alias_of must name an earlier tensor")
    name = typed(t["name"], str, "name")
    dtype = typed(t["dtype"], str, "dtype")
    size = itemsize(dtype)  # UnsupportedFormat for a dtype this torch lacks
    if "shards" in t:
        if alias is not None or "chunks" in t or t.get("numpy"):
            raise ValueError(f"sharded tensor {name!r} has chunks, alias_of or numpy")
        if fmt < SHARDED_FORMAT:
            raise ValueError(f"tensor {name!r} is sharded in a format {fmt} manifest")
        shards = tuple(_parse_shard(s, shape, chunks) for s in typed(t["shards"], list, "shards"))
        check_tiling(name, shape, shards)
        for s in shards:
            if sum(chunks[c].raw_len for c in s.chunks) != s.numel * size:
                raise ValueError(f"chunks of a shard of {name!r} do not add up to its size")
        return TensorRecord.sharded(name, dtype, shape, shards)
    idx = int_tuple(t.get("chunks", []), "chunk index")
    if any(not 0 <= c < len(chunks) for c in idx):
        raise ValueError("chunk index out of range")
    rec = TensorRecord(
        name=name, dtype=dtype, shape=shape, chunks=idx, alias_of=alias, numpy=bool(t.get("numpy", False))
    )
    if alias is None and sum(chunks[c].raw_len for c in idx) != rec.numel * size:
        raise ValueError(f"chunks of {rec.name!r} do not add up to its size")
    if alias is not None:
        base = earlier[alias]
        if base.shards:
            raise ValueError(f"{rec.name!r} aliases a sharded tensor")
        if idx or (base.dtype, base.shape) != (dtype, shape):
            raise ValueError(f"{rec.name!r} aliases a tensor of another dtype or shape, or has chunks")
    return rec


def _parse_shard(obj: Any, whole: tuple[int, ...], chunks: list[ChunkRecord]) -> ShardRecord:
    typed(obj, dict, "shard")
    offsets = int_tuple(obj["offsets"], "shard offsets")
    shape = int_tuple(obj["shape"], "shard shape")
    idx = int_tuple(obj["chunks"], "shard chunks")
    if len(offsets) != len(whole) or len(shape) != len(whole):
        raise ValueError("a shard has another number of dimensions than its tensor")
    if any(o < 0 or n < 0 or o + n > w for o, n, w in zip(offsets, shape, whole, strict=True)):
        raise ValueError("a shard lies outside its tensor")
    if any(not 0 <= c < len(chunks) for c in idx):
        raise ValueError("chunk index out of range")
    return ShardRecord(offsets, shape, idx)


def check_tiling(name: str, shape: tuple[int, ...], shards: tuple[ShardRecord, ...]) -> None:
    """Shards must cover the tensor exactly once: every box inside it, no gap, no overlap.

    ValueError says which rule a layout breaks. The test is linear in the
    number of shards, whatever their layout: the boxes tile the tensor
    exactly if and only if their corner signatures add up to the tensor's
    (see :func:`_corner_sums`). Each box has ``2**k`` corners, ``k`` the
    number of dimensions some box does not span whole, so at most
    :data:`MAX_CORNERS` corners are looked at: any layout split in up to 4
    dimensions passes at :data:`MAX_SHARDS` shards.

    Example:
        >>> rows = (ShardRecord((0, 0), (2, 4)), ShardRecord((2, 0), (2, 4)))
        >>> check_tiling("w", (4, 4), rows)
        >>> check_tiling("w", (4, 4), rows[:1])
        Traceback (most recent call last):
        ValueError: the shards of 'w' do not add up to its size
    """
    if len(shards) > MAX_SHARDS:
        raise ValueError(f"{name!r} has more than {MAX_SHARDS} shards")
    rank = len(shape)
    for s in shards:
        if len(s.offsets) != rank or len(s.shape) != rank:
            raise ValueError(f"a shard of {name!r} has another number of dimensions than the tensor")
        if any(o < 0 or n < 0 or o + n > w for o, n, w in zip(s.offsets, s.shape, shape, strict=True)):
            raise ValueError(f"a shard of {name!r} lies outside the tensor {list(shape)}")
    boxes = [s for s in shards if s.numel > 0]
    if sum(s.numel for s in boxes) != _numel(shape):
        raise ValueError(f"the shards of {name!r} do not add up to its size")
    if len(boxes) < 2:
        return  # one box inside the tensor with its volume is the whole tensor
    # Dimensions every box spans whole cannot tell boxes apart: leave them out.
    split = [d for d in range(rank) if any(b.offsets[d] or b.shape[d] != shape[d] for b in boxes)]
    if len(boxes) << len(split) > MAX_CORNERS:
        raise ValueError(
            f"{name!r} is split in {len(split)} dimensions into {len(boxes)} shards:"
            f" more than the {MAX_CORNERS} box corners this reader checks"
        )
    whole = ShardRecord((0,) * rank, shape)
    if _corner_sums(boxes, split) != _corner_sums([whole], split):
        # The volumes add up, so covering some element twice leaves another one uncovered.
        raise ValueError(f"two shards of {name!r} overlap")


def _corner_sums(boxes: list[ShardRecord], dims: list[int]) -> dict[tuple[int, ...], int]:
    """Each corner point of ``boxes`` (in ``dims``) with the signed count of boxes having it there, zeros left out.

    A box [a, b) counts +1 at a corner for an even number of its upper ends
    ``b_d``, -1 for an odd number: that is the box's indicator function after a
    difference along each dimension, ``Δ_1…Δ_k 1_box``. The difference is
    linear and loses nothing for functions of finite support (prefix sums
    give them back), so the boxes' sums equal the tensor's exactly when the
    sum of the boxes' indicators is the tensor's indicator: every element
    covered once. O(n 2**k).
    """
    # itertools.product picks the upper end of dimension j in bit (k-1-j) of the corner's index.
    signs = [-1 if i.bit_count() % 2 else 1 for i in range(1 << len(dims))]
    sums: dict[tuple[int, ...], int] = {}
    for b in boxes:
        ends = [(b.offsets[d], b.offsets[d] + b.shape[d]) for d in dims]
        for corner, sign in zip(itertools.product(*ends), signs, strict=True):
            total = sums.get(corner, 0) + sign
            if total:
                sums[corner] = total
            else:
                del sums[corner]
    return sums
