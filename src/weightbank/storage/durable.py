"""Making a file's place in a directory durable: the one ``fsync`` of a directory everyone calls.

A file written, fsynced and renamed into place survives a power cut only once
the directory holding it is fsynced too (the new entry lives in the
directory). The local backend calls :func:`fsync_dir` after every publish and
every directory it creates; exports to local files call it after their rename.

Example:
    >>> import tempfile
    >>> from weightbank.storage.durable import fsync_dir
    >>> fsync_dir(tempfile.mkdtemp())
"""

from __future__ import annotations

import errno
import os

__all__ = ["fsync_dir"]

#: fsync of a directory on a file system that cannot sync one (some network and FUSE file systems).
_UNSUPPORTED = {errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP}


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the entries of directory ``path`` durable; OSError if the directory cannot be opened or synced.

    Does nothing where directories cannot be opened (Windows: a rename there is
    atomic, and no call makes it durable) or synced (the file system refuses
    with EINVAL/ENOTSUP: there is nothing more to do).

    Example:
        >>> import tempfile
        >>> fsync_dir(tempfile.mkdtemp())
    """
    if os.name == "nt":  # pragma: no cover - POSIX test machines
        return
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _UNSUPPORTED:
            raise
    finally:
        os.close(fd)
