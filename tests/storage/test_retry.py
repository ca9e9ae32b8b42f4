"""Retry helpers of the object-store backends: what is transient, what each failure becomes."""

from __future__ import annotations

import ast
import errno
import importlib
from pathlib import Path

import pytest

import weightbank.storage as storage_pkg
from weightbank.errors import MissingObject, StorageError
from weightbank.storage import retry


def test_imports_on_a_platform_without_eremoteio(monkeypatch: pytest.MonkeyPatch) -> None:
    # EREMOTEIO is Linux-only (macOS and Windows have none).
    monkeypatch.delattr(errno, "EREMOTEIO", raising=False)
    reloaded = importlib.reload(retry)
    try:
        assert reloaded.is_transient(OSError(errno.ETIMEDOUT, "timed out"))
        assert not reloaded.is_transient(OSError(errno.EACCES, "denied"))
    finally:
        monkeypatch.undo()
        importlib.reload(retry)


def test_transient_failures_are_retried_then_translated() -> None:
    calls = [0]

    def flaky() -> int:
        calls[0] += 1
        if calls[0] < 3:
            raise ConnectionResetError("reset")
        return 7

    assert retry.retrying("read", "s3://b", "k", flaky, attempts=3, base_delay=0) == 7

    def always() -> int:
        raise TimeoutError("slow")

    with pytest.raises(StorageError, match="read of 'k' failed: TimeoutError"):
        retry.retrying("read", "s3://b", "k", always, attempts=2, base_delay=0)


def test_permanent_failures_are_not_retried() -> None:
    calls = [0]

    def missing() -> int:
        calls[0] += 1
        raise FileNotFoundError("k")

    with pytest.raises(MissingObject):
        retry.retrying("read", "s3://b", "k", missing, attempts=5, base_delay=0)
    assert calls == [1]


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            found.add(node.module or "")
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return found


def test_no_import_circle_between_the_object_store_backends() -> None:
    """fsspec.py picks S3 for s3:// URLs; s3.py must not import fsspec.py back (shared code lives apart)."""
    root = Path(storage_pkg.__file__).parent
    assert "fsspec" not in _imported_modules(root / "s3.py")
    for shared in ("objectstore.py", "retry.py", "keys.py"):
        assert not {"fsspec", "s3"} & _imported_modules(root / shared), shared
