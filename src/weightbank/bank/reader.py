"""The load pipeline: parallel ranged reads straight into destination tensors, every chunk verified.

For a fresh load each destination tensor is allocated once and every chunk is
read by a worker thread directly into its byte range (raw codec) or decoded
into it (other codecs; a delta chunk's whole chain is decoded in plane space
and merged once, see :mod:`weightbank.format.delta`); the bytes are then
hashed in place and compared with the chunk's content hash — for a delta that
one hash covers every link, since any damaged link changes the result. On a
mismatch CorruptObject is raised and the tensor is never handed out. With
``verify="once"`` a chunk this process verified from the same, unchanged
local files is not hashed again; ``"never"`` hashes nothing (see
:mod:`weightbank.bank.trust`).

When a tensor's chunks lie raw and back to back in a pack on a local disk, the
tensor is instead a private (copy-on-write) memory map of those bytes: the
page cache already holds them, and faulting fresh anonymous memory costs more
than reading the file. The mapped bytes are hashed just the same before the
tensor is returned; writes to it never reach the pack.

Loading ``into=`` existing tensors (a module's parameters) must not leave
unverified bytes in them, so tensors are first loaded and verified in scratch
memory, a bounded group at a time, and only then copied into place.

A remote bank has a local :class:`~weightbank.storage.diskcache.DiskCache`:
a chunk is looked up there first (by its hash, read straight into place, and
verified like any other read; a damaged entry is discarded and the chunk
fetched again), and every chunk fetched from storage is put there once
verified. The cache holds decoded chunks, so a cached delta chunk costs one
local read; a delta chunk that is not cached starts from the newest link of
its chain that is, reading only the links above it.

Example:
    >>> import torch, weightbank as wb
    >>> bank = wb.open("memory://")
    >>> cid = bank.save({"w": torch.arange(3.0)}).id
    >>> bank.load(cid)["w"].tolist()
    [0.0, 1.0, 2.0]
"""

from __future__ import annotations

import contextlib
import mmap
import os
import warnings
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import partial
from typing import Any, cast

import torch

from ..errors import BudgetExceeded, CorruptObject, DeviceError, MissingObject
from ..format.chunking import byte_view
from ..format.delta import DELTA, Link, decode_chain
from ..format.dtypes import dtype_from_name
from ..format.hashing import digest
from ..format.manifest import ChunkRecord, Manifest, TensorRecord
from ..storage.base import Storage
from ..storage.diskcache import DiskCache
from .chunks import chain_of, decode_record, read_chain, records_by_hash
from .spans import SpanReads
from .trust import TRUSTED, Evidence, Verify, file_ids

__all__ = ["allocate", "check_device", "check_fits", "physical_memory", "prefetch_chunks", "read_tensors"]

_SCRATCH_GROUP = 256 << 20
#: Tensors at least this big are mapped from local packs instead of copied.
_MMAP_MIN = 64 << 10
#: Chunks smaller than this are read on the calling thread (after the big ones are handed out):
#: a worker hand-off costs about what reading such a chunk from the page cache does.
_INLINE_MAX = 256 << 10


def check_device(device: str | torch.device | None) -> torch.device:
    """Parse ``device`` and make sure it exists here; DeviceError if not."""
    if device is None:
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"invalid device {device!r}: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} requested but CUDA is not available in this process")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(
                f"device {device!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    elif dev.type == "mps":
        if not torch.backends.mps.is_available():
            raise DeviceError(f"device {device!r} requested but MPS is not available")
    elif dev.type != "cpu":
        raise DeviceError(f"device type {dev.type!r} is not supported (use cpu or cuda)")
    return dev


def _fill_chunk(
    storage: Storage,
    cid: str,
    manifest: Manifest,
    name: str,
    rec: ChunkRecord,
    out: memoryview,
    index: dict[str, ChunkRecord],
    cache: DiskCache | None = None,
    verify: Verify = "always",
) -> None:
    if cache is not None:
        entry = cache.entry_path(rec.hash) if verify == "once" else None
        before = None if entry is None else file_ids([entry])
        if cache.read_into(rec.hash, out):
            token = (rec.hash, "cache")
            if _checked(out, rec.hash, verify, token, [entry] if entry else None, before):
                return
            cache.discard(rec.hash)  # damaged: fetch it again below, and repair the entry
    _fetch_chunk(storage, cid, manifest, name, rec, out, index, cache, verify)
    if cache is not None:
        cache.put(rec.hash, out)


def _checked(
    out: memoryview,
    expected: str,
    verify: Verify,
    token: object,
    paths: list[str] | None,
    before: Evidence | None,
) -> bool:
    """Whether ``out`` (just read from ``paths``) holds chunk ``expected``: hashed, unless ``verify`` trusts it.

    With ``"once"`` a chunk verified before from the same files, unchanged
    since, is trusted; one that hashes right now is remembered (when the
    files did not change around the read).
    """
    if verify == "never":
        return True
    after = file_ids(paths) if verify == "once" and paths else None
    if after is not None and TRUSTED.trusted(token, after):
        return True
    if digest(out) != expected:
        return False
    if after is not None:
        TRUSTED.remember(token, before, after)
    return True


def _sources(storage: Storage, manifest: Manifest, chain: Sequence[ChunkRecord]) -> list[str] | None:
    """The local files a chunk's chain is read from (None when any is not a local file)."""
    if not storage.properties.local_files:
        return None
    paths = []
    for c in chain:
        path = storage.local_path(manifest.packs[c.pack])
        if path is None:
            return None
        paths.append(str(path))
    return paths


def _token(manifest: Manifest, chain: Sequence[ChunkRecord]) -> tuple[object, ...]:
    """What a verified chunk is remembered by: its hash and where and how each link of its chain is read."""
    return (
        chain[-1].hash,
        tuple((manifest.packs[c.pack], c.offset, c.stored_len, c.raw_len, c.codec, c.args) for c in chain),
    )


def _fetch_chunk(
    storage: Storage,
    cid: str,
    manifest: Manifest,
    name: str,
    rec: ChunkRecord,
    out: memoryview,
    index: dict[str, ChunkRecord],
    cache: DiskCache | None,
    verify: Verify = "always",
) -> None:
    """Read or decode chunk ``rec`` from storage into ``out`` and verify it (a cached delta base shortens the chain)."""
    key = manifest.packs[rec.pack]
    paths: list[str] | None = None
    before: Evidence | None = None
    token: tuple[object, ...] = ()
    if verify == "once":
        chain = chain_of(rec, index, key) if rec.codec == DELTA else [rec]
        paths = _sources(storage, manifest, chain)
        before = None if paths is None else file_ids(paths)
        token = _token(manifest, chain)
    if rec.codec == "raw":
        _read_raw(storage, cid, key, name, rec, out)
    else:
        try:
            if cache is None or not _decode_from_cached_base(storage, manifest.packs, index, rec, out, cache):
                decode_record(storage, manifest.packs, index, rec, out)
        except MissingObject as e:
            raise MissingObject(e.key, f"needed by checkpoint {cid[:12]} tensor {name!r}") from e
        except CorruptObject as e:
            raise CorruptObject(e.key, checkpoint=cid, tensor=name, detail=e.detail or str(e)) from None
    if not _checked(out, rec.hash, verify, token, paths, before):
        raise CorruptObject(key, expected=rec.hash, actual=digest(out), checkpoint=cid, tensor=name)


def _decode_from_cached_base(
    storage: Storage,
    packs: Sequence[str],
    index: dict[str, ChunkRecord],
    rec: ChunkRecord,
    out: memoryview,
    cache: DiskCache,
) -> bool:
    """Decode delta chunk ``rec`` from the newest link of its chain the cache holds; False if it holds none.

    The cached base is verified before use, so a damaged entry is discarded
    rather than decoded against; the caller hashes the result as always.
    """
    if rec.codec != DELTA:
        return False
    key = packs[rec.pack]
    chain = chain_of(rec, index, key)
    for j in range(len(chain) - 2, -1, -1):
        base = chain[j]
        if base.raw_len != rec.raw_len or not cache.contains(base.hash, base.raw_len):
            continue
        scratch = bytearray(base.raw_len)
        if not cache.read_into(base.hash, memoryview(scratch)):
            continue
        if digest(scratch) != base.hash:
            cache.discard(base.hash)
            continue
        links: list[Link] = [("raw", memoryview(scratch)), *read_chain(storage, packs, chain[j + 1 :])]
        try:
            decode_chain(links, None, out)
        except CorruptObject as e:
            raise CorruptObject(key, detail=f"{e.detail or e} (delta chain above a cached base)") from None
        return True
    return False


def prefetch_chunks(
    storage: Storage,
    cache: DiskCache,
    cid: str,
    manifest: Manifest,
    indices: Sequence[int],
    pool: ThreadPoolExecutor,
) -> tuple[int, int, int]:
    """Fetch and verify the chunks of the tensors at ``indices`` into ``cache``, making no tensor.

    Returns raw bytes (fetched now, already cached, fetched but not kept by the cache).
    """
    index = records_by_hash(manifest)
    todo: dict[str, tuple[str, ChunkRecord]] = {}
    for i in sorted({_base(manifest, i) for i in indices}):
        rec = manifest.tensors[i]
        for c in rec.chunks:
            todo.setdefault(manifest.chunks[c].hash, (rec.name, manifest.chunks[c]))

    def one(name: str, chunk: ChunkRecord) -> tuple[int, int, int]:
        n = chunk.raw_len
        if cache.contains(chunk.hash, n):
            return 0, n, 0
        buf = bytearray(n)
        _fetch_chunk(storage, cid, manifest, name, chunk, memoryview(buf), index, cache)
        return (n, 0, 0) if cache.put(chunk.hash, buf) else (n, 0, n)

    futures = [pool.submit(one, name, chunk) for name, chunk in todo.values()]
    results = [f.result() for f in futures]
    return sum(r[0] for r in results), sum(r[1] for r in results), sum(r[2] for r in results)


def physical_memory() -> int | None:
    """Bytes of RAM this machine has, where the OS says (None elsewhere)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def check_fits(cid: str, manifest: Manifest, indices: Sequence[int]) -> None:
    """BudgetExceeded before anything is allocated when the tensors to load outgrow this machine's RAM.

    A manifest says how big its tensors are; a damaged or crafted one can say
    anything (all-zero chunks compress to nothing, so the packs' sizes do not
    bound it), and allocating it would fail untyped, or worse, overcommit.
    """
    ram = physical_memory()
    needed = sum(manifest.tensors[i].nbytes for i in {_base(manifest, i) for i in indices})
    if ram is not None and needed > ram:
        raise BudgetExceeded(
            "host", needed=needed, used=0, budget=ram, ref=cid, transient=False,
            detail="the tensors asked for are larger than this machine's memory",
        )  # fmt: skip


def allocate(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialized CPU tensor; BudgetExceeded (not the allocator's RuntimeError) when it cannot be had."""
    try:
        if dtype == torch.complex32:
            with warnings.catch_warnings():
                # torch flags complex32 as experimental on allocation; the bytes are all we need.
                warnings.filterwarnings("ignore", message="ComplexHalf support is experimental")
                return torch.empty(shape, dtype=dtype)
        return torch.empty(shape, dtype=dtype)
    except RuntimeError as e:  # the allocator's failure is a RuntimeError
        nbytes = dtype.itemsize
        for d in shape:
            nbytes *= d
        raise BudgetExceeded(
            "host", needed=nbytes, used=0, budget=physical_memory() or 0, transient=True,
            detail=f"allocating a {list(shape)} {dtype} tensor failed ({str(e).splitlines()[0][:120]})",
        ) from None  # fmt: skip


def _map_tensor(storage: Storage, manifest: Manifest, rec: TensorRecord) -> torch.Tensor | None:
    """A copy-on-write mmap view of the tensor's bytes in its pack, when they lie there raw and in one run.

    The mapping covers only this tensor (plus page alignment), so the tensor's
    storage is its own: ``torch.save`` of it writes the tensor, not the pack.
    """
    if rec.nbytes < _MMAP_MIN or rec.alias_of is not None or not storage.properties.local_files:
        return None
    chunks = [manifest.chunks[c] for c in rec.chunks]
    if any(c.codec != "raw" or c.pack != chunks[0].pack for c in chunks):
        return None
    start = chunks[0].offset
    pos = start
    for c in chunks:
        if c.offset != pos:
            return None
        pos += c.raw_len
    key = manifest.packs[chunks[0].pack]
    path = storage.local_path(key)
    if path is None:
        return None
    base = start - start % mmap.ALLOCATIONGRANULARITY
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_size < pos:
                return None  # truncated: the copy path reports it with names
            mapped = mmap.mmap(
                f.fileno(),
                pos - base,
                flags=mmap.MAP_PRIVATE,
                prot=mmap.PROT_READ | mmap.PROT_WRITE,
                offset=base,
            )
    except FileNotFoundError:
        return None
    dtype = dtype_from_name(rec.dtype)
    flat = torch.frombuffer(mapped, dtype=torch.uint8, count=rec.nbytes, offset=start - base)
    return flat.view(dtype).reshape(rec.shape) if dtype != torch.uint8 else flat.reshape(rec.shape)


def _verify_chunk(
    key: str,
    cid: str,
    name: str,
    rec: ChunkRecord,
    view: memoryview,
    verify: Verify = "always",
    path: str | None = None,
    before: Evidence | None = None,
    token: tuple[object, ...] = (),
) -> None:
    """Check a chunk of a tensor mapped from ``path`` (its identity looked at before mapping: ``before``)."""
    if not _checked(view, rec.hash, verify, token, None if path is None else [path], before):
        raise CorruptObject(key, expected=rec.hash, actual=digest(view), checkpoint=cid, tensor=name)


def _later(
    inline: list[Callable[[], None]],
    futures: list[Future[None]],
    pool: ThreadPoolExecutor,
    chunk: ChunkRecord,
    job: Callable[[], None],
) -> None:
    """Queue ``job``: on the calling thread for a small chunk, else on a worker now."""
    if chunk.raw_len < _INLINE_MAX:
        inline.append(job)
    else:
        futures.append(pool.submit(job))


def _read_raw(storage: Storage, cid: str, key: str, name: str, rec: ChunkRecord, out: memoryview) -> None:
    """Read raw chunk ``rec`` into ``out`` (not hashed: the caller decides)."""
    try:
        n = storage.read_into(key, rec.offset, out)
    except MissingObject as e:
        raise MissingObject(key, f"needed by checkpoint {cid[:12]} tensor {name!r}") from e
    if n != rec.raw_len:
        raise CorruptObject(
            key, checkpoint=cid, tensor=name, detail=f"pack is truncated at offset {rec.offset}"
        )


def _load_fresh(
    storage: Storage,
    cid: str,
    manifest: Manifest,
    indices: Sequence[int],
    pool: ThreadPoolExecutor,
    *,
    allow_mmap: bool = True,
    cache: DiskCache | None = None,
    verify: Verify = "always",
) -> dict[int, torch.Tensor]:
    out: dict[int, torch.Tensor] = {}
    futures: list[Future[None]] = []
    inline: list[Callable[[], None]] = []
    index = records_by_hash(manifest)
    # Small chunks are read on this thread; their reads are merged into a few span reads first.
    spans = SpanReads(storage)
    small = cast(Storage, spans)

    def want(chunk: ChunkRecord) -> None:
        if chunk.raw_len >= _INLINE_MAX or (cache is not None and cache.contains(chunk.hash, chunk.raw_len)):
            return
        try:
            chain = chain_of(chunk, index, manifest.packs[chunk.pack]) if chunk.codec == DELTA else [chunk]
        except CorruptObject:
            return  # the chunk's own read reports it
        if cache is not None:  # a cached base shortens the chain (_decode_from_cached_base)
            for j in range(len(chain) - 2, -1, -1):
                if chain[j].raw_len == chunk.raw_len and cache.contains(chain[j].hash, chunk.raw_len):
                    chain = chain[j + 1 :]
                    break
        for link in chain:
            spans.want(manifest.packs[link.pack], link.offset, link.stored_len)

    # verify="once", chunks read straight from a local pack (mapped, or raw): each pack file's
    # identity is looked at once before and once after the whole load; chunks trusted under the
    # first look are hashed after all if the two differ.
    paths: dict[str, str | None] = {}
    before: dict[str, Evidence | None] = {}
    trusted: dict[str, list[tuple[str, str, memoryview]]] = {}
    for i in indices:
        rec = manifest.tensors[i]
        mapped = _map_tensor(storage, manifest, rec) if allow_mmap else None
        t = mapped if mapped is not None else allocate(rec.shape, dtype_from_name(rec.dtype))
        out[i] = t
        if rec.numel == 0:
            continue
        arr: Any = byte_view(t).numpy()
        view = memoryview(arr).cast("B")
        pos = 0
        for c in rec.chunks:
            chunk = manifest.chunks[c]
            dest = view[pos : pos + chunk.raw_len]
            pos += chunk.raw_len
            key = manifest.packs[chunk.pack]
            path = None
            token = _token(manifest, [chunk]) if verify == "once" else ()
            if verify == "once" and (mapped is not None or (chunk.codec == "raw" and cache is None)):
                if key not in paths:
                    local = storage.local_path(key)
                    paths[key] = None if local is None else str(local)
                    before[key] = None if local is None else file_ids([str(local)])
                path = paths[key]
                if TRUSTED.trusted(token, before[key]):
                    trusted.setdefault(key, []).append((rec.name, chunk.hash, dest))
                    if mapped is None:  # read it, unhashed: checked after the load as the mapped ones are
                        want(chunk)
                        src = small if chunk.raw_len < _INLINE_MAX else storage
                        _later(
                            inline,
                            futures,
                            pool,
                            chunk,
                            partial(_read_raw, src, cid, key, rec.name, chunk, dest),
                        )
                    continue
            if mapped is None:
                want(chunk)
                src = small if chunk.raw_len < _INLINE_MAX else storage
                job = partial(_fill_chunk, src, cid, manifest, rec.name, chunk, dest, index, cache, verify)
                _later(inline, futures, pool, chunk, job)
                continue
            if verify == "never":
                continue
            futures.append(
                pool.submit(
                    _verify_chunk, key, cid, rec.name, chunk, dest, verify, path, before.get(key), token,
                )
            )  # fmt: skip
    spans.fetch()
    for run in inline:
        run()
    for f in futures:
        f.result()
    for key, chunks in trusted.items():
        path = paths[key]
        if path is None or file_ids([path]) != before[key]:
            for name, h, dest in chunks:  # the file changed during the load: trust nothing of it
                actual = digest(dest)
                if actual != h:
                    raise CorruptObject(key, expected=h, actual=actual, checkpoint=cid, tensor=name)
    return out


def read_tensors(
    storage: Storage,
    cid: str,
    manifest: Manifest,
    indices: Sequence[int],
    *,
    workers: int = 4,
    device: torch.device | None = None,
    into: dict[int, torch.Tensor] | None = None,
    pool: ThreadPoolExecutor | None = None,
    cache: DiskCache | None = None,
    verify: Verify = "always",
) -> dict[int, torch.Tensor]:
    """Load the tensors at ``indices`` (aliases share their base's tensor).

    With ``into`` (index → existing tensor) bytes are verified before they are
    copied into place; the returned dict then maps to those same tensors.
    ``pool`` lets a long-lived caller reuse its worker threads (a small swap
    then costs no thread start-up); without it a pool of ``workers`` is made.
    ``cache``: the bank's local disk cache, read first and filled as chunks arrive.
    ``verify``: ``"always"`` hashes every chunk, ``"once"`` trusts a chunk this
    process verified from the same unchanged local files, ``"never"`` hashes
    nothing (:mod:`weightbank.bank.trust`).
    """
    bases = sorted({_base(manifest, i) for i in indices})
    check_fits(cid, manifest, bases)
    with contextlib.ExitStack() as stack:
        if pool is None:
            pool = stack.enter_context(
                ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="wb-load")
            )
        if into is None:
            loaded = _load_fresh(storage, cid, manifest, bases, pool, cache=cache, verify=verify)
            if device is not None and device.type != "cpu":
                loaded = {i: t.to(device) for i, t in loaded.items()}
        else:
            loaded = {}
            group: list[int] = []
            size = 0
            targets = [i for i in bases if i in into]
            for n, i in enumerate(targets):
                group.append(i)
                size += manifest.tensors[i].nbytes
                if size >= _SCRATCH_GROUP or n == len(targets) - 1:
                    scratch = _load_fresh(storage, cid, manifest, group, pool, cache=cache, verify=verify)
                    with torch.no_grad():
                        for j, t in scratch.items():
                            into[j].copy_(t)
                            loaded[j] = into[j]
                    group, size = [], 0
    return {i: loaded[_base(manifest, i)] for i in indices}


def _base(manifest: Manifest, i: int) -> int:
    alias = manifest.tensors[i].alias_of
    return i if alias is None else alias
