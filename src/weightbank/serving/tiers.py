"""Moving pooled tensors between tiers: device ↔ host (pinned when the device is CUDA).

Demotion copies a device tensor into host memory (page-locked on CUDA, so a
later promotion is one fast DMA copy, never a decode or a hash); promotion
copies it back. When the device *is* the CPU both tiers live in the same
memory and moving between them is free: the same tensor object changes tier
and nothing is copied.

Example:
    >>> import torch
    >>> from weightbank.serving.tiers import parse_device, to_host, to_device
    >>> dev = parse_device("cpu"); t = torch.ones(3)
    >>> to_device(to_host(t, dev), dev) is t
    True
"""

from __future__ import annotations

import torch

from ..errors import DeviceError

__all__ = ["parse_device", "release_device_memory", "to_device", "to_host"]


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
