"""Moving pooled tensors between tiers: device ↔ host (pinned when the device is CUDA).

Demotion copies a device tensor into host memory (page-locked on CUDA, so a
later promotion is one fast DMA copy, never a decode or a hash); promotion
copies it back. When the device *is* the CPU both tiers live in the same
memory and moving between them is free: the same tensor object changes tier
and nothing is copied. :data:`OutOfMemoryError` is the class a device raises
when it runs out of memory, on every torch the package supports.

Example:
    >>> import torch
    >>> from weightbank.serving.tiers import parse_device, to_host, to_device
    >>> dev = parse_device("cpu"); t = torch.ones(3)
    >>> to_device(to_host(t, dev), dev) is t
    True
"""

from __future__ import annotations

from typing import Final

import torch

from ..errors import DeviceError

__all__ = [
    "OutOfMemoryError",
    "out_of_memory_error",
    "parse_device",
    "release_device_memory",
    "to_device",
    "to_host",
]


def out_of_memory_error() -> type[RuntimeError]:
    """The class torch raises when a device runs out of memory, whatever the torch version.

    ``torch.OutOfMemoryError`` exists from torch 2.5 (raised by every device, and
    ``torch.cuda.OutOfMemoryError`` is then the same class); older releases the
    package supports have only ``torch.cuda.OutOfMemoryError``. Naming
    ``torch.OutOfMemoryError`` in an ``except`` clause there raises AttributeError.

    Example:
        >>> issubclass(out_of_memory_error(), RuntimeError)
        True
    """
    cls = getattr(torch, "OutOfMemoryError", None)
    if isinstance(cls, type) and issubclass(cls, RuntimeError):
        return cls
    return torch.cuda.OutOfMemoryError


OutOfMemoryError: Final[type[RuntimeError]] = out_of_memory_error()
"""What a device raises when out of memory (``torch.OutOfMemoryError``, or torch.cuda's before torch 2.5)."""


def parse_device(device: str | torch.device) -> torch.device:
    """Parse ``device`` and make sure it exists in this process; DeviceError if not.

    Example:
        >>> parse_device("cpu").type
        'cpu'
    """
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise DeviceError(f"invalid device {device!r}: {e}") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"device {device!r} requested but CUDA is not available here")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) here")
    elif dev.type != "cpu":
        raise DeviceError(f"device {device!r}: serving supports cpu and cuda devices")
    return dev


def to_host(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host copy of a device tensor (pinned for CUDA); the same tensor when the device is the CPU."""
    if device.type == "cpu":
        return tensor
    host = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
    host.copy_(tensor)
    return host


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A device copy of a host tensor; the same tensor when the device is the CPU."""
    if tensor.device == device:
        return tensor
    out = torch.empty(tensor.shape, dtype=tensor.dtype, device=device)
    out.copy_(tensor, non_blocking=tensor.is_pinned())
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()
    return out


def release_device_memory(device: torch.device) -> None:
    """Hand freed blocks of the CUDA caching allocator back to the driver (a no-op on the CPU)."""
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.empty_cache()
