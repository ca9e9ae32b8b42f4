"""The Bloom filter a catalog log entry carries: no false negatives, few false positives, and what a
save does with it (reads only the pending manifests that may hold a chunk it missed)."""

from __future__ import annotations

import base64
import os

import blake3
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import weightbank as wb
from weightbank.bank.index import bloom
from weightbank.bank.index.store import read_entry
from weightbank.bank.index.view import list_seqs
from weightbank.errors import IndexDamaged
from weightbank.storage import CountingStorage, LocalStorage

hashes = st.lists(
    st.binary(min_size=1, max_size=16).map(lambda b: blake3.blake3(b).hexdigest()), max_size=300
)


@given(hashes)
@settings(max_examples=200, deadline=None)
def test_every_member_is_found(members: list[str]) -> None:
    bits = bloom.build(members)
    assert all(bloom.may_contain(bits, h) for h in members)
    assert bloom.check(bloom.encode(bits)) == bits


def test_false_positives_stay_near_one_percent() -> None:
    members = [blake3.blake3(os.urandom(8)).hexdigest() for _ in range(3000)]
    bits = bloom.build(members)
    others = [blake3.blake3(os.urandom(8)).hexdigest() for _ in range(20000)]
    rate = sum(bloom.may_contain(bits, h) for h in others) / len(others)
    assert rate < 0.03, rate  # ~0.8% expected; a wide margin, never a timing


@pytest.mark.parametrize(
    "stored", [3, "", "not base64!", base64.b64encode(b"").decode(), "A" * (bloom.MAX_FILTER_BYTES * 2)]
)
def test_a_malformed_filter_is_refused(stored: object) -> None:
    with pytest.raises((ValueError, TypeError)):
        bloom.check(stored)


def test_a_damaged_filter_in_an_entry_is_index_damage(tmp_path: object) -> None:
    bank = wb.open(str(tmp_path))
    bank.save({"w": torch.ones(4)}, run="r", step=1)
    storage = bank.storage
    seq = list_seqs(storage)[-1]
    entry = read_entry(storage, seq)
    assert entry is not None and entry.chunks is not None
    assert bloom.may_contain(entry.chunks, bank.checkpoint("r@1").manifest.chunks[0].hash)
    key = f"index/log/{seq:012d}.json"
    ref = storage.get_ref(key)
    assert ref is not None
    storage.put_ref(key, ref.data.replace(b'"chunks":"', b'"chunks":"!'), ref.token)
    with pytest.raises(IndexDamaged):
        read_entry(storage, seq)


def test_a_save_reads_only_the_pending_manifests_that_may_hold_its_chunks(tmp_path: object) -> None:
    path = str(tmp_path)
    with wb.open(path) as bank:
        for s in range(10):  # pending entries, none compacted yet (fewer than COMPACT_EVERY)
            bank.save({"w": torch.full((64,), float(s)), "b": torch.ones(8)}, run=f"r{s}", step=s)
    counted = CountingStorage(LocalStorage(path))
    bank = wb.Bank(counted)
    counted.reset()
    # A new run (no parent): "b" is in every pending checkpoint, "w" in none.
    info = bank.save({"w": torch.full((64,), 99.0), "b": torch.ones(8)}, run="new", step=0)
    assert info.save_stats is not None and info.save_stats.reused_chunks == 1
    # The pending manifests read: the one writer of "b" (and, rarely, a false positive), not all ten.
    assert counted.counts()["read"] <= 4, counted.counts()


def test_without_the_filter_every_pending_manifest_would_be_read(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control for the test above: a filter that says "maybe" to everything reads them all."""
    path = str(tmp_path)
    with wb.open(path) as bank:
        for s in range(10):
            bank.save({"w": torch.full((64,), float(s)), "b": torch.ones(8)}, run=f"r{s}", step=s)
    monkeypatch.setattr(bloom, "may_contain", lambda bits, h: True)
    counted = CountingStorage(LocalStorage(path))
    bank = wb.Bank(counted)
    counted.reset()
    bank.save({"w": torch.full((64,), 99.0), "b": torch.ones(8)}, run="new", step=0)
    assert counted.counts()["read"] >= 10, counted.counts()
