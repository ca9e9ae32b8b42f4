"""Many small chunk reads served by a few span reads: what a load of many small tensors pays per chunk.

A pack holds a save's chunks one after another, so the small chunks of one
checkpoint (biases, norms, the tensors of a small model) lie close together.
Reading each on its own costs a file open or a request apiece — 30-90 µs on a
local disk, a round trip on S3 — far more than its bytes. :class:`SpanReads`
is told every small read a load will make, merges those of one pack that lie
within :data:`GAP` of each other into spans of at most :data:`SPAN_MAX`,
reads each span once, and then answers ``read``/``read_into`` from them,
passing anything else to the storage underneath. Nothing is trusted more
than before: the reader hashes every chunk it decodes exactly as it did. A
span that cannot be read is skipped, so the chunk's own read reports the
problem with its own key.

Example:
    >>> from weightbank.storage import MemoryStorage
    >>> s = MemoryStorage(); s.write("packs/a.pack", b"0123456789")
    >>> spans = SpanReads(s); spans.want("packs/a.pack", 2, 3); spans.want("packs/a.pack", 6, 2)
    >>> spans.fetch(); spans.reads, spans.read("packs/a.pack", 6, 2), spans.read("packs/a.pack", 0, 2)
    (1, b'67', b'01')
"""

from __future__ import annotations

import bisect
from typing import Any

from ..errors import WeightbankError
from ..storage.base import Storage

__all__ = ["GAP", "SPAN_MAX", "SpanReads"]

#: Reads of one pack closer than this are merged (reading the gap costs less than another read).
GAP = 256 << 10
#: The longest span read at once.
SPAN_MAX = 16 << 20


class SpanReads:
    """A read-through view of ``storage`` that serves the reads it was told of from merged span reads."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage
        self._wanted: dict[str, list[tuple[int, int]]] = {}
        self._spans: dict[str, tuple[list[int], list[bytes]]] = {}
        #: Span reads made.
        self.reads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._storage, name)  # everything else is the storage's own

    def want(self, key: str, offset: int, length: int) -> None:
        """Say a read of ``length`` bytes at ``offset`` of ``key`` will come."""
        if length > 0 and offset >= 0:
            self._wanted.setdefault(key, []).append((offset, length))

    def fetch(self) -> None:
        """Read the spans of everything wanted (one read per span)."""
        for key, ranges in self._wanted.items():
            ranges.sort()
            spans: list[tuple[int, int]] = []
            for off, n in ranges:
                if (
                    spans
                    and off <= spans[-1][1] + GAP
                    and max(spans[-1][1], off + n) - spans[-1][0] <= SPAN_MAX
                ):
                    spans[-1] = (spans[-1][0], max(spans[-1][1], off + n))
                else:
                    spans.append((off, off + n))
            starts: list[int] = []
            datas: list[bytes] = []
            for start, end in spans:
                if len(ranges) == 1:
                    break  # one read either way
                try:
                    data = self._storage.read(key, start, end - start)
                except (WeightbankError, OSError):
                    continue  # the chunk's own read says what is wrong
                self.reads += 1
                starts.append(start)
                datas.append(data)
            if starts:
                self._spans[key] = (starts, datas)
        self._wanted.clear()

    def _find(self, key: str, offset: int, length: int) -> memoryview | None:
        got = self._spans.get(key)
        if got is None:
            return None
        starts, datas = got
        i = bisect.bisect_right(starts, offset) - 1
        if i < 0:
            return None
        rel = offset - starts[i]
        data = datas[i]
        if rel + length > len(data):
            return None  # past what the span read (a short pack): the storage answers
        return memoryview(data)[rel : rel + length]

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        """``storage.read``, from a span when one covers the range."""
        if length is not None:
            got = self._find(key, offset, length)
            if got is not None:
                return bytes(got)
        return self._storage.read(key, offset, length)

    def read_into(self, key: str, offset: int, buf: memoryview) -> int:
        """``storage.read_into``, from a span when one covers the range."""
        view = buf.cast("B") if buf.format != "B" or buf.ndim != 1 else buf
        got = self._find(key, offset, len(view))
        if got is None:
            return self._storage.read_into(key, offset, buf)
        view[:] = got
        return len(view)
