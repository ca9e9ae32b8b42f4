"""``Bank.info`` and ``Bank.checkpoint``: metadata without the tensor table, and a checkpoint resolved once."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

import weightbank as wb
from weightbank.bank.shards import region_of

from ..conftest import seeded


def _counting_resolve(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every ``Bank.resolve`` call from here on, by ref."""
    calls: list[str] = []
    real: Callable[[wb.Bank, str], str] = wb.Bank.resolve

    def resolve(self: wb.Bank, ref: str) -> str:
        calls.append(ref)
        return real(self, ref)

    monkeypatch.setattr(wb.Bank, "resolve", resolve)
    return calls


def test_info_and_show_agree_on_the_metadata() -> None:
    bank = wb.open("memory://")
    bank.save({"w": torch.ones(3)}, run="r", step=1)
    cid = bank.save(
        {"w": torch.zeros(3), "b": [torch.ones(2)], "n": 4},
        run="r",
        step=2,
        metrics={"loss": 0.25, "acc": 0.5},
        config={"width": 3},
        meta={"note": "x"},
        message="second",
        tags=["prod", "best"],
    ).id
    detail = bank.show("r@2")
    info = bank.info("r@2")
    assert info == dataclasses.replace(detail.info, tags=())
    assert info.id == cid and info.step == 2 and info.n_tensors == 2 and info.message == "second"
    assert info.config == {"width": 3} and info.meta == {"note": "x"} and info.metrics["loss"] == 0.25
    assert bank.info("r@2", tags=True) == detail.info
    assert bank.info("prod", tags=True).tags == ("best", "prod")
    assert bank.info("r@1", tags=True).tags == ()


def test_checkpoint_holds_id_manifest_and_info() -> None:
    bank = wb.open("memory://")
    a, c = seeded((4, 5), 0), seeded((7,), 1)
    state = {"a": a, "b": {"c": c}, "step": 9}
    cid = bank.save(state, run="r", step=9, tags=["prod"]).id
    ck = bank.checkpoint("prod")
    assert isinstance(ck, wb.Checkpoint)
    assert ck.id == cid and ck.info == bank.info(cid) and ck.info.tags == ()
    assert ck.tensor_names == ("a", "b.c") == tuple(t.name for t in ck.manifest.tensors)
    assert ck == bank.checkpoint(cid) and hash(ck) == hash(bank.checkpoint(cid[:10]))
    assert cid[:12] in repr(ck) and "'r'" in repr(ck)
    got = ck.read([0, 1])
    assert torch.equal(got[0], a) and torch.equal(got[1], c)
    assert list(ck.load_tensors(["b.c"])) == ["b.c"]
    whole = ck.tree_value(ck.manifest.tree)
    assert whole["step"] == 9 and torch.equal(whole["a"], a)
    [region] = ck.read_regions([region_of(ck.manifest, 0, None, (1, 2), (2, 3))])
    assert torch.equal(region, a[1:3, 2:5])
    with pytest.raises(wb.IncompatibleState, match="no tensor"):
        ck.load_tensors(["nope"])


def test_read_into_writes_verified_bytes_in_place() -> None:
    bank = wb.open("memory://")
    w = seeded((16,), 2)
    ck = bank.checkpoint(bank.save({"w": w}).id)
    out = torch.zeros(16)
    assert ck.read([0], into={0: out})[0] is out and torch.equal(out, w)


def test_checkpoint_resolves_once_and_a_moved_tag_does_not_move_it(monkeypatch: pytest.MonkeyPatch) -> None:
    bank = wb.open("memory://")
    first = bank.save({"w": torch.ones(2)}, tags=["prod"]).id
    calls = _counting_resolve(monkeypatch)
    ck = bank.checkpoint("prod")
    assert calls == ["prod"]
    bank.save({"w": torch.zeros(2)}, tags=["prod"])
    calls.clear()
    assert ck.id == first and ck.load_tensors(["w"])["w"].tolist() == [1.0, 1.0]
    assert ck.tree_value(ck.manifest.tree)["w"].tolist() == [1.0, 1.0]
    ck.read_regions([region_of(ck.manifest, 0, None, (0,), (1,))])
    assert calls == [], "reading from a handle never resolves again"


def test_reads_from_a_handle_are_verified(tmp_path: Path) -> None:
    bank = wb.open(tmp_path / "bank")
    cid = bank.save({"w": seeded((256,), 3)}, codec="raw").id
    ck = bank.checkpoint(cid)
    [pack] = (tmp_path / "bank" / "packs").rglob("*.pack")
    data = bytearray(pack.read_bytes())
    data[len(data) // 2] ^= 0x01
    pack.write_bytes(bytes(data))
    with pytest.raises(wb.CorruptObject) as e:
        ck.read([0])
    assert e.value.checkpoint == cid
    with pytest.raises(wb.CorruptObject):
        ck.load_tensors(["w"])
    with pytest.raises(wb.CorruptObject):
        ck.read_regions([region_of(ck.manifest, 0, None, (0,), (256,))])


def test_unknown_refs_are_checkpoint_not_found() -> None:
    bank = wb.open("memory://")
    bank.save({"w": torch.ones(1)}, run="r", step=1)
    for ref in ("nope", "r@7", "0" * 64):
        with pytest.raises(wb.CheckpointNotFound):
            bank.info(ref)
        with pytest.raises(wb.CheckpointNotFound):
            bank.checkpoint(ref)


def test_read_options_are_the_banks() -> None:
    bank = wb.open("memory://", workers=3)
    opts = bank.read_options()
    assert opts.storage is bank.storage and opts.workers == 3 and opts.cache is bank.cache
    assert opts.pool is bank.read_options().pool
    assert opts.kwargs() == {"workers": 3, "pool": opts.pool, "cache": bank.cache, "verify": "always"}
    assert wb.open("memory://", verify="once").read_options().verify == "once"


def test_a_cold_lease_resolves_its_ref_once(monkeypatch: pytest.MonkeyPatch) -> None:
    bank = wb.open("memory://")
    bank.save(torch.nn.Linear(2, 2).state_dict(), tags=["prod"])
    cache = wb.ModelCache(bank, build=lambda info: torch.nn.Linear(2, 2))
    calls = _counting_resolve(monkeypatch)
    with cache.lease("prod") as model:
        assert model(torch.ones(1, 2)).shape == (1, 2)
    assert calls == ["prod"]
    cache.close()


def test_a_cold_lease_of_an_id_resolves_once_and_a_host_promotion_not_at_all(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bank = wb.open("memory://")
    torch.manual_seed(0)
    a, b = (bank.save(torch.nn.Linear(4, 4).state_dict(), run=r).id for r in ("a", "b"))
    cache = wb.ModelCache(
        bank, build=lambda info: torch.nn.Linear(4, 4), budget={"device": 100, "host": 1000}
    )
    calls = _counting_resolve(monkeypatch)
    cache.load(a)
    assert calls == [a]
    calls.clear()
    cache.load(b)  # a (80 bytes) is demoted to the host tier to make room
    assert calls == [b] and cache.status(a).tier == "host"
    calls.clear()
    cache.load(a)  # promoted back by a copy, from the plan made the first time
    assert calls == [] and cache.status(a).tier == "device"
    assert cache.stats().bytes_loaded == {"host": 80, "bank": 160}
    cache.close()
