"""A commit checks everything it is handed before its manifest exists, and never loses a landed one.

Review findings pinned here: a tampered part must not become a manifest that
stops ``log``/``gc`` for everyone; packs reused from older checkpoints are
checked too; two copies of one box must agree; a manifest write whose reply
was lost must not delete the packs of a checkpoint that did land.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import weightbank as wb
from weightbank.bank import leases, parts
from weightbank.bank.bank import Bank
from weightbank.bank.layout import LEASES, MANIFESTS, PACKS
from weightbank.bank.marker import init_storage
from weightbank.bank.parts import load_parts
from weightbank.bank.writer import SaveOptions
from weightbank.errors import StorageError
from weightbank.format.manifest import TensorRecord
from weightbank.storage import MemoryStorage


def keys(bank: wb.Bank, prefix: str = "") -> set[str]:
    return {info.key for info in bank.storage.list(prefix)}


def assert_bank_healthy(bank: wb.Bank) -> None:
    """What a bad commit broke for everyone before: a fresh handle can log, verify and gc."""
    fresh = wb.Bank(bank.storage)
    fresh.log()
    assert not [p for p in fresh.verify().problems if p.kind == "manifest"]
    fresh.gc(grace=3600)


# -- H2: tampered parts never become a manifest ----------------------------------------------------


def _set(path: tuple[Any, ...], value: Any) -> Callable[[dict[str, Any]], None]:
    def apply(j: dict[str, Any]) -> None:
        node: Any = j
        for step in path[:-1]:
            node = node[step]
        node[path[-1]] = value

    return apply


def _add_box(j: dict[str, Any]) -> None:
    j["tensors"][0]["offsets"], j["tensors"][0]["whole"] = [0], [1]


@pytest.mark.parametrize(
    "tamper",
    [
        pytest.param(_set(("tensors", 0, "shape"), [3]), id="shape-grows"),
        pytest.param(_set(("tensors", 0, "shape"), [-2]), id="negative-dim"),
        pytest.param(_set(("tensors", 0, "dtype"), "nonsense"), id="unknown-dtype"),
        pytest.param(_set(("tensors", 0, "dtype"), "float64"), id="other-dtype"),
        pytest.param(_set(("tensors", 0, "chunks"), [0, 0]), id="chunk-twice"),
        pytest.param(_set(("tensors", 0, "chunks"), [7]), id="chunk-out-of-range"),
        pytest.param(_set(("tensors", 0, "chunks"), [0.0]), id="float-index"),
        pytest.param(_set(("tensors", 0, "offsets"), [0]), id="offsets-without-whole"),
        pytest.param(_add_box, id="box-outside-whole"),
        pytest.param(_set(("tensors", 0, "alias_of"), "w"), id="alias-with-chunks"),
        pytest.param(_set(("packs", 0), "tags/prod.json"), id="not-a-pack-key"),
        pytest.param(_set(("packs", 0), "packs/zz/ab-0.pack"), id="pack-key-wrong-folder"),
        pytest.param(_set(("save",), "../escape"), id="bad-save-id"),
        pytest.param(_set(("chunk_size",), 0), id="chunk-size-zero"),
        pytest.param(_set(("chunks", 0, 1), 3), id="raw-len-changed"),
        pytest.param(_set(("tensors", 0), "w"), id="tensor-not-a-dict"),
    ],
)
def test_a_tampered_part_is_refused_and_nothing_is_written(
    tmp_path: Path, tamper: Callable[[dict[str, Any]], None]
) -> None:
    bank = wb.open(tmp_path / "bank")
    part = bank.save_part({"w": torch.ones(2)})
    j = copy.deepcopy(part.to_json())
    tamper(j)
    with pytest.raises(wb.CorruptObject, match="malformed part"):
        wb.SavePart.from_json(j)
    with pytest.raises(wb.WeightbankError):
        bank.commit([j], run="r", step=1)
    assert keys(bank, MANIFESTS) == set() and bank.log() == []
    assert_bank_healthy(bank)
    # the untouched part still commits
    assert torch.equal(bank.load(bank.commit([part], run="r", step=1).id)["w"], torch.ones(2))


def test_a_manifest_no_reader_accepts_is_never_written(monkeypatch: pytest.MonkeyPatch) -> None:
    bank = wb.open("memory://")
    part = bank.save_part({"w": torch.ones(2)})
    real = parts._place

    def lying(*args: Any) -> TensorRecord:  # a merge bug: the record no longer matches its chunks
        rec = real(*args)
        return TensorRecord(rec.name, rec.dtype, (3,), rec.chunks)

    monkeypatch.setattr(parts, "_place", lying)
    with pytest.raises(wb.InvalidState, match="no reader would accept"):
        bank.commit([part], run="r", step=1)
    assert keys(bank, MANIFESTS) == set()
    assert [lease.save_id for lease in leases.live(bank.storage)] == [part.save_id]  # still committable
    monkeypatch.undo()
    assert bank.commit([part], run="r", step=1).step == 1
    assert_bank_healthy(bank)


def test_an_alias_must_name_a_whole_tensor_of_its_dtype_and_shape() -> None:
    bank = wb.open("memory://")
    w = torch.arange(8.0).reshape(4, 2)
    p0 = bank.save_part({"w": wb.TensorShard(w[:2], offsets=(0, 0), shape=(4, 2))})
    p1 = bank.save_part({"w": wb.TensorShard(w[2:], offsets=(2, 0), shape=(4, 2))})
    j = p1.to_json()
    j["tensors"].append({"name": "v", "dtype": "float32", "shape": [4, 2], "chunks": [], "alias_of": "w"})
    with pytest.raises(wb.InvalidState, match="not a whole tensor"):
        bank.commit([p0, j])
    plain = bank.save_part({"a": torch.ones(3)}).to_json()
    plain["tensors"].append({"name": "b", "dtype": "float32", "shape": [2], "chunks": [], "alias_of": "a"})
    with pytest.raises(wb.InvalidState, match="not a whole tensor"):
        bank.commit([plain])
    assert keys(bank, MANIFESTS) == set()


@pytest.mark.parametrize("chunk_size", [-5, 0.5, 1, 100, 4097, True])
def test_chunk_size_must_be_a_positive_multiple_of_64(chunk_size: Any) -> None:
    bank = wb.open("memory://")
    before = keys(bank)
    with pytest.raises(wb.InvalidState, match="chunk_size"):
        bank.save_part({"w": torch.ones(4)}, chunk_size=chunk_size)
    with pytest.raises(wb.InvalidState, match="chunk_size"):
        bank.save({"w": torch.ones(4)}, chunk_size=chunk_size)
    with pytest.raises(wb.InvalidState, match="chunk_size"):
        SaveOptions(chunk_size=chunk_size)
    assert keys(bank) == before
    assert SaveOptions(chunk_size=64).chunk_size == 64


# -- H4: a manifest write that failed may still have landed ---------------------------------------


class LostReply(MemoryStorage):
    """Stores the manifest, then reports failure (an object store's reply lost, retries used up)."""

    def write(self, key: str, data: bytes | memoryview) -> None:
        super().write(key, data)
        if key.startswith(MANIFESTS):
            raise StorageError("put_object of manifest failed: ReadTimeout (after 5 attempts)")


class NoManifests(MemoryStorage):
    """Refuses every manifest write; everything else works."""

    fail = True

    def write(self, key: str, data: bytes | memoryview) -> None:
        if self.fail and key.startswith(MANIFESTS):
            raise StorageError("put_object of manifest failed: 503 Slow Down")
        super().write(key, data)


def _bank(storage: MemoryStorage) -> wb.Bank:
    init_storage(storage, create=True)
    return Bank(storage)


def test_a_save_whose_manifest_landed_despite_an_error_succeeds_and_keeps_its_packs() -> None:
    bank = _bank(LostReply())
    w = torch.randn(1000)
    info = bank.save({"w": w}, run="r", step=1, codec="raw", tags=["t"])
    fresh = wb.Bank(bank.storage)
    assert [c.id for c in fresh.log()] == [info.id] and torch.equal(fresh.load("t")["w"], w)
    assert fresh.verify().ok and leases.all_leases(bank.storage) == []


def test_a_commit_whose_manifest_landed_despite_an_error_succeeds() -> None:
    bank = _bank(LostReply())
    w = torch.randn(6, 3)
    ps = [bank.save_part({"w": wb.TensorShard(w[i : i + 3], offsets=(i, 0), shape=(6, 3))}) for i in (0, 3)]
    info = bank.commit([p.to_json() for p in ps], run="r", step=1)
    fresh = wb.Bank(bank.storage)
    assert torch.equal(fresh.load(info.id)["w"], w) and fresh.verify().ok
    assert leases.all_leases(bank.storage) == []


def test_a_save_whose_manifest_did_not_land_leaves_its_packs_to_gc() -> None:
    storage = NoManifests()
    bank = _bank(storage)
    with pytest.raises(StorageError, match="Slow Down"):
        bank.save({"w": torch.randn(1000)}, run="r", step=1, codec="raw")
    packs = keys(bank, PACKS)
    assert packs and keys(bank, MANIFESTS) == set() and keys(bank, LEASES) == set()
    assert bank.log() == []
    assert set(bank.gc(grace=0).packs_deleted) == packs  # unreferenced, unleased: gc frees them


def test_a_commit_whose_manifest_did_not_land_can_be_retried() -> None:
    storage = NoManifests()
    bank = _bank(storage)
    w = torch.randn(6, 3)
    ps = [bank.save_part({"w": wb.TensorShard(w[i : i + 3], offsets=(i, 0), shape=(6, 3))}) for i in (0, 3)]
    packs = keys(bank, PACKS)
    with pytest.raises(StorageError):
        bank.commit(ps, run="r", step=1)
    assert keys(bank, PACKS) == packs and len(leases.live(bank.storage)) == 2  # the parts are intact
    storage.fail = False
    assert torch.equal(bank.load(bank.commit(ps, run="r", step=1).id)["w"], w)
    assert leases.all_leases(bank.storage) == []


def test_a_save_that_fails_before_its_manifest_write_deletes_its_packs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from weightbank.bank import writer

    def broken(*args: Any, **kw: Any) -> parts.Merged:
        raise wb.InvalidState("<parts>", "injected")

    bank = wb.open("memory://")
    monkeypatch.setattr(writer, "merge_parts", broken)
    with pytest.raises(wb.InvalidState, match="injected"):
        bank.save({"w": torch.randn(1000)})
    assert keys(bank, PACKS) == set() and keys(bank, LEASES) == set()  # nothing can point at them


# -- M3: packs reused from older checkpoints are checked too --------------------------------------


def test_commit_refuses_a_part_whose_reused_packs_are_gone() -> None:
    bank = wb.open("memory://")
    old, new = torch.randn(1000), torch.randn(1000)
    first = bank.save({"old": old}, run="r", step=1, codec="raw")
    part = bank.save_part({"old": old, "new": new}, codec="raw")  # reuses "old" from the first checkpoint
    assert part.own_packs() and len(part.packs) == 2
    for key in bank._manifest(first.id)[1].packs:
        bank.storage.delete(key)  # what gc does once the part's lease has gone stale
    with pytest.raises(wb.MissingObject, match="gone"):
        bank.commit([part], run="r", step=2)
    assert [c.id for c in bank.log()] == [first.id]
    only_reused = bank.save_part({"old": old}, codec="raw")
    assert only_reused.own_packs() == []  # nothing of its own to check: the reused pack is what matters
    with pytest.raises(wb.MissingObject):
        bank.commit([only_reused], run="r", step=3)
    assert [c.id for c in bank.log()] == [first.id]


# -- M4: two copies of one box must agree ---------------------------------------------------------


def test_two_copies_of_one_box_must_hold_the_same_bytes() -> None:
    bank = wb.open("memory://")

    def box(t: torch.Tensor) -> wb.SavePart:
        return bank.save_part({"w": wb.TensorShard(t, offsets=(0,), shape=(4,))})

    rest = bank.save_part({"w": wb.TensorShard(torch.full((2,), 7.0), offsets=(2,), shape=(4,))})
    with pytest.raises(wb.InvalidState, match=r"store w: .*different contents") as e:
        bank.commit([box(torch.ones(2)), box(torch.zeros(2)), rest])
    assert e.value.path == "w" and keys(bank, MANIFESTS) == set()
    info = bank.commit([box(torch.ones(2)), box(torch.ones(2)), rest])  # a replicated box: kept once
    assert bank.load(info.id)["w"].tolist() == [1.0, 1.0, 7.0, 7.0]
    assert len(bank._manifest(info.id)[1].tensors[0].shards) == 2


# -- M6: what commit is handed ----------------------------------------------------------------------


@pytest.mark.parametrize("given", [5, None, "abc", b"x", {"save": "x"}, [5], [None], [[1, 2]]])
def test_load_parts_refuses_anything_but_parts(given: object) -> None:
    with pytest.raises((wb.InvalidState, wb.CorruptObject)):
        load_parts(given)


def test_load_parts_checks_part_objects_too() -> None:
    bank = wb.open("memory://")
    part = bank.save_part({"w": torch.ones(2)})
    assert load_parts([part, part.to_json()]) == [part, part]
    bad = wb.SavePart(
        part.save_id,
        part.chunk_size,
        part.packs,
        part.chunks,
        (parts.PartTensor("w", "float32", (9,), (0,)),),
    )
    with pytest.raises(wb.CorruptObject, match="hold 8 bytes"):
        load_parts([bad])
    with pytest.raises(wb.CorruptObject):
        bank.commit([bad])
    assert keys(bank, MANIFESTS) == set()
