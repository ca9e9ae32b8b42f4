"""The background save worker: one thread writes staged snapshots to the bank, in order.

``submit`` queues a job (write one snapshot, then whatever must follow its
commit: moving tags, pruning) and returns a :class:`SaveHandle`. Jobs run one
at a time in submission order, so each checkpoint's parent is the one saved
before it. ``wait_for_room`` is the back-pressure: it blocks until fewer than
``max_inflight`` saves are pending. A job that fails is reported exactly once
by ``raise_failures`` (the manager calls it on every step and on close) —
never swallowed.

Example:
    >>> from weightbank.training.saver import AsyncSaver
    >>> saver = AsyncSaver(max_inflight=1)
    >>> saver.submit(lambda: "ok", step=1).wait()
    'ok'
    >>> saver.close()
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Generic, TypeVar

from ..errors import AlreadyClosed, InvalidArgument

__all__ = ["AsyncSaver", "SaveHandle"]

T = TypeVar("T")


class SaveHandle(Generic[T]):
    """A save running in the background: ``done()``, ``wait()``, ``exception()``.

    ``wait`` returns the save's result (a CheckpointInfo for checkpoint saves)
    or re-raises its failure. ``blocked_seconds`` is how long the training
    loop waited to start it (back-pressure plus the snapshot copy).

    Example:
        >>> from concurrent.futures import Future
        >>> f: Future[int] = Future(); f.set_result(3)
        >>> h = SaveHandle(f, step=10); h.done(), h.wait(), h.exception()
        (True, 3, None)
    """

    def __init__(self, future: Future[T], *, step: int, blocked_seconds: float = 0.0) -> None:
        self._future = future
        self.step = step
        self.blocked_seconds = blocked_seconds
        self.reported = False

    def __repr__(self) -> str:
        state = "done" if self.done() else "pending"
        return f"SaveHandle(step={self.step}, {state})"

    def done(self) -> bool:
        """Whether the save has finished (committed or failed)."""
        return self._future.done()

    def wait(self, timeout: float | None = None) -> T:
        """Block until the save is committed and return its result; re-raise its failure."""
        self.reported = True
        return self._future.result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        """The save's failure (after waiting for it to finish), or None."""
        return self._future.exception(timeout)


class AsyncSaver:
    """A single background thread running save jobs with at most ``max_inflight`` pending."""

    def __init__(self, max_inflight: int = 1) -> None:
        if isinstance(max_inflight, bool) or not isinstance(max_inflight, int) or max_inflight < 1:
            raise InvalidArgument("max_inflight", max_inflight, "must be a positive int")
        self.max_inflight = max_inflight
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="wb-ckpt")
        self._handles: list[SaveHandle[Any]] = []
        self._lock = threading.Lock()
        self._closed = False

    def pending(self) -> list[SaveHandle[Any]]:
        """Handles not finished yet, oldest first."""
        with self._lock:
            return [h for h in self._handles if not h.done()]

    def submit(self, job: Callable[[], T], *, step: int, blocked_seconds: float = 0.0) -> SaveHandle[T]:
        """Queue ``job``; the caller must have made room with :meth:`wait_for_room`."""
        if self._closed:
            raise AlreadyClosed("saver")
        handle = SaveHandle(self._pool.submit(job), step=step, blocked_seconds=blocked_seconds)
        with self._lock:
            # Finished handles are forgotten unless they hold a failure nobody has seen yet.
            self._handles = [
                h for h in self._handles if not h.done() or (not h.reported and h.exception() is not None)
            ]
            self._handles.append(handle)
        return handle

    def wait_for_room(self) -> None:
        """Block until fewer than ``max_inflight`` saves are pending (failures stay for raise_failures)."""
        while True:
            pending = self.pending()
            if len(pending) < self.max_inflight:
                return
            pending[0].exception()

    def wait_all(self) -> None:
        """Block until every queued save has finished."""
        for h in self.pending():
            h.exception()

    def raise_failures(self, divert: Callable[[BaseException], bool] | None = None) -> None:
        """Re-raise the first failure not reported yet (each failure is raised once).

        A failure for which ``divert(error)`` is true counts as reported and is
        not raised (the caller handles it another way).
        """
        with self._lock:
            for h in self._handles:
                if h.done() and not h.reported:
                    err = h.exception()
                    if err is not None:
                        h.reported = True
                        if divert is not None and divert(err):
                            continue
                        raise err

    def close(self, divert: Callable[[BaseException], bool] | None = None) -> None:
        """Wait for every save, stop the thread, then re-raise an unreported failure (see :meth:`raise_failures`)."""
        if not self._closed:
            self._closed = True
            self._pool.shutdown(wait=True)
        self.raise_failures(divert)
