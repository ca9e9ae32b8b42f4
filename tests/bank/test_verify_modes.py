"""Read verification modes (``verify="always" | "once" | "never"``) against bit flips in packs and cache entries.

``"always"`` and ``"once"`` must never return bytes that differ from what was
saved, whenever the stored bytes are damaged (before the first read, or after
it); ``"once"`` skips the hash only for chunks this process verified from the
same unchanged files. ``"never"`` returns whatever storage holds.
"""

from __future__ import annotations

import gc
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import weightbank as wb
from weightbank.bank import reader, trust
from weightbank.format.hashing import digest as real_digest
from weightbank.serving import ModelCache

from ..conftest import seeded

#: How old a file must be before "once" trusts it, in these tests (the library's is 2 s).
SETTLE = 0.05


@pytest.fixture(autouse=True)
def _fresh_trust(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(trust, "SETTLE_S", SETTLE)
    trust.TRUSTED.forget()
    yield
    trust.TRUSTED.forget()


@pytest.fixture
def hashes(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every chunk hash the load path computes, in order."""
    seen: list[str] = []

    def counting(data: bytes | bytearray | memoryview) -> str:
        out = real_digest(data)
        seen.append(out)
        return out

    monkeypatch.setattr(reader, "digest", counting)
    return seen


def settle(root: Path) -> None:
    """Wait until every file under ``root`` was last changed more than SETTLE ago (a condition, not a count)."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        newest = max((p.stat().st_ctime_ns for p in root.rglob("*") if p.is_file()), default=0)
        if time.time_ns() - newest > SETTLE * 1e9 * 2:
            return
        time.sleep(SETTLE)
    raise AssertionError("files kept changing")


def packs(bank: wb.Bank) -> list[Path]:
    return sorted((Path(bank.url) / "packs").rglob("*.pack"))


def flip(path: Path, offset: int) -> None:
    data = bytearray(path.read_bytes())
    data[offset % len(data)] ^= 0x10
    path.write_bytes(bytes(data))


def release(*objs: object) -> None:
    """Drop loaded tensors (a mapped pack is not rewritten under a live mapping)."""
    del objs
    gc.collect()


STATES = {
    # mapped straight from the pack (raw, >= 64 KiB)
    "raw": ({"w": seeded((256, 256), 0)}, "raw"),
    # decoded (byte planes + zstd), small tensors
    "planes": ({"a": seeded((64, 64), 1), "b": seeded((33,), 2)}, "auto"),
    "zstd": ({"a": seeded((64, 64), 3), "n": torch.arange(100)}, "zstd"),
}


@pytest.mark.parametrize("kind", sorted(STATES))
def test_once_hashes_a_chunk_once_per_unchanged_file(
    local_bank: wb.Bank, hashes: list[str], kind: str
) -> None:
    state, codec = STATES[kind]
    cid = local_bank.save(state, codec=codec).id
    settle(Path(local_bank.url))
    first = local_bank.load(cid, verify="once")
    assert all(torch.equal(first[k], v) for k, v in state.items())
    n_first = len(hashes)
    assert n_first > 0 and len(trust.TRUSTED) > 0
    again = local_bank.load(cid, verify="once")
    assert all(torch.equal(again[k], v) for k, v in state.items())
    assert len(hashes) == n_first, "a chunk verified from the same unchanged file is not hashed again"
    local_bank.load(cid)  # the bank's default is "always"
    assert len(hashes) > n_first


@pytest.mark.parametrize("kind", sorted(STATES))
def test_once_never_returns_bytes_flipped_after_the_first_read(local_bank: wb.Bank, kind: str) -> None:
    state, codec = STATES[kind]
    cid = local_bank.save(state, codec=codec).id
    settle(Path(local_bank.url))
    release(local_bank.load(cid, verify="once"), local_bank.load(cid, verify="once"))
    (pack,) = packs(local_bank)
    flip(pack, 40)
    modes: tuple[trust.Verify, ...] = ("once", "always")
    for mode in modes:
        with pytest.raises(wb.CorruptObject):
            local_bank.load(cid, verify=mode)


def test_never_hashes_nothing_and_returns_what_storage_holds(local_bank: wb.Bank, hashes: list[str]) -> None:
    state = {"w": seeded((256, 256), 5)}
    cid = local_bank.save(state, codec="raw").id
    (pack,) = packs(local_bank)
    flip(pack, 4096)
    with pytest.raises(wb.CorruptObject):
        local_bank.load(cid)
    hashes.clear()
    out = local_bank.load(cid, verify="never")["w"]
    assert hashes == [] and not torch.equal(out, state["w"]), "documented as unsafe: damage goes through"
    never = wb.open(local_bank.url, verify="never")
    assert not torch.equal(never.load(cid)["w"], state["w"])
    with pytest.raises(wb.CorruptObject):
        never.load(cid, verify="always")


def test_once_rechecks_a_chain_when_its_base_pack_changes(local_bank: wb.Bank) -> None:
    base = seeded((1024, 256), 7) * 0.05  # a 1 MiB chunk: worth a delta link
    p = local_bank.save({"w": base}, run="r", step=0).id
    g = torch.Generator().manual_seed(8)
    c = local_bank.save({"w": base - 1e-5 * torch.randn(base.shape, generator=g)}, run="r", step=1).id
    assert "delta" in {ch.codec for ch in local_bank.checkpoint(c).manifest.chunks}
    settle(Path(local_bank.url))
    release(local_bank.load(c, verify="once"), local_bank.load(c, verify="once"))
    parent_pack = Path(local_bank.url) / local_bank.checkpoint(p).manifest.packs[0]
    flip(parent_pack, 100)
    with pytest.raises(wb.CorruptObject):
        local_bank.load(c, verify="once")


def test_once_through_a_remote_banks_disk_cache(tmp_path: Path, hashes: list[str]) -> None:
    bank = wb.open("memory://verify-once", cache=tmp_path / "cache")
    state = {"w": seeded((128, 128), 9)}
    cid = bank.save(state).id
    for _ in range(2):  # fetched and cached; then read from the cache, verified, remembered
        assert torch.equal(bank.load(cid, verify="once")["w"], state["w"])
        settle(tmp_path / "cache")
    n = len(hashes)
    assert torch.equal(bank.load(cid, verify="once")["w"], state["w"])
    assert len(hashes) == n, "the unchanged cache entry is trusted"
    (entry,) = [p for p in (tmp_path / "cache").rglob("*") if p.is_file() and len(p.name) == 64]
    flip(entry, 11)
    # the damaged entry is hashed, discarded and fetched again: the right bytes come back
    assert torch.equal(bank.load(cid, verify="once")["w"], state["w"])
    bank.close()


def test_bad_modes_are_refused(local_bank: wb.Bank, tmp_path: Path) -> None:
    cid = local_bank.save({"w": torch.ones(3)}).id
    with pytest.raises(wb.InvalidArgument, match="verify"):
        wb.open(tmp_path / "other", verify="sometimes")  # type: ignore[arg-type]
    bads: tuple[Any, ...] = ("Once", "", 1)
    for bad in bads:
        with pytest.raises(wb.InvalidArgument, match="verify"):
            local_bank.load(cid, verify=bad)
    with pytest.raises(wb.InvalidArgument):
        local_bank.load_tensors(cid, ["w"], verify="no")  # type: ignore[arg-type]
    with pytest.raises(wb.InvalidArgument):
        local_bank.checkpoint(cid).read([0], verify="no")  # type: ignore[arg-type]
    with pytest.raises(wb.InvalidArgument):
        ModelCache(local_bank, lambda info: torch.nn.Linear(1, 1), verify="no")  # type: ignore[arg-type]


def test_model_cache_reads_with_its_mode(local_bank: wb.Bank) -> None:
    lin = torch.nn.Linear(64, 64)
    cid = local_bank.save(lin.state_dict(), codec="raw").id  # "never" still decodes: raw bytes show it
    (pack,) = packs(local_bank)
    flip(pack, 10)
    strict = ModelCache(local_bank, lambda info: torch.nn.Linear(64, 64))
    with pytest.raises(wb.CorruptObject):
        strict.load(cid)
    strict.close()
    unsafe = ModelCache(local_bank, lambda info: torch.nn.Linear(64, 64), verify="never")
    assert unsafe.load(cid).checkpoint == cid  # the damage is not looked for
    unsafe.close()


def test_load_into_with_once_never_writes_flipped_bytes(local_bank: wb.Bank) -> None:
    src = torch.nn.Linear(128, 128)
    cid = local_bank.save(src.state_dict()).id
    settle(Path(local_bank.url))
    local_bank.load(cid, into=torch.nn.Linear(128, 128), verify="once")
    (pack,) = packs(local_bank)
    flip(pack, 64)
    dst = torch.nn.Linear(128, 128)
    before = dst.weight.detach().clone()
    with pytest.raises(wb.CorruptObject):
        local_bank.load(cid, into=dst, verify="once")
    assert torch.equal(dst.weight, before)


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8, torch.bool]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    dtype=st.sampled_from(DTYPES),
    n=st.integers(1, 40_000),
    codec=st.sampled_from(["raw", "auto", "zstd"]),
    when=st.sampled_from(["before", "after"]),
    where=st.floats(0.0, 1.0),
    mode=st.sampled_from(["always", "once"]),
)
def test_always_and_once_never_return_damaged_bytes(
    tmp_path_factory: pytest.TempPathFactory,
    dtype: torch.dtype,
    n: int,
    codec: str,
    when: str,
    where: float,
    mode: trust.Verify,
) -> None:
    trust.TRUSTED.forget()
    root = tmp_path_factory.mktemp("flips")
    bank = wb.open(root / "bank")
    g = torch.Generator().manual_seed(n)
    if dtype.is_floating_point:
        t = (torch.randn(n, generator=g) * 100).to(dtype)
    else:
        t = torch.randint(0, 2, (n,), generator=g).to(dtype)
    cid = bank.save({"t": t}, codec=codec).id
    (pack,) = packs(bank)
    size = pack.stat().st_size
    if when == "after":
        settle(root)
        release(bank.load(cid, verify=mode), bank.load(cid, verify=mode))
    flip(pack, int(where * (size - 1)))
    try:
        out = bank.load(cid, verify=mode)["t"]
    except wb.CorruptObject:
        return
    finally:
        bank.close()
    assert torch.equal(out.view(torch.uint8), t.view(torch.uint8)), "damaged bytes were returned"
    assert os.path.exists(pack)


def test_once_hashes_what_it_trusted_when_a_file_changes_during_the_load(
    local_bank: wb.Bank, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = {"w": seeded((256, 256), 11), "small": seeded((8,), 12)}
    cid = local_bank.save(state, codec="raw").id
    settle(Path(local_bank.url))
    release(local_bank.load(cid, verify="once"), local_bank.load(cid, verify="once"))
    (pack,) = packs(local_bank)
    real = trust.TRUSTED.trusted
    flipped: list[bool] = []

    def trusted_then_flip(token: object, evidence: trust.Evidence | None) -> bool:
        out = real(token, evidence)
        if out and not flipped:
            flipped.append(True)
            flip(pack, 100)  # inside "w", after its file was looked at and its chunk trusted
        return out

    monkeypatch.setattr(trust.TRUSTED, "trusted", trusted_then_flip)
    with pytest.raises(wb.CorruptObject):
        local_bank.load(cid, verify="once")
    assert flipped
