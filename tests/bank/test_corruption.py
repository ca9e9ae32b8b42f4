"""Every chunk is verified on read: damaged bytes raise CorruptObject and are never returned."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import zstandard

import weightbank as wb
from weightbank.format.stored import MAGIC, split_object

from ..conftest import seeded


def pack_files(bank: wb.Bank) -> list[Path]:
    return sorted((Path(bank.url) / "packs").rglob("*.pack"))


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("codec", ["raw", "zstd"])
def test_flipped_bit_detected_with_names(local_bank: wb.Bank, codec: str) -> None:
    state = {"a": seeded((64, 64), 0), "b": torch.zeros(64, 64)}
    info = local_bank.save(state, run="r", step=1, codec=codec)
    (pack,) = pack_files(local_bank)
    flip(pack, pack.stat().st_size - 3)  # inside the last chunk written ("b")
    with pytest.raises(wb.CorruptObject) as e:
        local_bank.load(info.id)
    err = e.value
    assert err.checkpoint == info.id and err.tensor == "b" and err.key.endswith(".pack")
    assert "b" in str(err) and info.id[:12] in str(err)
    # the undamaged tensor still loads on its own
    assert torch.equal(local_bank.load(info.id, select="a")["a"], state["a"])
    report = local_bank.verify()
    assert not report.ok and {p.kind for p in report.problems} == {"corrupt"}
    assert report.problems[0].tensor == "b" and report.problems[0].checkpoint == info.id
    assert local_bank.verify(full=False).ok, "a quick verify only checks presence and sizes"


def test_corrupt_load_into_module_never_writes_wrong_bytes(local_bank: wb.Bank) -> None:
    src = torch.nn.Linear(64, 64)
    info = local_bank.save(src.state_dict())
    (pack,) = pack_files(local_bank)
    flip(pack, 10)  # inside "weight"
    dst = torch.nn.Linear(64, 64)
    before = dst.weight.detach().clone()
    with pytest.raises(wb.CorruptObject):
        local_bank.load(info.id, into=dst)
    assert torch.equal(dst.weight, before)


def test_truncated_and_missing_packs(local_bank: wb.Bank) -> None:
    info = local_bank.save({"w": seeded((128, 128), 1)})
    (pack,) = pack_files(local_bank)
    data = pack.read_bytes()
    pack.write_bytes(data[: len(data) // 2])
    with pytest.raises(wb.CorruptObject, match="truncated"):
        local_bank.load(info.id)
    assert not local_bank.verify(full=False).ok
    pack.unlink()
    with pytest.raises(wb.MissingObject) as e:
        local_bank.load(info.id)
    assert isinstance(e.value, FileNotFoundError)
    assert [p.kind for p in local_bank.verify().problems] == ["missing"]


def test_tampered_manifest_detected_by_its_id(local_bank: wb.Bank) -> None:
    info = local_bank.save({"w": torch.ones(4)}, run="r", step=1, metrics={"loss": 1.0})
    path = Path(local_bank.url) / "manifests" / info.id[:2] / f"{info.id}.json"
    content, head = split_object(path.read_bytes(), "m")
    forged = MAGIC + content.replace(b'"loss":1.0', b'"loss":0.1') + b"\x00" + head
    path.write_bytes(zstandard.ZstdCompressor().compress(forged))  # a valid frame: only the id can tell
    with pytest.raises(wb.CorruptObject, match="manifest content changed"):
        wb.open(local_bank.url).load(info.id)
    path.write_bytes(
        zstandard.ZstdCompressor(write_checksum=True).compress(MAGIC + content + b"\x00" + head)[:-3]
    )
    with pytest.raises(wb.CorruptObject, match="zstd"):
        wb.open(local_bank.url).load(info.id)


def test_corrupt_tag_record(local_bank: wb.Bank) -> None:
    local_bank.save({"w": torch.ones(1)}, tags=["prod"])
    (Path(local_bank.url) / "refs" / "tags" / "prod.json").write_text("{oops")
    with pytest.raises(wb.CorruptObject, match="tag record"):
        local_bank.resolve("prod")
