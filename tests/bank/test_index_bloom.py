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
from weightbank.bank.index.gc import referenced_pages
from weightbank.bank.index.pages import chunk_dir, chunk_filters
from weightbank.bank.index.store import read_entry, read_page, read_root
from weightbank.bank.index.view import Snapshot, list_gens, list_seqs
from weightbank.errors import IndexDamaged
from weightbank.storage import CountingStorage, LocalStorage

from .faults import FaultStorage

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


# -- the chunk index's bucket filters ---------------------------------------------------------------


def _compacted_bank(path: str) -> None:
    """Enough saves for a compaction: the chunk index holds every chunk, each run's tensors distinct."""
    with wb.open(path) as bank:
        for s in range(20):
            state = {f"t{i}": torch.full((32,), float(s * 100 + i)) for i in range(16)}
            bank.save({**state, "b": torch.arange(8.0) + s}, run=f"r{s}", step=s)
        bank.compact()


def _bucket_reads(path: str, ops: list[tuple[str, str]]) -> int:
    storage = LocalStorage(path)
    gen = list_gens(storage)[-1]
    root = read_root(storage, gen)
    assert root is not None and root.chunks is not None
    directory = read_page(storage, root.chunks)
    buckets = {k for k, _ in chunk_dir(directory, root.chunks).values()}
    assert chunk_filters(directory, root.chunks), "a compaction writes each bucket's filter"
    return sum(1 for name, key in ops if name == "read" and key in buckets)


def _new_save(bank: wb.Bank) -> wb.SaveResult:
    # A new run: 48 chunks the bank has never seen, and "b" that r3 wrote (found through the index).
    state = {f"n{i}": torch.full((32,), -1.0 - i) for i in range(48)}
    return bank.save({**state, "b": torch.arange(8.0) + 3}, run="new", step=0)


def test_a_save_of_new_chunks_reads_no_bucket_its_filter_rules_out(tmp_path: object) -> None:
    path = str(tmp_path)
    _compacted_bank(path)
    faults = FaultStorage(LocalStorage(path))
    info = _new_save(wb.Bank(faults))
    assert info.save_stats is not None and info.save_stats.reused_chunks == 1, "dedup still finds b"
    assert _bucket_reads(path, faults.ops) <= 3, "b's bucket (and a rare false positive)"


def test_without_filters_every_touched_bucket_is_read(
    tmp_path: object, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The control for the test above, and a bank whose filters are missing or damaged: a filter
    is only a hint, so the save reads the buckets and still deduplicates."""
    path = str(tmp_path)
    _compacted_bank(path)
    monkeypatch.setattr(Snapshot, "bucket_filter", lambda self, b: None)
    faults = FaultStorage(LocalStorage(path))
    info = _new_save(wb.Bank(faults))
    assert info.save_stats is not None and info.save_stats.reused_chunks == 1
    assert _bucket_reads(path, faults.ops) >= 20


@pytest.mark.parametrize("damage", ["missing", "garbled"])
def test_a_lost_or_damaged_filter_page_means_the_bucket_is_read(tmp_path: object, damage: str) -> None:
    path = str(tmp_path)
    _compacted_bank(path)
    storage = LocalStorage(path)
    root = read_root(storage, list_gens(storage)[-1])
    assert root is not None and root.chunks is not None
    for key in chunk_filters(read_page(storage, root.chunks), root.chunks).values():
        if damage == "missing":
            storage.delete(key)
        else:
            storage.write(key, b"\x28\xb5\x2f\xfd garbage")
    info = _new_save(wb.open(path, create=False))
    assert info.save_stats is not None and info.save_stats.reused_chunks == 1
    with wb.open(path, create=False) as bank:
        assert torch.equal(bank.load("new@0")["b"], torch.arange(8.0) + 3)


def test_index_gc_keeps_the_filter_pages_a_root_names(tmp_path: object) -> None:
    path = str(tmp_path)
    _compacted_bank(path)
    storage = LocalStorage(path)
    root = read_root(storage, list_gens(storage)[-1])
    assert root is not None and root.chunks is not None
    filters = set(chunk_filters(read_page(storage, root.chunks), root.chunks).values())
    assert filters and filters <= referenced_pages(storage)
