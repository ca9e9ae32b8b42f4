"""Reading sharded tensors: whole ones assembled from their boxes, or just a region of one box.

A sharded tensor (format 2, see :mod:`weightbank.format.manifest`) is read
through :func:`~weightbank.bank.reader.read_tensors` unchanged: each box is
presented to it as an ordinary tensor of the box's shape (same chunks, same
verification, same memory maps), and the boxes are then copied into place in
the whole tensor. A region read (what a resharding ``torch.distributed``
load asks for: part of one stored box) reads only the chunks that overlap the
region's byte span, verifies them like any chunk, and returns a view of the
region in them.

Example:
    >>> import torch, weightbank as wb
    >>> bank = wb.open("memory://"); w = torch.arange(6.0).reshape(2, 3)
    >>> parts = [bank.save_part({"w": wb.TensorShard(w[:, i : i + 1], offsets=(0, i), shape=(2, 3))}) for i in range(3)]
    >>> torch.equal(bank.load(bank.commit(parts).id)["w"], w)
    True
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..format.dtypes import dtype_from_name, itemsize
from ..format.manifest import Manifest, ShardRecord, TensorRecord
from ..storage.base import Storage
from .reader import allocate, read_tensors

__all__ = [
    "Region",
    "iter_regions",
    "read_assembled",
    "read_regions",
    "region_of",
]

#: A region read batch holds at most about this many bytes of chunks at once.
_REGION_BATCH = 256 << 20


def _box_slices(offsets: tuple[int, ...], shape: tuple[int, ...]) -> tuple[slice, ...]:
    return tuple(slice(o, o + n) for o, n in zip(offsets, shape, strict=True))


def read_assembled(
    storage: Storage,
    cid: str,
    manifest: Manifest,
    indices: Sequence[int],
    *,
    device: torch.device | None = None,
    into: dict[int, torch.Tensor] | None = None,
    **kw: Any,
) -> dict[int, torch.Tensor]:
    """:func:`~weightbank.bank.reader.read_tensors`, with sharded tensors assembled whole.

    Same arguments (``kw``: workers, pool, cache...) and result: index →
    tensor (with ``into``, the given tensors, written only with verified bytes).
    """
    sharded = [i for i in indices if manifest.tensors[i].shards]
    if not sharded:
        return read_tensors(storage, cid, manifest, indices, device=device, into=into, **kw)
    # Each box becomes a tensor record of its own, appended to a private copy of the manifest.
    boxes: list[TensorRecord] = []
    owner: list[tuple[int, ShardRecord]] = []
    for i in sharded:
        rec = manifest.tensors[i]
        for s in rec.shards:
            boxes.append(
                TensorRecord(f"{rec.name}[{','.join(map(str, s.offsets))}]", rec.dtype, s.shape, s.chunks)
            )
            owner.append((i, s))
    first = len(manifest.tensors)
    view = dataclasses.replace(manifest, tensors=(*manifest.tensors, *boxes))
    plain = [i for i in indices if not manifest.tensors[i].shards]
    out: dict[int, torch.Tensor] = {}
    if into is not None:
        # A box of a target is a view of it: read_tensors verifies each box in scratch memory and copies
        # it into that view, so the target only ever holds verified bytes.
        targets = {
            first + k: into[i][_box_slices(s.offsets, s.shape)] for k, (i, s) in enumerate(owner) if i in into
        }
        plain_into = {i: t for i, t in into.items() if i in plain}
        read_tensors(storage, cid, view, [*plain, *targets], into={**plain_into, **targets}, **kw)
        return {i: into[i] for i in indices}
    loaded = read_tensors(storage, cid, view, [*plain, *range(first, first + len(boxes))], **kw)
    out.update({i: loaded[i] for i in plain})
    for i in sharded:
        rec = manifest.tensors[i]
        out[i] = allocate(rec.shape, dtype_from_name(rec.dtype))
    for k, (i, s) in enumerate(owner):
        if s.numel:
            out[i][_box_slices(s.offsets, s.shape)] = loaded[first + k]
    if device is not None and device.type != "cpu":
        out = {i: t.to(device) for i, t in out.items()}
    return {i: out[i] for i in indices}


@dataclass(frozen=True)
class Region:
    """Part of one stored box of a tensor: ``offsets`` and ``lengths`` are relative to the box."""

    tensor: int
    box: ShardRecord | None  # None: the tensor is stored whole
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]


def region_of(
    manifest: Manifest,
    index: int,
    box_offsets: Sequence[int] | None,
    offsets: Sequence[int],
    lengths: Sequence[int],
) -> Region:
    """The region of tensor ``index``'s box starting at ``box_offsets`` (KeyError if there is none)."""
    rec = manifest.tensors[index]
    name = rec.name
    if rec.alias_of is not None:
        index = rec.alias_of
        rec = manifest.tensors[index]
    box = None
    if rec.shards:
        want = tuple(int(o) for o in box_offsets or ())
        box = next((s for s in rec.shards if s.offsets == want), None)
        if box is None:
            raise KeyError(f"{name!r} has no shard at {list(want)}")
    shape = box.shape if box is not None else rec.shape
    offs, lens = tuple(int(o) for o in offsets), tuple(int(n) for n in lengths)
    if (
        len(offs) != len(shape)
        or len(lens) != len(shape)
        or any(o < 0 or n < 0 or o + n > d for o, n, d in zip(offs, lens, shape, strict=True))
    ):
        raise KeyError(f"region {list(offs)}+{list(lens)} lies outside {name!r}'s box {list(shape)}")
    return Region(index, box, offs, lens)


def _span(
    shape: tuple[int, ...], offsets: tuple[int, ...], lengths: tuple[int, ...]
) -> tuple[int, int, tuple[int, ...]]:
    """(first element, one past the last element, row-major strides) of a region of a box."""
    strides = [1] * len(shape)
    for d in range(len(shape) - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    if any(n == 0 for n in lengths):
        return 0, 0, tuple(strides)
    first = sum(o * st for o, st in zip(offsets, strides, strict=True))
    last = sum((o + n - 1) * st for o, n, st in zip(offsets, lengths, strides, strict=True))
    return first, last + 1, tuple(strides)


def iter_regions(
    storage: Storage,
    cid: str,
    manifest: Manifest,
    regions: Sequence[Region],
    **kw: Any,
) -> Iterator[tuple[int, torch.Tensor]]:
    """``(position in regions, tensor)`` for every region: views of freshly read, verified bytes.

    Only the chunks overlapping a region's byte span are read. Regions are
    read in batches of about 256 MiB of chunks (regions of one box in a batch
    share their reads), and a batch's tensors are yielded before the next is
    read, so a caller that copies them out holds one batch at a time.
    """
    plans: list[_Plan] = []
    for r in regions:
        rec = manifest.tensors[r.tensor]
        chunks = list(r.box.chunks if r.box is not None else rec.chunks)
        shape = r.box.shape if r.box is not None else rec.shape
        isz = itemsize(rec.dtype)
        first, end, strides = _span(shape, r.offsets, r.lengths)
        starts = []
        pos = 0
        for c in chunks:
            starts.append(pos)
            pos += manifest.chunks[c].raw_len
        lo, hi = first * isz, end * isz
        needed = [
            k for k, c in enumerate(chunks) if starts[k] < hi and starts[k] + manifest.chunks[c].raw_len > lo
        ]
        byte0 = starts[needed[0]] if needed else 0
        plans.append(_Plan(r, tuple(chunks[k] for k in needed), byte0, first, end - first, strides))
    batch: list[int] = []
    size = 0
    for n, plan in enumerate(plans):
        batch.append(n)
        size += sum(manifest.chunks[c].raw_len for c in plan.run)
        if size >= _REGION_BATCH or n == len(plans) - 1:
            yield from _read_batch(storage, cid, manifest, [plans[b] for b in batch], batch, kw)
            batch, size = [], 0


def read_regions(
    storage: Storage, cid: str, manifest: Manifest, regions: Sequence[Region], **kw: Any
) -> list[torch.Tensor]:
    """The tensors of ``regions``, in order (all held at once; see :func:`iter_regions`)."""
    out: list[torch.Tensor] = [torch.empty(0)] * len(regions)
    for n, t in iter_regions(storage, cid, manifest, regions, **kw):
        out[n] = t
    return out


@dataclass(frozen=True)
class _Plan:
    region: Region
    run: tuple[int, ...]  # the chunks to read (indices into the manifest's chunk table)
    byte0: int  # where the first of them starts in the box
    elem0: int  # the region's first element in the box
    elems: int  # elements from the region's first to its last, both included
    strides: tuple[int, ...]  # the box's row-major strides


def _read_batch(
    storage: Storage,
    cid: str,
    manifest: Manifest,
    plans: list[_Plan],
    where: list[int],
    kw: dict[str, Any],
) -> Iterator[tuple[int, torch.Tensor]]:
    # Each distinct run of chunks is presented to read_tensors as one uint8 tensor.
    records: list[TensorRecord] = []
    slot_of: dict[tuple[int, ...], int] = {}
    for p in plans:
        if p.run not in slot_of:
            slot_of[p.run] = len(records)
            nbytes = sum(manifest.chunks[c].raw_len for c in p.run)
            name = f"{manifest.tensors[p.region.tensor].name} (region)"
            records.append(TensorRecord(name, "uint8", (nbytes,), p.run))
    first = len(manifest.tensors)
    view = dataclasses.replace(manifest, tensors=(*manifest.tensors, *records))
    loaded = read_tensors(storage, cid, view, [first + k for k in range(len(records))], **kw)
    for p, n in zip(plans, where, strict=True):
        r = p.region
        rec = manifest.tensors[r.tensor]
        dtype = dtype_from_name(rec.dtype)
        if any(x == 0 for x in r.lengths):
            yield n, torch.empty(r.lengths, dtype=dtype)
            continue
        isz = itemsize(rec.dtype)
        # Cut the region's bytes out at its own first element: a chunk need not start on an element
        # boundary (a manifest may hold any chunk size), so the run's first byte may not either.
        lo = p.elem0 * isz - p.byte0
        span = loaded[first + slot_of[p.run]][lo : lo + p.elems * isz]
        if isz > 1 and span.storage_offset() % isz:
            span = span.clone()  # viewing bytes as a wider dtype needs an element-aligned start
        flat = span.view(dtype) if dtype != torch.uint8 else span
        yield n, flat.as_strided(r.lengths, p.strides, flat.storage_offset())
