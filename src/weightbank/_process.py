"""Whether a process on this host is still running (leases and temp files name their writer's pid).

Example:
    >>> import os
    >>> from weightbank._process import pid_alive
    >>> pid_alive(os.getpid())
    True
"""

from __future__ import annotations

import os

__all__ = ["pid_alive"]


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists here (a process we may not signal still counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
