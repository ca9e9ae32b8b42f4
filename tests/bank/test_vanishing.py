"""A manifest deleted by a concurrent prune between the listing and the read is gone, not broken (issue 11, item 5)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

import weightbank as wb
from weightbank.bank.layout import MANIFESTS
from weightbank.storage import open_storage
from weightbank.storage.base import Storage


class PruneDuringRead:
    """A backend whose first read of ``victim``'s manifest comes after another process deleted that checkpoint."""

    def __init__(self, inner: Storage, root: str, victim: str) -> None:
        self._inner = inner
        self._root = root
        self._victim = victim
        self.fired = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def read(self, key: str, offset: int = 0, length: int | None = None) -> bytes:
        if not self.fired and key.startswith(MANIFESTS) and self._victim in key:
            self.fired = True
            other = wb.open(self._root, create=False)  # the concurrent pruner
            other.delete(self._victim)
            other.close()
        return self._inner.read(key, offset, length)


def _bank(tmp_path: Path) -> tuple[str, str, str]:
    root = str(tmp_path / "bank")
    bank = wb.open(root)
    a = bank.save({"w": torch.zeros(64)}, run="r", step=1).id
    b = bank.save({"w": torch.ones(64)}, run="r", step=2).id
    bank.close()
    return root, a, b


def test_gc_runs_when_a_listed_manifest_vanishes(tmp_path: Path) -> None:
    root, a, b = _bank(tmp_path)
    storage = PruneDuringRead(open_storage(root), root, a)
    bank = wb.Bank(storage)
    report = bank.gc(grace=0)
    assert storage.fired
    assert report.dry_run is False
    assert bank.log("r")[0].id == b and [c.id for c in bank.log("r")] == [b]
    assert not bank._catalog.broken


def test_verify_is_clean_when_a_listed_manifest_vanishes(tmp_path: Path) -> None:
    root, a, _ = _bank(tmp_path)
    storage = PruneDuringRead(open_storage(root), root, a)
    bank = wb.Bank(storage)
    report = bank.verify()
    assert storage.fired
    assert report.ok, report.problems
    assert report.checkpoints == 1


def test_a_checkpoint_deleted_and_collected_during_verify_is_not_reported(tmp_path: Path) -> None:
    root, a, _ = _bank(tmp_path)
    bank = wb.open(root)
    bank._catalog.refresh()  # this process has seen both manifests
    other = wb.open(root, create=False)
    other.delete(a)
    other.gc(grace=0)  # a's pack is gone
    report = bank.verify()
    assert report.ok, report.problems
