"""Per-tensor differences between two checkpoints.

Chunk hashes decide most of it without reading data: a tensor whose chunks are
all identical is ``same`` at no cost; only tensors with differing chunks are
loaded to measure the change (max |a-b| and ||a-b|| / ||a||).

Example:
    >>> import torch, weightbank as wb
    >>> bank = wb.open("memory://")
    >>> a = bank.save({"w": torch.zeros(3), "b": torch.ones(2)}, run="r", step=1).id
    >>> b = bank.save({"w": torch.ones(3), "b": torch.ones(2)}, run="r", step=2).id
    >>> [(t.name, t.status) for t in bank.diff(a, b).tensors]
    [('b', 'same'), ('w', 'changed')]
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..format.jsonsafe import decode
from ..format.manifest import Manifest, TensorRecord
from .results import DiffResult, TensorDiff

__all__ = ["diff_manifests"]

Loader = Callable[[str, Manifest, list[int]], dict[int, torch.Tensor]]


def _hashes(m: Manifest, t: TensorRecord) -> list[str]:
    base = m.tensors[t.alias_of] if t.alias_of is not None else t
    return [m.chunks[c].hash for c in base.chunks]


def _boxes(m: Manifest, t: TensorRecord) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """How a tensor is cut into stored boxes (empty: stored whole)."""
    base = m.tensors[t.alias_of] if t.alias_of is not None else t
    return [(s.offsets, s.shape) for s in base.shards]


def _measure(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    if a.numel() == 0:
        return 0.0, 0.0
    if a.dtype == torch.bool or (not (a.is_floating_point() or a.is_complex()) and a.dtype.itemsize < 2):
        a, b = a.to(torch.int64), b.to(torch.int64)
    wide = torch.complex128 if a.is_complex() else torch.float64
    try:
        da, db = a.to(wide), b.to(wide)
    except (RuntimeError, TypeError):  # float8/bits types without conversion kernels
        return math.nan, math.nan
    delta = (db - da).abs()
    max_abs = float(delta.max())
    norm = float(torch.linalg.vector_norm(da))
    rel = float(torch.linalg.vector_norm(db - da)) / norm if norm > 0 else (0.0 if max_abs == 0 else math.inf)
    return max_abs, rel


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return (
        bool(torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8)))
        if a.numel()
        else True
    )


def diff_manifests(a_id: str, a: Manifest, b_id: str, b: Manifest, load: Loader) -> DiffResult:
    """Compare checkpoint ``a`` (old) with ``b`` (new); ``load`` reads tensors by index."""
    ta = {t.name: i for i, t in enumerate(a.tensors)}
    tb = {t.name: i for i, t in enumerate(b.tensors)}
    out: list[TensorDiff] = []
    to_measure: list[tuple[str, int, int]] = []
    differing = 0
    for name in sorted(set(ta) | set(tb)):
        if name not in tb:
            r = a.tensors[ta[name]]
            out.append(TensorDiff(name, "removed", r.dtype, r.shape, differing_bytes=r.nbytes))
            differing += r.nbytes
            continue
        rb = b.tensors[tb[name]]
        if name not in ta:
            out.append(TensorDiff(name, "added", rb.dtype, rb.shape, differing_bytes=rb.nbytes))
            differing += rb.nbytes
            continue
        ra = a.tensors[ta[name]]
        if (ra.dtype, ra.shape) != (rb.dtype, rb.shape):
            out.append(TensorDiff(name, "retyped", rb.dtype, rb.shape, differing_bytes=rb.nbytes))
            differing += rb.nbytes
            continue
        ha, hb = _hashes(a, ra), _hashes(b, rb)
        base_b = b.tensors[rb.alias_of] if rb.alias_of is not None else rb
        if _boxes(a, ra) != _boxes(b, rb):
            # Stored in other boxes (saved at another world size): only the bytes can tell.
            to_measure.append((name, ta[name], tb[name]))
            out.append(TensorDiff(name, "changed", rb.dtype, rb.shape, differing_bytes=rb.nbytes))
            differing += rb.nbytes
            continue
        if ha == hb:
            out.append(TensorDiff(name, "same", rb.dtype, rb.shape))
            continue
        nbytes = sum(b.chunks[c].raw_len for c, x, y in zip(base_b.chunks, ha, hb, strict=True) if x != y)
        differing += nbytes
        to_measure.append((name, ta[name], tb[name]))
        out.append(TensorDiff(name, "changed", rb.dtype, rb.shape, differing_bytes=nbytes))
    if to_measure:
        la = load(a_id, a, [i for _, i, _ in to_measure])
        lb = load(b_id, b, [j for _, _, j in to_measure])
        measured = {name: _measure(la[i], lb[j]) for name, i, j in to_measure}
        equal = {name for name, i, j in to_measure if _bitwise_equal(la[i], lb[j])}
        differing -= sum(d.differing_bytes for d in out if d.name in equal)
        out = [
            TensorDiff(d.name, "same", d.dtype, d.shape)
            if d.name in equal
            else TensorDiff(
                d.name, d.status, d.dtype, d.shape, *measured[d.name], differing_bytes=d.differing_bytes
            )
            if d.name in measured
            else d
            for d in out
        ]
    ma, mb = decode(a.metrics), decode(b.metrics)
    metrics = {k: (ma.get(k), mb.get(k)) for k in sorted(set(ma) | set(mb)) if ma.get(k) != mb.get(k)}
    return DiffResult(
        a=a_id, b=b_id, tensors=tuple(out), differing_bytes=differing, total_bytes=b.nbytes, metrics=metrics
    )
