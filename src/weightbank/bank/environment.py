"""Metadata recorded with every save without being asked: when, where, with what.

Example:
    >>> from weightbank.bank.environment import capture_env
    >>> env = capture_env()             # plus "git" (commit, dirty, repo) inside a git work tree
    >>> sorted(env.keys() - {"git"})
    ['host', 'pid', 'platform', 'python', 'torch', 'user', 'weightbank']
"""

from __future__ import annotations

import functools
import getpass
import os
import platform
import socket
import subprocess
from typing import Any

import torch

from .._version import __version__

__all__ = ["capture_env", "git_info", "warm_up", "who"]


def _git(cwd: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=5, check=False)


@functools.lru_cache(maxsize=8)
def git_info(cwd: str) -> dict[str, Any] | None:
    """Commit and dirty flag of the git repository containing ``cwd``, if any (cached per directory)."""
    try:
        commit = _git(cwd, "rev-parse", "HEAD")
        if commit.returncode != 0:
            return None
        status = _git(cwd, "status", "--porcelain", "--untracked-files=no")
        top = _git(cwd, "rev-parse", "--show-toplevel")
    except (OSError, subprocess.SubprocessError):
        return None
    return {
        "commit": commit.stdout.strip(),
        "dirty": bool(status.stdout.strip()),
        "repo": top.stdout.strip(),
    }


def warm_up() -> None:
    """Look up the caller's git commit now, on the calling thread (each save records it).

    Running ``git`` for the first time from a background save thread while
    DataLoader workers fork can deadlock the forked children on the inherited
    pipe, so the bank and the training manager call this where they are made.
    """
    git_info(os.getcwd())


def who() -> str:
    """``user@host`` of this process, for tag history."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"{user}@{socket.gethostname()}"


def capture_env() -> dict[str, Any]:
    """Host, user, pid, versions and the caller's git commit."""
    env: dict[str, Any] = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "user": who().split("@", 1)[0],
        "weightbank": __version__,
    }
    git = git_info(os.getcwd())
    if git is not None:
        env["git"] = git
    return env
