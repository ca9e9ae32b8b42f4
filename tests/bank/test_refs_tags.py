"""Refs resolve as documented; tags move by compare-and-swap and keep their whole history."""

from __future__ import annotations

import pytest
import torch

import weightbank as wb
from weightbank.bank.catalog import Catalog
from weightbank.bank.index.records import CatalogRecord
from weightbank.bank.listing import ScanView
from weightbank.bank.refs import parse, resolve
from weightbank.bank.tags import TagStore
from weightbank.storage import MemoryStorage


@pytest.fixture
def chain(bank: wb.Bank) -> list[str]:
    ids = []
    for step, loss in [(10, 3.0), (20, 1.0), (30, 2.0), (40, float("nan"))]:
        ids.append(
            bank.save(
                {"w": torch.full((3,), float(step))},
                run="tts",
                step=step,
                metrics={"val_loss": loss, "acc": step / 100},
            ).id
        )
    return ids


def test_ref_forms(bank: wb.Bank, chain: list[str]) -> None:
    a, b, c, d = chain
    assert bank.resolve(a) == a
    assert bank.resolve(a[:6]) == a
    assert bank.resolve("tts@20") == b
    assert bank.resolve("tts@latest") == d
    assert bank.resolve("tts@best:val_loss") == b, "min by default; NaN never wins"
    assert bank.resolve("tts@best:val_loss:max") == a
    assert bank.resolve("tts@best:acc:max") == d
    assert bank.resolve("tts@latest~1") == c
    assert bank.resolve("tts@latest~") == c
    assert bank.resolve("tts@latest~~") == b
    assert bank.resolve("tts@latest~3") == a
    bank.tag("prod", "tts@20")
    assert bank.resolve("prod") == b
    assert bank.resolve("prod~1") == a


def test_same_step_saved_twice_resolves_to_newest(bank: wb.Bank) -> None:
    bank.save({"w": torch.zeros(1)}, run="r", step=5)
    second = bank.save({"w": torch.ones(1)}, run="r", step=5).id
    assert bank.resolve("r@5") == second


def test_unknown_refs_suggest(bank: wb.Bank, chain: list[str]) -> None:
    bank.tag("prod", "tts@latest")
    with pytest.raises(wb.CheckpointNotFound) as e:
        bank.resolve("prdo")
    assert "prod" in e.value.suggestions and "did you mean" in str(e.value)
    with pytest.raises(KeyError):  # CheckpointNotFound is a KeyError too
        bank.resolve("tts@999")
    with pytest.raises(wb.CheckpointNotFound, match="tts@10"):
        bank.resolve("tts@11")
    with pytest.raises(wb.CheckpointNotFound, match="no run"):
        bank.resolve("ttx@latest")
    with pytest.raises(wb.CheckpointNotFound, match="metric"):
        bank.resolve("tts@best:bleu")
    with pytest.raises(wb.CheckpointNotFound, match="no parent"):
        bank.resolve("tts@latest~9")
    with pytest.raises(wb.CheckpointNotFound):
        bank.resolve("abcdef12")


@pytest.mark.parametrize(
    "ref", ["", "~1", "tts@", "@latest", "tts@best", "tts@foo", "abc", "a\x00b", "tts@best:x:median"]
)
def test_invalid_refs(bank: wb.Bank, chain: list[str], ref: str) -> None:
    with pytest.raises((wb.InvalidRef, wb.InvalidName, wb.CheckpointNotFound)):
        bank.resolve(ref)


def test_short_prefix_is_invalid(bank: wb.Bank, chain: list[str]) -> None:
    with pytest.raises(wb.InvalidRef, match="at least 6"):
        bank.resolve(chain[0][:5])


def test_parse_adds_up_suffixes() -> None:
    assert parse("x~2~3") == ("x", 5)
    assert parse("prod@{2}~") == ("prod@{2}", 1)


def test_ambiguous_prefix_lists_matches() -> None:
    ids = ["abcdef01" + "0" * 56, "abcdef02" + "0" * 56, "99" * 32]

    class FakeCatalog(Catalog):
        def view(self) -> ScanView:
            return ScanView(
                {c: CatalogRecord(id=c, run="r", step=None, parent=None, created=0.0) for c in ids}
            )

        def exists(self, cid: str) -> bool:
            return cid in ids

    storage = MemoryStorage()
    cat = FakeCatalog(storage, indexed=True)
    with pytest.raises(wb.AmbiguousRef) as e:
        resolve("abcdef", cat, TagStore(storage))
    assert len(e.value.matches) == 2 and "abcdef01" in str(e.value)
    assert resolve("abcdef02", cat, TagStore(storage)).startswith("abcdef02")


def test_tag_history_rollback_and_reflog(bank: wb.Bank, chain: list[str]) -> None:
    a, b, c, _ = chain
    bank.tag("prod", a, why="first")
    bank.tag("prod", b)
    bank.tag("prod", c, why="promote")
    assert bank.resolve("prod@{0}") == c and bank.resolve("prod@{1}") == b and bank.resolve("prod@{2}") == a
    assert bank.rollback("prod", why="bad").new == b
    assert bank.rollback("prod").new == a, "rollback walks back, it does not flip-flop"
    with pytest.raises(wb.NoHistory):
        bank.rollback("prod")
    bank.tag("prod", c)
    assert bank.rollback("prod", steps=1).new == a
    hist = bank.tag_history("prod")
    assert [e.action for e in hist] == ["set", "set", "set", "rollback", "rollback", "set", "rollback"]
    assert hist[0].old is None and hist[0].new == a and hist[0].why == "first"
    assert hist[3].old == c and hist[3].new == b and hist[3].why == "bad"
    assert all(e.by and e.at > 0 for e in hist)
    assert [t.name for t in bank.tags()] == ["prod"]


def test_untag_keeps_history_and_rollback_restores(bank: wb.Bank, chain: list[str]) -> None:
    bank.tag("prod", chain[0])
    bank.untag("prod", why="retire")
    with pytest.raises(wb.TagNotFound, match="removed"):
        bank.resolve("prod")
    assert bank.tags() == []
    assert bank.tag_history("prod")[-1].action == "untag"
    with pytest.raises(wb.TagNotFound):
        bank.untag("prod")
    assert bank.rollback("prod").new == chain[0]
    assert bank.resolve("prod") == chain[0]
    with pytest.raises(wb.TagNotFound):
        bank.tag_history("never")
    with pytest.raises(wb.TagNotFound):
        bank.rollback("never")


def test_tag_compare_and_swap(bank: wb.Bank, chain: list[str]) -> None:
    a, b, c, _ = chain
    bank.tag("prod", a, expect=None)
    with pytest.raises(wb.ConcurrentUpdate):
        bank.tag("prod", b, expect=None)
    bank.tag("prod", b, expect=a[:8])
    with pytest.raises(wb.ConcurrentUpdate, match="expected"):
        bank.tag("prod", c, expect=a)
    assert bank.resolve("prod") == b
    assert len(bank.tag_history("prod")) == 2


def test_save_with_tags(bank: wb.Bank) -> None:
    info = bank.save({"w": torch.ones(1)}, run="r", step=1, tags=["candidate", "nightly"])
    assert info.tags == ("candidate", "nightly")
    assert bank.resolve("candidate") == bank.resolve("nightly") == info.id


@pytest.mark.parametrize(
    "name",
    [
        "../x",
        "a/b",
        "a\\b",
        "..",
        ".hidden",
        "-x",
        "x y",
        "a\x00",
        "a\nb",
        "p@1",
        "a~b",
        "a:b",
        "x{1}",
        "",
        "a" * 129,
    ],
)
def test_bad_tag_names_refused_and_nothing_written(bank: wb.Bank, chain: list[str], name: str) -> None:
    with pytest.raises(wb.InvalidName):
        bank.tag(name, chain[0])
    with pytest.raises(wb.InvalidName):
        bank.save({"w": torch.ones(1)}, tags=[name])
    assert len(bank.log()) == len(chain), "a bad tag name fails the save before it writes"
    assert bank.tags() == []


@pytest.mark.parametrize("name", ["a/b", "..", "x@y", ""])
def test_bad_run_names(bank: wb.Bank, name: str) -> None:
    with pytest.raises(wb.InvalidName):
        bank.save({"w": torch.ones(1)}, run=name)
    assert bank.log() == []


def test_rollback_onto_a_deleted_checkpoint_is_refused(bank: wb.Bank, chain: list[str]) -> None:
    a, b, *_ = chain
    bank.tag("prod", a)
    bank.tag("prod", b)
    bank.delete(a)
    with pytest.raises(wb.CheckpointNotFound, match="deleted"):
        bank.rollback("prod")
    assert bank.resolve("prod") == b and len(bank.tag_history("prod")) == 2
