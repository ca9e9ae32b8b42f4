"""fsync_dir: the one directory fsync the local backend and exports share."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from weightbank.storage.durable import fsync_dir


def _fsync_failing(code: int) -> object:
    def fsync(fd: int) -> None:
        raise OSError(code, os.strerror(code))

    return fsync


def test_syncs_a_directory_and_refuses_a_missing_one(tmp_path: Path) -> None:
    fsync_dir(tmp_path)
    with pytest.raises(FileNotFoundError):
        fsync_dir(tmp_path / "absent")
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotADirectoryError):
        fsync_dir(tmp_path / "f")


def test_a_file_system_that_cannot_sync_a_directory_is_not_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "fsync", _fsync_failing(errno.EINVAL))
    fsync_dir(tmp_path)


def test_a_real_sync_failure_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "fsync", _fsync_failing(errno.EIO))
    with pytest.raises(OSError, match="Input/output"):
        fsync_dir(tmp_path)
