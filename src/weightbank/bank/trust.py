"""Read verification modes: hash every chunk (``"always"``), once per process and file (``"once"``), or never.

``"always"`` (the default) hashes every chunk a read returns. ``"once"``
skips the hash of a chunk this process has already verified *from the same
local files, unchanged since*: the evidence is each file's identity (device,
inode, size, mtime and ctime, in nanoseconds), taken just before the verified
read and again after it, and compared after each later read. Any write to a
file, a replacement or a truncation changes its ctime, which no process can
set back, so bytes read after a later matching look are the bytes that were
verified. Evidence is recorded only for files whose last change is at least
:data:`SETTLE_S` old: a file system stamps times from a coarse clock, and a
write in the same tick as the look could otherwise go unseen. Reads that do
not come from local files (memory, S3 without a disk cache) always hash;
through a remote bank's disk cache, the cache entry is the file.

What ``"once"`` does not see: a bit flipped on the disk under the file
system (the page cache then holds it unchanged, or the file system's own
checksums catch it), a tensor mapped from a pack that is written in place
after the load (packs are written once; only damage changes one), and
changes on file systems whose ctime does not move with every write (vfat,
some FUSE and SMB mounts, NFS with attribute caching): use ``"always"``
there.
``"never"`` hashes nothing: for benchmarks and trusted read-only replicas,
never for banks others write to.

Example:
    >>> check_verify("once")
    'once'
    >>> check_verify("sometimes")
    Traceback (most recent call last):
    ...
    weightbank.errors.InvalidArgument: verify='sometimes': must be one of 'always', 'once', 'never'
"""

from __future__ import annotations

import os
import threading
import time
from collections import OrderedDict
from collections.abc import Hashable, Iterable
from typing import Literal

from ..errors import InvalidArgument

__all__ = ["MODES", "SETTLE_S", "TRUSTED", "Evidence", "TrustedChunks", "Verify", "check_verify", "file_ids"]

Verify = Literal["always", "once", "never"]
MODES: tuple[Verify, ...] = ("always", "once", "never")
#: A file changed more recently than this is not trusted yet (file times come from a coarse clock).
SETTLE_S = 2.0
#: Chunks remembered per process (oldest forgotten first); ~200 bytes each.
MAX_ENTRIES = 1 << 20

Evidence = tuple[tuple[str, int, int, int, int, int], ...]


def check_verify(value: object) -> Verify:
    """``value`` if it is a verify mode; InvalidArgument otherwise."""
    if not isinstance(value, str) or value not in MODES:
        raise InvalidArgument("verify", value, "must be one of " + ", ".join(repr(m) for m in MODES))
    mode: Verify = value  # narrowed by the membership test
    return mode


def file_ids(paths: Iterable[str]) -> Evidence | None:
    """The identity of each file (sorted by path); None if one cannot be looked at."""
    out = []
    for p in sorted(set(paths)):
        try:
            st = os.stat(p)
        except OSError:
            return None
        out.append((p, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns))
    return tuple(out)


class TrustedChunks:
    """Chunks this process verified, each with the evidence of the files it was read from.

    A chunk is named by a token that covers its hash and where and how it was
    read (pack keys, offsets, codec and delta arguments of every link), so a
    manifest whose locations changed is verified again.

    Example:
        >>> import tempfile
        >>> path = tempfile.NamedTemporaryFile(delete=False).name
        >>> t = TrustedChunks(); ev = file_ids([path])
        >>> t.remember("chunk", ev, ev)  # the file was made just now: too recent to tell a later write
        >>> t.trusted("chunk", ev), len(t)
        (False, 0)
    """

    def __init__(self, max_entries: int = MAX_ENTRIES) -> None:
        self._max = max_entries
        self._lock = threading.Lock()
        self._known: OrderedDict[Hashable, Evidence] = OrderedDict()

    def trusted(self, token: Hashable, evidence: Evidence | None) -> bool:
        """Whether ``token`` was verified under exactly ``evidence`` (looked at after the read)."""
        if evidence is None:
            return False
        with self._lock:
            known = self._known.get(token)
            if known is None:
                return False
            self._known.move_to_end(token)
        return known == evidence

    def remember(self, token: Hashable, before: Evidence | None, after: Evidence | None) -> None:
        """Record that ``token`` was verified from files that looked like ``before`` and ``after`` around the read.

        Nothing is recorded when the files changed during the read or changed too recently to tell.
        """
        if before is None or before != after:
            return
        settled = time.time_ns() - int(SETTLE_S * 1e9)
        if any(row[5] > settled or row[4] > settled for row in before):
            return
        with self._lock:
            self._known[token] = before
            self._known.move_to_end(token)
            while len(self._known) > self._max:
                self._known.popitem(last=False)

    def forget(self) -> None:
        """Forget every chunk (the next read of each hashes it again)."""
        with self._lock:
            self._known.clear()

    def __len__(self) -> int:
        with self._lock:
            return len(self._known)


#: The process's record of verified chunks, shared by every bank it opens.
TRUSTED = TrustedChunks()
