"""Cutting tensors into fixed-size byte chunks, without copying contiguous CPU tensors.

A tensor's bytes are its elements in row-major order, native little-endian.
Chunk ``i`` covers bytes ``[i*chunk_size, (i+1)*chunk_size)``; the chunk size is a
multiple of every itemsize, so a boundary never splits an element.

Contiguous CPU tensors are chunked as zero-copy memoryviews. Non-contiguous or
device tensors are materialized one chunk (plus at most two rows) at a time, so
a save never holds a second copy of a large tensor.

Example:
    >>> import torch
    >>> from weightbank.format.chunking import chunk_spans, chunk_bytes
    >>> chunk_spans(10, 4)
    [(0, 4), (4, 8), (8, 10)]
    >>> bytes(chunk_bytes(torch.arange(4, dtype=torch.uint8), 1, 3))
    b'\\x01\\x02'
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["DEFAULT_CHUNK_SIZE", "byte_view", "chunk_bytes", "chunk_spans", "tensor_nbytes"]

#: 4 MiB: large enough that per-chunk overhead vanishes, small enough to dedup and delta well.
DEFAULT_CHUNK_SIZE = 4 << 20


def tensor_nbytes(t: torch.Tensor) -> int:
    """Bytes of the tensor's logical content (``numel * itemsize``)."""
    return t.numel() * t.element_size()


def chunk_spans(nbytes: int, chunk_size: int) -> list[tuple[int, int]]:
    """Byte ranges of the chunks of an ``nbytes`` tensor (empty tensor: no chunks)."""
    return [(o, min(o + chunk_size, nbytes)) for o in range(0, nbytes, chunk_size)]


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A flat ``uint8`` view of a contiguous tensor's bytes (same device, no copy)."""
    flat = t.reshape(-1)
    if flat.numel() == 1 and flat.stride(0) != 1:
        # torch calls a tensor contiguous whatever the strides of its size-1
        # dims, so a one-element view can flatten to stride != 1.
        flat = flat.as_strided((1,), (1,))
    if flat.dtype == torch.uint8:
        return flat
    return flat.view(torch.uint8)


def _to_numpy_bytes(u8: torch.Tensor) -> memoryview:
    if u8.device.type != "cpu":
        u8 = u8.cpu()
    arr: Any = u8.numpy()
    return memoryview(arr).cast("B")


def chunk_bytes(t: torch.Tensor, start: int, end: int) -> memoryview:
    """The bytes ``[start, end)`` of ``t`` as a CPU memoryview (zero-copy when possible)."""
    if t.is_contiguous():
        return _to_numpy_bytes(byte_view(t)[start:end])
    isz = t.element_size()
    first, last = start // isz, end // isz
    if t.dim() == 0:  # pragma: no cover - 0-dim tensors are always contiguous
        return _to_numpy_bytes(byte_view(t.contiguous())[start:end])
    row = t.numel() // t.shape[0] if t.shape[0] else 1
    r0, r1 = first // row, (last - 1) // row + 1
    piece = t[r0:r1].contiguous().reshape(-1)[first - r0 * row : last - r0 * row]
    return _to_numpy_bytes(byte_view(piece))
