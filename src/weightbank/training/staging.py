"""Reusable host staging buffers: the only part of an async save the training loop waits for.

A snapshot copies every tensor (and numpy array) of a state tree into host
buffers owned by a *slot*; containers are rebuilt and JSON values are
immutable, so the snapshot shares nothing with the live state and training
may go on at once while the snapshot is written in the background.

Slots are reused: a buffer is kept per key path and reallocated only when the
shape or dtype at that path changes, and buffers of paths that disappear are
dropped, so host memory stays flat however many saves are made. A slot is busy
while its snapshot is being written, and may be *retained* as the last good
state for an in-memory rollback; the manager sizes the pool so that a free
slot always exists after back-pressure.

CUDA tensors are copied into pinned buffers with ``non_blocking=True`` on a
side stream that first waits for the current stream; the current stream then
waits on an event recorded after the copies, so later kernels cannot change a
tensor before it is copied, and the host does not wait at all. The writer
calls :meth:`Snapshot.ready` (the event's ``synchronize``) before reading.
Tensors that share memory (tied weights) are copied once and stay shared. A
``DTensor`` (a shard of a ``torch.distributed`` tensor) is staged as its local
shard, wrapped again with the same mesh and placements.

Example:
    >>> import torch
    >>> from weightbank.training.staging import StagingPool
    >>> pool = StagingPool(slots=2); w = torch.ones(3)
    >>> snap = pool.stage({"w": w, "step": 1}); w += 1
    >>> snap.tree["w"].tolist(), snap.nbytes
    ([1.0, 1.0, 1.0], 12)
"""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

__all__ = ["Snapshot", "StagingPool"]


@dataclass(eq=False)
class _Slot:
    index: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    writing: bool = False
    retained: bool = False

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values()) + sum(
            a.nbytes for a in self.arrays.values()
        )


@dataclass(eq=False)
class Snapshot:
    """A staged copy of a state tree: ``tree`` references the slot's buffers."""

    tree: Any
    slot: _Slot
    nbytes: int
    events: list[Any] = field(default_factory=list)
    checkpoint: str | None = None

    def ready(self) -> None:
        """Wait until every (asynchronous, CUDA) copy into the buffers has landed."""
        for event in self.events:
            event.synchronize()


class StagingPool:
    """A fixed number of reusable staging slots (see the module docstring)."""

    def __init__(self, slots: int) -> None:
        if slots < 1:
            raise ValueError("a staging pool needs at least one slot")
        self._slots = [_Slot(i) for i in range(slots)]
        self._lock = threading.Lock()
        self._streams: dict[torch.device, Any] = {}

    @property
    def nbytes(self) -> int:
        """Host bytes held by all slots."""
        return sum(s.nbytes for s in self._slots)

    def free(self) -> bool:
        """Whether a slot is free (neither being written nor retained)."""
        with self._lock:
            return any(not s.writing and not s.retained for s in self._slots)

    def stage(self, tree: Any) -> Snapshot:
        """Copy ``tree`` into a free slot and return the snapshot (ValueError if no slot is free)."""
        with self._lock:
            slot = next((s for s in self._slots if not s.writing and not s.retained), None)
            if slot is None:
                raise ValueError("no free staging slot (wait for a save in flight first)")
            slot.writing = True
        try:
            copier = _Copier(slot, self._streams)
            with torch.no_grad():
                staged = copier.visit(tree, "")
            for stale in set(slot.tensors) - copier.seen:
                del slot.tensors[stale]
            for stale in set(slot.arrays) - copier.seen:
                del slot.arrays[stale]
            events = copier.finish()
        except BaseException:
            self.release(slot)
            raise
        return Snapshot(tree=staged, slot=slot, nbytes=copier.nbytes, events=events)

    def release(self, slot: _Slot) -> None:
        """The slot's snapshot has been written (or abandoned)."""
        with self._lock:
            slot.writing = False

    def retain(self, snapshot: Snapshot | None) -> None:
        """Keep ``snapshot``'s slot as the last good state (releasing the one kept before); None keeps none."""
        with self._lock:
            for s in self._slots:
                s.retained = snapshot is not None and s is snapshot.slot


def _dtensor_type() -> Any:
    """``DTensor`` if torch.distributed.tensor is loaded (no DTensor can exist otherwise), else None."""
    module = sys.modules.get("torch.distributed.tensor")
    return getattr(module, "DTensor", None)


class _Copier:
    """One staging pass: visits the tree, copies leaves into the slot's buffers."""

    def __init__(self, slot: _Slot, streams: dict[torch.device, Any]) -> None:
        self.slot = slot
        self.streams = streams
        self.seen: set[str] = set()
        self.nbytes = 0
        self.shared: dict[tuple[Any, ...], torch.Tensor] = {}
        self.used: dict[torch.device, Any] = {}

    def visit(self, obj: Any, path: str) -> Any:
        dtensor = _dtensor_type()
        if dtensor is not None and isinstance(obj, dtensor):
            # Stage the local shard; the copy is a DTensor with the same layout (mesh, placements),
            # built the way DCP's own staging does, so it stays in host memory.
            local = self.tensor(obj._local_tensor, path)
            return dtensor(local, obj._spec, requires_grad=False)
        if isinstance(obj, torch.Tensor):
            return self.tensor(obj, path)
        if isinstance(obj, np.ndarray):
            self.seen.add(path)
            buf = self.slot.arrays.get(path)
            if buf is None or buf.shape != obj.shape or buf.dtype != obj.dtype:
                buf = self.slot.arrays[path] = np.empty_like(obj, order="C")
            np.copyto(buf, obj)
            self.nbytes += buf.nbytes
            return buf
        if isinstance(obj, dict):
            return {k: self.visit(v, f"{path}/{k!r}") for k, v in obj.items()}
        if isinstance(obj, list):
            return [self.visit(v, f"{path}/{i}") for i, v in enumerate(obj)]
        if isinstance(obj, tuple):
            return tuple(self.visit(v, f"{path}/{i}") for i, v in enumerate(obj))
        return obj  # JSON values are immutable; anything else is refused by the bank when saved

    def tensor(self, t: torch.Tensor, path: str) -> torch.Tensor:
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride())) if t.numel() else None
        if key is not None and key in self.shared:
            return self.shared[key]
        self.seen.add(path)
        buf = self.slot.tensors.get(path)
        pinned = t.is_cuda
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype or (pinned and not buf.is_pinned()):
            buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=pinned)
            self.slot.tensors[path] = buf
        if t.is_cuda:
            stream = self.stream(t.device)
            with torch.cuda.stream(stream):
                buf.copy_(t.detach(), non_blocking=True)
            t.record_stream(stream)
        else:
            buf.copy_(t.detach())
        self.nbytes += buf.numel() * buf.element_size()
        if key is not None:
            self.shared[key] = buf
        return buf

    def stream(self, device: torch.device) -> Any:
        stream = self.used.get(device)
        if stream is None:
            stream = self.streams.get(device)
            if stream is None:
                stream = self.streams[device] = torch.cuda.Stream(device=device)  # type: ignore[no-untyped-call]
            # The copy must see every kernel queued so far on the training stream.
            stream.wait_stream(torch.cuda.current_stream(device))
            self.used[device] = stream
        return stream

    def finish(self) -> list[Any]:
        events = []
        for device, stream in self.used.items():
            event = torch.cuda.Event()  # type: ignore[no-untyped-call]
            event.record(stream)
            # Later kernels on the training stream wait for the copies; the host does not.
            torch.cuda.current_stream(device).wait_event(event)
            events.append(event)
        return events
