"""The load pipeline: parallel ranged reads straight into destination tensors, every chunk verified.

For a fresh load each destination tensor is allocated once and every chunk is
read by a worker thread directly into its byte range (raw codec) or decoded
into it (other codecs; a delta chunk's whole chain is decoded in plane space
and merged once, see :mod:`weightbank.format.delta`); the bytes are then
hashed in place and compared with the chunk's content hash — for a delta that
one hash covers every link, since any damaged link changes the result. On a
mismatch CorruptObject is raised and the tensor is never handed out.

When a tensor's chunks lie raw and back to back in a pack on a local disk, the
tensor is instead a private (copy-on-write) memory map of those bytes: the
page cache already holds them, and faulting fresh anonymous memory costs more
than reading the file. The mapped bytes are hashed just the same before the
tensor is returned; writes to it never reach the pack.

Loading ``into=`` existing tensors (a module's parameters) must not leave
unverified bytes in them, so tensors are first loaded and verified in scratch
memory, a bounded group at a time, and only then copied into place.

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
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from ..errors import CorruptObject, DeviceError, MissingObject
from ..format.chunking import byte_view
from ..format.dtypes import dtype_from_name
from ..format.hashing import digest
from ..format.manifest import ChunkRecord, Manifest, TensorRecord
from ..storage.base import Storage
from .chunks import decode_record, records_by_hash

__all__ = ["check_device", "read_tensors"]

_SCRATCH_GROUP = 256 << 20
#: Tensors at least this big are mapped from local packs instead of copied.
_MMAP_MIN = 64 << 10


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
) -> None:
    key = manifest.packs[rec.pack]
    if rec.codec == "raw":
        try:
            n = storage.read_into(key, rec.offset, out)
        except MissingObject as e:
            raise MissingObject(key, f"needed by checkpoint {cid[:12]} tensor {name!r}") from e
        if n != rec.raw_len:
            raise CorruptObject(
                key, checkpoint=cid, tensor=name, detail=f"pack is truncated at offset {rec.offset}"
            )
    else:
        try:
            decode_record(storage, manifest.packs, index, rec, out)
        except MissingObject as e:
            raise MissingObject(e.key, f"needed by checkpoint {cid[:12]} tensor {name!r}") from e
        except CorruptObject as e:
            raise CorruptObject(e.key, checkpoint=cid, tensor=name, detail=str(e.args[0])) from None
    actual = digest(out)
    if actual != rec.hash:
        raise CorruptObject(key, expected=rec.hash, actual=actual, checkpoint=cid, tensor=name)


def _empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if dtype == torch.complex32:
        with warnings.catch_warnings():
            # torch flags complex32 as experimental on allocation; the bytes are all we need.
            warnings.filterwarnings("ignore", message="ComplexHalf support is experimental")
            return torch.empty(shape, dtype=dtype)
    return torch.empty(shape, dtype=dtype)


def _map_tensor(storage: Storage, manifest: Manifest, rec: TensorRecord) -> torch.Tensor | None:
    """A copy-on-write mmap view of the tensor's bytes in its pack, when they lie there raw and in one run.

    The mapping covers only this tensor (plus page alignment), so the tensor's
    storage is its own: ``torch.save`` of it writes the tensor, not the pack.
    """
    if rec.nbytes < _MMAP_MIN or rec.alias_of is not None:
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


def _verify_chunk(key: str, cid: str, name: str, rec: ChunkRecord, view: memoryview) -> None:
    actual = digest(view)
    if actual != rec.hash:
        raise CorruptObject(key, expected=rec.hash, actual=actual, checkpoint=cid, tensor=name)


def _load_fresh(
    storage: Storage,
    cid: str,
    manifest: Manifest,
    indices: Sequence[int],
    pool: ThreadPoolExecutor,
    *,
    allow_mmap: bool = True,
) -> dict[int, torch.Tensor]:
    out: dict[int, torch.Tensor] = {}
    futures = []
    index = records_by_hash(manifest)
    for i in indices:
        rec = manifest.tensors[i]
        mapped = _map_tensor(storage, manifest, rec) if allow_mmap else None
        t = mapped if mapped is not None else _empty(rec.shape, dtype_from_name(rec.dtype))
        out[i] = t
        if rec.numel == 0:
            continue
        arr: Any = byte_view(t).numpy()
        view = memoryview(arr).cast("B")
        pos = 0
        for c in rec.chunks:
            chunk = manifest.chunks[c]
            dest = view[pos : pos + chunk.raw_len]
            if mapped is not None:
                key = manifest.packs[chunk.pack]
                futures.append(pool.submit(_verify_chunk, key, cid, rec.name, chunk, dest))
            else:
                futures.append(pool.submit(_fill_chunk, storage, cid, manifest, rec.name, chunk, dest, index))
            pos += chunk.raw_len
    for f in futures:
        f.result()
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
) -> dict[int, torch.Tensor]:
    """Load the tensors at ``indices`` (aliases share their base's tensor).

    With ``into`` (index → existing tensor) bytes are verified before they are
    copied into place; the returned dict then maps to those same tensors.
    ``pool`` lets a long-lived caller reuse its worker threads (a small swap
    then costs no thread start-up); without it a pool of ``workers`` is made.
    """
    bases = sorted({_base(manifest, i) for i in indices})
    with contextlib.ExitStack() as stack:
        if pool is None:
            pool = stack.enter_context(
                ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="wb-load")
            )
        if into is None:
            loaded = _load_fresh(storage, cid, manifest, bases, pool)
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
                    scratch = _load_fresh(storage, cid, manifest, group, pool)
                    with torch.no_grad():
                        for j, t in scratch.items():
                            into[j].copy_(t)
                            loaded[j] = into[j]
                    group, size = [], 0
    return {i: loaded[_base(manifest, i)] for i in indices}


def _base(manifest: Manifest, i: int) -> int:
    alias = manifest.tensors[i].alias_of
    return i if alias is None else alias
