"""The save pipeline: chunk, hash, dedup, pack, then commit in crash-safe order.

Order of durability (each step starts only after the previous is durable):

1. a lease is written, so ``gc`` keeps what this save writes or reuses;
2. chunks not already in the bank are appended to this save's pack objects;
   each pack is fsynced / fully uploaded (``ObjectWriter.commit``);
3. the manifest is written — this is the commit point: the checkpoint exists
   from the instant its manifest object does, and not before;
4. the lease is dropped (tags are moved by the caller afterwards).

A crash before 3 leaves only unreferenced packs, which ``gc`` removes; a crash
after 3 leaves a complete checkpoint. A failed manifest write proves nothing
(an object store may store the object and lose the reply): once it has been
attempted the packs are never deleted, only the lease is dropped, and a
manifest found in place after all makes the save a success.

Steps 1-2 are :func:`write_part` and 3-4
:func:`~weightbank.bank.parts.commit_parts`: a multi-process save runs the
first half in every process and the second in one (see :mod:`.parts`).

Hashing and coding run on a thread pool (BLAKE3, zstd and numpy release the
GIL) while the calling thread appends payloads to the current pack;
contiguous CPU tensors are never copied, others are materialized a chunk at a
time, so a save's extra memory is a few chunks.

Codecs (:mod:`weightbank.format.planner`): by default each new chunk is coded
as byte planes, or as an XOR delta against the parent checkpoint's chunk at
the same tensor name and chunk index when that is smaller. The base is read
back from the bank (and hash-checked) by the worker; its whole chain is listed
in the new manifest's chunk table, so the manifest alone says how to decode it
and ``gc`` keeps every link alive. A chunk whose chain would exceed
``keyframe_every`` links is coded standalone (a keyframe).

Example:
    >>> import torch, weightbank as wb
    >>> bank = wb.open("memory://")
    >>> bank.save({"w": torch.zeros(4)}, run="r", step=1).save_stats.new_chunks
    1
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..errors import CorruptObject, InvalidState, MissingObject, UnsupportedFormat
from ..format import planner
from ..format.chunking import chunk_bytes, chunk_spans, tensor_nbytes
from ..format.delta import DELTA
from ..format.dtypes import dtype_name
from ..format.hashing import digest
from ..format.lossy import LOSSY_CODECS, LOSSY_DTYPES, LossyStats, quantize
from ..format.manifest import ChunkRecord, Manifest, TensorRecord
from ..format.planes import layout_for
from ..format.planner import Base, plan_chunk
from ..format.schema import MAX_CHUNK_SIZE, DeltaArgs, LossySums
from ..format.tree import Leaf
from ..storage.base import ObjectWriter, Storage
from . import leases
from .catalog import Catalog, ChunkLocation
from .chunks import base_planes, chain_of, records_by_hash
from .layout import pack_key, segment_hash_from_key
from .parts import PartTensor, Piece, SavePart, abandon_part, merge_parts, publish
from .results import SaveStats

__all__ = ["CHUNK_ALIGN", "DEFAULT_KEYFRAME_EVERY", "SaveOptions", "write_checkpoint", "write_part"]

#: Chunks start at multiples of this in a pack, so a raw chunk can be mapped
#: straight into a tensor of any dtype (and SIMD loads stay aligned).
CHUNK_ALIGN = 64
#: Longest delta chain (links, keyframe included) a save creates; the decode-cost
#: budget (:data:`~weightbank.format.planner.CHAIN_BUDGET`) usually ends fp32
#: chains sooner. Measured: benchmarks/RESULTS.md ("Codecs": chain-end load).
DEFAULT_KEYFRAME_EVERY = 16


@dataclass(frozen=True)
class SaveOptions:
    """Tunables of the save pipeline.

    ``codec``: ``auto`` (byte planes, XOR deltas against the parent), ``planes``
    (no deltas), ``zstd`` or ``raw``. ``lossy``: None, ``int8`` or ``fp8`` for
    float tensors of 2+ dims (others stay lossless). ``chunk_size``: bytes per
    chunk, a positive multiple of :data:`CHUNK_ALIGN`, so no chunk boundary
    splits an element of any dtype. InvalidState for any other value.

    Example:
        >>> from weightbank.bank.writer import SaveOptions
        >>> SaveOptions(chunk_size=1 << 20).chunk_size
        1048576
    """

    codec: str = "auto"
    chunk_size: int = 4 << 20
    pack_size: int = 512 << 20
    workers: int = 2
    keyframe_every: int = DEFAULT_KEYFRAME_EVERY
    chain_budget: float | None = None  # None: planner.CHAIN_BUDGET as it is at save time
    lossy: str | None = None

    def __post_init__(self) -> None:
        if self.codec not in planner.MODES:
            raise InvalidState(
                "codec", f"codec must be one of {', '.join(planner.MODES)}, not {self.codec!r}"
            )
        if self.lossy is not None and self.lossy not in LOSSY_CODECS:
            raise InvalidState(
                "lossy", f"lossy must be None or one of {', '.join(LOSSY_CODECS)}, not {self.lossy!r}"
            )
        k = self.keyframe_every
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise InvalidState("keyframe_every", f"keyframe_every must be an int >= 1, not {k!r}")
        c = self.chunk_size
        # A multiple of CHUNK_ALIGN keeps every chunk boundary on an element boundary for every dtype.
        if (
            isinstance(c, bool)
            or not isinstance(c, int)
            or not CHUNK_ALIGN <= c <= MAX_CHUNK_SIZE
            or c % CHUNK_ALIGN
        ):
            raise InvalidState(
                "chunk_size",
                f"chunk_size must be a multiple of {CHUNK_ALIGN} bytes from {CHUNK_ALIGN} to"
                f" {MAX_CHUNK_SIZE}, not {c!r}",
            )


@dataclass
class _Chunked:
    """One chunk after a worker has seen it."""

    leaf: int
    hash: str
    raw_len: int
    payload: memoryview | bytes | None  # None when the bank already has it
    codec: str
    found: ChunkLocation | None = None  # where the bank has it, as seen by the worker
    args: DeltaArgs | None = None  # a delta's base and place in its chain
    lossy: LossyStats | None = None


@dataclass
class _Packer:
    """Appends new chunks to this save's packs, rolling over at pack_size.

    A full pack is committed (fsync, rename) on a background thread while the
    next one is written, so its fsync overlaps the writes; :meth:`flush` waits
    for every commit, and only then may the manifest follow.
    """

    storage: Storage
    save_id: str
    pack_size: int
    committed: list[str] = field(default_factory=list)
    _writer: ObjectWriter | None = None
    _key: str = ""
    _offset: int = 0
    _opened: int = 0
    _committing: list[tuple[str, ObjectWriter, Future[None]]] = field(default_factory=list)
    _committer: ThreadPoolExecutor | None = None

    def append(self, payload: memoryview | bytes) -> tuple[str, int]:
        if self._writer is None or self._offset >= self.pack_size:
            self._roll()
            self._key = pack_key(self.save_id, self._opened)
            self._opened += 1
            self._writer = self.storage.open_writer(self._key)
            self._offset = 0
        pad = -self._offset % CHUNK_ALIGN
        if pad:
            self._writer.write(bytes(pad))
            self._offset += pad
        offset = self._offset
        self._writer.write(payload)
        self._offset += len(payload)
        return self._key, offset

    def _roll(self) -> None:
        if self._writer is None:
            return
        if self._committer is None:
            self._committer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wb-commit")
        self._committing.append((self._key, self._writer, self._committer.submit(self._writer.commit)))
        self._writer = None

    def _settle(self) -> BaseException | None:
        """Wait for every background commit; the first failure, if any."""
        failure: BaseException | None = None
        for key, writer, fut in self._committing:
            try:
                fut.result()
                self.committed.append(key)
            except BaseException as e:  # re-raised by the caller; later commits still settle
                failure = failure or e
                with contextlib.suppress(Exception):
                    writer.abort()  # a failed commit leaves nothing half-published behind
        self._committing.clear()
        if self._committer is not None:
            self._committer.shutdown(wait=True)
            self._committer = None
        return failure

    def flush(self) -> None:
        """Commit every pack; on return all are durable."""
        self._roll()
        failure = self._settle()
        if failure is not None:
            raise failure

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        pending = [key for key, _, _ in self._committing]
        self._settle()
        for key in [*self.committed, *pending]:
            with contextlib.suppress(Exception):
                self.storage.delete(key)


def _chunk_tasks(leaves: list[Piece], chunk_size: int) -> Iterator[tuple[int, int, int, int]]:
    for i, leaf in enumerate(leaves):
        if leaf.alias_of is not None:
            continue
        for j, (start, end) in enumerate(chunk_spans(tensor_nbytes(leaf.tensor), chunk_size)):
            yield i, j, start, end


@dataclass
class _Parent:
    """The parent checkpoint, as far as delta coding needs it."""

    manifest: Manifest
    index: dict[str, ChunkRecord]
    tensors: dict[str, TensorRecord]

    @classmethod
    def load(cls, catalog: Catalog, cid: str | None, chunk_size: int) -> _Parent | None:
        if cid is None:
            return None
        # Asked after the lease began (a cached copy proves nothing): a parent deleted since the
        # save chose it may have its data collected, so its chunks are not reused.
        try:
            m = catalog.fresh(cid)  # its locations as they are now (a repack may have moved them)
        except (MissingObject, CorruptObject, UnsupportedFormat, FileNotFoundError):
            return None  # damaged: code standalone
        if m is None:
            return None  # deleted meanwhile
        if m.chunk_size != chunk_size:
            return None  # chunk j would cover other bytes
        return cls(m, records_by_hash(m), {t.name: t for t in m.tensors if t.alias_of is None})

    def chunk(self, piece: Piece, dtype: str, nbytes: int, j: int) -> ChunkRecord | None:
        """The parent's chunk ``j`` of the same tensor (or the same shard of it), if dtype and size match."""
        t = self.tensors.get(piece.name)
        if t is None or t.dtype != dtype:
            return None
        chunks = t.chunks
        if piece.offsets is not None and t.shards:
            shape = tuple(piece.tensor.shape)
            box = next((s for s in t.shards if s.offsets == piece.offsets and s.shape == shape), None)
            if box is None:
                return None
            chunks = box.chunks
        elif piece.offsets is not None or t.shards or t.nbytes != nbytes:
            return None
        if j >= len(chunks):
            return None
        return self.manifest.chunks[chunks[j]]

    def location(self, h: str) -> ChunkLocation | None:
        rec = self.index.get(h)
        return None if rec is None else (self.manifest.packs[rec.pack], rec)


def _parent_segments(catalog: Catalog, parent: str | None, known: _Parent | None) -> dict[str, str]:
    """The parent's manifest segments (hash → key), asked after the lease began (gc then keeps them)."""
    if known is not None:
        m: Manifest | None = known.manifest
    elif parent is None:
        m = None
    else:
        try:
            m = catalog.fresh(parent)
        except (MissingObject, CorruptObject, UnsupportedFormat, FileNotFoundError):
            m = None
    return {} if m is None else {segment_hash_from_key(k): k for k in m.segments}


def _lossy_sums(codec: str, stats: list[LossyStats]) -> LossySums:
    """A part's lossy error sums for one tensor (a commit adds the sums of every part, then takes the root)."""
    return LossySums(
        codec,
        max((s.max_abs for s in stats), default=0.0),
        sum(s.sq_err for s in stats),
        sum(s.sq_ref for s in stats),
    )


def write_part(
    storage: Storage,
    catalog: Catalog,
    pieces: list[Piece],
    options: SaveOptions,
    *,
    parent: str | None = None,
) -> SavePart:
    """Write every new chunk of ``pieces`` into durable packs and return the part, its lease still held.

    ``parent`` (a checkpoint id) is what chunks are delta-coded against (same
    tensor name, same shard box, same chunk index). On failure the packs are
    deleted and the lease released before the error propagates; on success
    the caller commits the part (:func:`~weightbank.bank.parts.commit_parts`),
    which releases the lease, or abandons it.
    """
    t0 = time.perf_counter()
    save_id = leases.new_id()
    leases.acquire(storage, save_id)
    packer = _Packer(storage, save_id, options.pack_size)
    leaves = pieces  # the pipeline's own word for what it cuts into chunks
    try:
        # Refresh only after the lease exists: gc keeps the data of anything we see from here on.
        catalog.refresh()
        known = catalog.chunk_finder()
        deltas = options.codec == "auto" and options.keyframe_every > 1
        budget = planner.CHAIN_BUDGET if options.chain_budget is None else options.chain_budget
        parent_m = _Parent.load(catalog, parent, options.chunk_size) if deltas else None
        dtypes = [dtype_name(leaf.tensor.dtype, leaf.name) for leaf in leaves]

        def base_for(i: int, j: int, raw_len: int) -> Base | None:
            if parent_m is None or raw_len < planner.MIN_CODED:
                return None  # no parent, or a chunk stored raw whatever its base (no read for nothing)
            leaf = leaves[i]
            rec = parent_m.chunk(leaf, dtypes[i], tensor_nbytes(leaf.tensor), j)
            if rec is None or rec.raw_len != raw_len or rec.gen + 1 >= options.keyframe_every:
                return None  # nothing to delta against, or a keyframe is due
            gen = rec.gen
            try:
                last_link = planner.link_cost(rec.stored_len, rec.raw_len) if rec.codec == DELTA else 0.0
                if rec.cost + last_link > budget:
                    # Another link would likely break the decode budget: code against the
                    # chain's keyframe instead (a two-link chain, a little larger).
                    rec = chain_of(rec, parent_m.index)[0]
                planes = base_planes(
                    storage, parent_m.manifest.packs, parent_m.index, rec, layout_for(dtypes[i])
                )
            except (CorruptObject, MissingObject):
                return None  # a damaged or vanished base: this chunk becomes a keyframe
            return Base(rec.hash, rec.depth, planes, rec.cost, gen)

        def quantized(i: int, start: int, raw: memoryview) -> _Chunked | None:
            t = leaves[i].tensor
            if options.lossy is None or dtypes[i] not in LOSSY_DTYPES or t.dim() < 2:
                return None
            row = t.numel() // t.shape[0]
            q = quantize(raw, dtypes[i], options.lossy, row=row, phase=(start // t.element_size()) % row)
            if q is None:
                return None  # NaN/inf: stored losslessly
            h = digest(q.raw)
            loc = known.get(h)
            if loc is not None:
                return _Chunked(i, h, len(q.raw), None, "raw", loc, lossy=q.stats)
            return _Chunked(i, h, len(q.raw), q.payload, options.lossy, lossy=q.stats)

        def work(task: tuple[int, int, int, int]) -> _Chunked:
            i, j, start, end = task
            raw = chunk_bytes(leaves[i].tensor, start, end)
            q = quantized(i, start, raw)
            if q is not None:
                return q
            h = digest(raw)
            # The parent first (the common case, and it costs no read), then the bank-wide index;
            # a chunk equal to its own base must be reused, never coded as a delta against itself.
            loc = (parent_m.location(h) if parent_m is not None else None) or known.get(h)
            if loc is not None:
                return _Chunked(i, h, end - start, None, "raw", loc)
            base = base_for(i, j, end - start)
            enc = plan_chunk(raw, dtypes[i], options.codec, base, budget)
            return _Chunked(i, h, end - start, enc.payload, enc.codec, args=enc.args)

        pack_index: dict[str, int] = {}
        records: list[ChunkRecord] = []
        record_of: dict[str, int] = {}
        per_leaf: dict[int, list[int]] = {}
        lossy_of: dict[int, list[LossyStats]] = {}
        per_codec: dict[str, int] = {}
        written = reused = new_chunks = reused_chunks = 0

        def relocated(pkey: str, rec: ChunkRecord) -> int:
            pidx = pack_index.setdefault(pkey, len(pack_index))
            idx = record_of[rec.hash] = len(records)
            records.append(
                ChunkRecord(rec.hash, rec.raw_len, rec.codec, pidx, rec.offset, rec.stored_len, rec.args)
            )
            return idx

        def list_bases(rec: ChunkRecord) -> None:
            # Every link of a delta chain is listed in this manifest: the reader
            # finds bases here, and gc keeps a pack alive only if a manifest lists it.
            while rec.args is not None:
                base = rec.args.base
                if base in record_of:
                    return
                loc = (parent_m.location(base) if parent_m is not None else None) or known.get(base)
                if loc is None:
                    raise CorruptObject(
                        "<catalog>",
                        detail=f"delta base {base[:12]} of chunk {rec.hash[:12]} is in no manifest",
                    )
                relocated(*loc)
                rec = loc[1]

        def place(c: _Chunked) -> None:
            nonlocal written, reused, new_chunks, reused_chunks
            if c.lossy is not None:
                lossy_of.setdefault(c.leaf, []).append(c.lossy)
            idx = record_of.get(c.hash)
            if idx is None:
                if c.found is not None:
                    reused += c.raw_len
                    reused_chunks += 1
                    idx = relocated(*c.found)
                    list_bases(c.found[1])
                else:
                    assert c.payload is not None  # a chunk the bank lacks always carries its bytes
                    pkey, offset = packer.append(c.payload)
                    written += len(c.payload)
                    per_codec[c.codec] = per_codec.get(c.codec, 0) + len(c.payload)
                    new_chunks += 1
                    pidx = pack_index.setdefault(pkey, len(pack_index))
                    rec = ChunkRecord(c.hash, c.raw_len, c.codec, pidx, offset, len(c.payload), c.args)
                    idx = record_of[c.hash] = len(records)
                    records.append(rec)
                    list_bases(rec)
            else:
                reused += c.raw_len
                reused_chunks += 1
            per_leaf.setdefault(c.leaf, []).append(idx)

        window = max(2, options.workers * 3)
        with ThreadPoolExecutor(max_workers=max(1, options.workers), thread_name_prefix="wb-save") as pool:
            pending: deque[Future[_Chunked]] = deque()
            for task in _chunk_tasks(leaves, options.chunk_size):
                pending.append(pool.submit(work, task))
                if len(pending) >= window:
                    place(pending.popleft().result())
            while pending:
                place(pending.popleft().result())
        packer.flush()
    except BaseException:
        packer.abort()
        with contextlib.suppress(Exception):
            leases.release(storage, save_id)
        raise
    tensors = []
    for i, leaf in enumerate(leaves):
        tensors.append(
            PartTensor(
                name=leaf.name,
                dtype=dtypes[i],
                shape=tuple(int(d) for d in leaf.tensor.shape),
                chunks=tuple(per_leaf.get(i, [])) if leaf.alias_of is None else (),
                offsets=leaf.offsets,
                whole=leaf.whole,
                alias_of=leaves[leaf.alias_of].name if leaf.alias_of is not None else None,
                numpy=leaf.numpy,
            )
        )
    packs = [""] * len(pack_index)
    for key, pidx in pack_index.items():
        packs[pidx] = key
    stats = SaveStats(
        written_bytes=written,
        reused_bytes=reused,
        new_chunks=new_chunks,
        reused_chunks=reused_chunks,
        packs=len(packer.committed),
        seconds=time.perf_counter() - t0,
        per_codec=per_codec,
    )
    return SavePart(
        segments=_parent_segments(catalog, parent, parent_m),
        save_id=save_id,
        chunk_size=options.chunk_size,
        packs=tuple(packs),
        chunks=tuple(records),
        tensors=tuple(tensors),
        lossy={leaves[i].name: _lossy_sums(options.lossy or "", st) for i, st in sorted(lossy_of.items())},
        stats=stats,
    )


def write_checkpoint(
    storage: Storage,
    catalog: Catalog,
    *,
    spec: dict[str, Any],
    leaves: list[Leaf],
    header: dict[str, Any],
    options: SaveOptions,
) -> tuple[str, Manifest, SaveStats]:
    """Write every new chunk and the manifest; return (checkpoint id, manifest, stats).

    One part, committed at once. ``header`` holds the manifest's metadata
    fields (run, step, parent, created, message, metrics, config, meta, env).
    Nothing is visible unless this returns.
    """
    t0 = time.perf_counter()
    pieces = [Piece(leaf.name, leaf.tensor, alias_of=leaf.alias_of, numpy=leaf.numpy) for leaf in leaves]
    part = write_part(storage, catalog, pieces, options, parent=header.get("parent"))
    try:
        merged = merge_parts(
            [part],
            tree=(spec, [leaf.name for leaf in leaves]),
            header=header,
            compact=catalog.compact_manifests,
        )
    except BaseException:
        abandon_part(storage, part)  # nothing was written that could point at its packs
        raise
    try:
        # No pack check: the lease, held since before any chunk was chosen, kept gc away from them all.
        cid, manifest, stats = publish(
            storage,
            catalog,
            [part],
            merged,
            not_committed=lambda: abandon_part(storage, part),
            lease_held=True,
        )
    except BaseException:
        # The manifest may have landed even though its write failed: never delete the packs
        # now. Without the lease, gc frees them if (and only if) no manifest points at them.
        with contextlib.suppress(Exception):
            leases.release(storage, part.save_id)
        raise
    return cid, manifest, dataclasses.replace(stats, seconds=time.perf_counter() - t0)
