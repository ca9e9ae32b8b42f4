"""Handles the cache gives out: a :class:`Lease` on a resident model, a :class:`Prefetch` of a load.

Example:
    >>> import torch, weightbank as wb
    >>> bank = wb.open("memory://"); _ = bank.save(torch.nn.Linear(1, 1).state_dict(), tags=["v1"])
    >>> cache = wb.ModelCache(bank, build=lambda info: torch.nn.Linear(1, 1))
    >>> lease = cache.lease("v1")
    >>> with lease as model:
    ...     len(lease.checkpoint)
    64
"""

from __future__ import annotations

from concurrent.futures import Future
from types import TracebackType
from typing import Generic, Protocol, TypeVar

from torch import nn

from ..errors import InvalidRequest

__all__ = ["Lease", "Leaser", "Prefetch"]

T = TypeVar("T")


class Leaser(Protocol):
    """What a Lease needs from its cache: ``acquire`` on entry, then exactly one ``release``."""

    def _acquire(self, ref: str, *, lease: bool) -> tuple[str, nn.Module]: ...

    def _release(self, cid: str) -> None: ...


class Lease:
    """``with cache.lease(ref) as model:`` — the model stays resident and unchanged until the block ends.

    ``checkpoint`` is the id of the checkpoint actually served (set on entry);
    a served model is read-only (its tensors may be shared with other
    checkpoints) and must not be kept beyond the block.
    """

    def __init__(self, cache: Leaser, ref: str) -> None:
        self._cache = cache
        self.ref = ref
        self.checkpoint: str | None = None
        self.model: nn.Module | None = None

    def __enter__(self) -> nn.Module:
        if self.checkpoint is not None:
            raise InvalidRequest("a Lease is entered once; call cache.lease(ref) for another")
        self.checkpoint, self.model = self._cache._acquire(self.ref, lease=True)
        return self.model

    def __exit__(
        self, tp: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self.checkpoint is not None and self.model is not None:
            self.model = None
            self._cache._release(self.checkpoint)


class Prefetch(Generic[T]):
    """Handle of a background load: ``done()``, ``wait()`` (re-raises its failure), ``exception()``.

    ``wait()`` returns the loaded checkpoint's :class:`ModelStatus`, or for a
    disk-tier prefetch the bank's :class:`~weightbank.PrefetchReport`.
    """

    def __init__(self, future: Future[T]) -> None:
        self._future = future

    def done(self) -> bool:
        """Whether the load has finished (either way)."""
        return self._future.done()

    def wait(self, timeout: float | None = None) -> T:
        """Block until loaded; returns its status (or report) or raises what the load raised."""
        return self._future.result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The load's failure (waiting for it to finish), or None."""
        return self._future.exception(timeout)
