"""The save pipeline: chunk, hash, dedup, pack, then commit in crash-safe order.

Order of durability (each step starts only after the previous is durable):

1. a lease is written, so ``gc`` keeps what this save writes or reuses;
2. chunks not already in the bank are appended to this save's pack objects;
   each pack is fsynced / fully uploaded (``ObjectWriter.commit``);
3. the manifest is written — this is the commit point: the checkpoint exists
   from the instant its manifest object does, and not before;
4. the lease is dropped (tags are moved by the caller afterwards).

A crash before 3 leaves only unreferenced packs, which ``gc`` removes; a crash
after 3 leaves a complete checkpoint. Hashing and coding run on a thread pool
(BLAKE3 and zstd release the GIL) while the calling thread appends payloads to
the current pack; contiguous CPU tensors are never copied, others are
materialized a chunk at a time, so a save's extra memory is a few chunks.

Example:
    >>> import torch, weightbank as wb
    >>> bank = wb.open("memory://")
    >>> bank.save({"w": torch.zeros(4)}, run="r", step=1).save_stats.new_chunks
    1
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections import deque
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ..format.chunking import chunk_bytes, chunk_spans, tensor_nbytes
from ..format.codecs import get_codec
from ..format.dtypes import dtype_name
from ..format.hashing import digest
from ..format.manifest import ChunkRecord, Manifest, TensorRecord
from ..format.tree import Leaf
from ..storage.base import ObjectWriter, Storage
from . import leases
from .catalog import Catalog, ChunkLocation
from .layout import manifest_key, pack_key
from .results import SaveStats

__all__ = ["CHUNK_ALIGN", "SaveOptions", "write_checkpoint"]

#: Chunks start at multiples of this in a pack, so a raw chunk can be mapped
#: straight into a tensor of any dtype (and SIMD loads stay aligned).
CHUNK_ALIGN = 64


@dataclass(frozen=True)
class SaveOptions:
    """Tunables of the save pipeline."""

    codec: str = "raw"
    chunk_size: int = 4 << 20
    pack_size: int = 512 << 20
    workers: int = 2


@dataclass
class _Chunked:
    """One chunk after a worker has seen it."""

    leaf: int
    hash: str
    raw_len: int
    payload: memoryview | bytes | None  # None when the bank already has it
    codec: str
    found: ChunkLocation | None = None  # where the bank has it, as seen by the worker


@dataclass
class _Packer:
    """Appends new chunks to this save's packs, rolling over at pack_size."""

    storage: Storage
    save_id: str
    pack_size: int
    committed: list[str] = field(default_factory=list)
    _writer: ObjectWriter | None = None
    _key: str = ""
    _offset: int = 0

    def append(self, payload: memoryview | bytes) -> tuple[str, int]:
        if self._writer is None or self._offset >= self.pack_size:
            self.flush()
            self._key = pack_key(self.save_id, len(self.committed))
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

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.commit()
            self.committed.append(self._key)
            self._writer = None

    def abort(self) -> None:
        if self._writer is not None:
            self._writer.abort()
            self._writer = None
        for key in self.committed:
            with contextlib.suppress(Exception):
                self.storage.delete(key)


def _chunk_tasks(leaves: list[Leaf], chunk_size: int) -> Iterator[tuple[int, int, int]]:
    for i, leaf in enumerate(leaves):
        if leaf.alias_of is not None:
            continue
        for start, end in chunk_spans(tensor_nbytes(leaf.tensor), chunk_size):
            yield i, start, end


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

    ``header`` holds the manifest's metadata fields (run, step, parent, created,
    message, metrics, config, meta, env). Nothing is visible unless this returns.
    """
    t0 = time.perf_counter()
    codec = get_codec(options.codec)
    save_id = f"{int(time.time()):x}{uuid.uuid4().hex[:20]}"
    leases.acquire(storage, save_id)
    packer = _Packer(storage, save_id, options.pack_size)
    try:
        # Refresh only after the lease exists: gc keeps the data of anything we see from here on.
        catalog.refresh()
        known: dict[str, ChunkLocation] = catalog.chunk_index()

        def work(task: tuple[int, int, int]) -> _Chunked:
            i, start, end = task
            raw = chunk_bytes(leaves[i].tensor, start, end)
            h = digest(raw)
            loc = known.get(h)
            if loc is not None:
                return _Chunked(i, h, end - start, None, "raw", loc)
            encoded = codec.encode(raw)
            if encoded is None:
                return _Chunked(i, h, end - start, raw, "raw")
            return _Chunked(i, h, end - start, encoded, codec.name)

        pack_index: dict[str, int] = {}
        records: list[ChunkRecord] = []
        record_of: dict[str, int] = {}
        per_leaf: dict[int, list[int]] = {}
        written = reused = new_chunks = reused_chunks = 0

        def place(c: _Chunked) -> None:
            nonlocal written, reused, new_chunks, reused_chunks
            idx = record_of.get(c.hash)
            if idx is None:
                if c.found is not None:
                    pkey, rec = c.found
                    reused += c.raw_len
                    reused_chunks += 1
                    pidx = pack_index.setdefault(pkey, len(pack_index))
                    rec = ChunkRecord(
                        rec.hash, rec.raw_len, rec.codec, pidx, rec.offset, rec.stored_len, rec.args
                    )
                else:
                    assert c.payload is not None  # a chunk the bank lacks always carries its bytes
                    pkey, offset = packer.append(c.payload)
                    written += len(c.payload)
                    new_chunks += 1
                    pidx = pack_index.setdefault(pkey, len(pack_index))
                    rec = ChunkRecord(c.hash, c.raw_len, c.codec, pidx, offset, len(c.payload))
                idx = record_of[c.hash] = len(records)
                records.append(rec)
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

        tensors = []
        for i, leaf in enumerate(leaves):
            tensors.append(
                TensorRecord(
                    name=leaf.name,
                    dtype=dtype_name(leaf.tensor.dtype, leaf.name),
                    shape=tuple(int(d) for d in leaf.tensor.shape),
                    chunks=tuple(per_leaf.get(i, [])) if leaf.alias_of is None else (),
                    alias_of=leaf.alias_of,
                    numpy=leaf.numpy,
                )
            )
        packs = [""] * len(pack_index)
        for key, pidx in pack_index.items():
            packs[pidx] = key
        manifest = Manifest(
            tree=spec,
            tensors=tuple(tensors),
            chunk_size=options.chunk_size,
            packs=tuple(packs),
            chunks=tuple(records),
            **header,
        )
        data = manifest.to_bytes()
        cid = digest(data)
        # The commit point: the manifest lands only after every pack is durable.
        storage.write(manifest_key(cid), data)
    except BaseException:
        packer.abort()
        with contextlib.suppress(Exception):
            leases.release(storage, save_id)
        raise
    with contextlib.suppress(Exception):
        leases.release(storage, save_id)
    catalog.add(cid, manifest)
    stats = SaveStats(
        written_bytes=written,
        reused_bytes=reused,
        new_chunks=new_chunks,
        reused_chunks=reused_chunks,
        packs=len(packer.committed),
        seconds=time.perf_counter() - t0,
        manifest_bytes=len(data),
    )
    return cid, manifest, stats
