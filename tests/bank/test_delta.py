"""Codecs in the bank: planes by default, XOR delta chains with keyframes, lossy on request, damage detected."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import weightbank as wb
from weightbank.bank.chunks import chain_of, records_by_hash
from weightbank.format import planner
from weightbank.format.manifest import Manifest
from weightbank.interop import export
from weightbank.storage.local import LocalStorage

from ..conftest import seeded


def training_steps(
    n: int, dtype: torch.dtype = torch.float32, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """``n`` states of a fake fine-tune: small updates to every weight, a step counter, a frozen table."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(512, 256, generator=g) * 0.05
    b = torch.randn(256, generator=g) * 0.01
    frozen = torch.randn(300, 64, generator=g).to(dtype)
    out = []
    for step in range(n):
        out.append({"w": w.to(dtype), "b": b.to(dtype), "frozen": frozen, "step": torch.tensor(step)})
        w = w - 1e-5 * torch.randn(w.shape, generator=g)
        b = b - 1e-5 * torch.randn(b.shape, generator=g)
    return out


def manifest(bank: wb.Bank, ref: str) -> Manifest:
    return bank._catalog.get(bank.resolve(ref))


def chain_lengths(bank: wb.Bank, ref: str, tensor: str) -> list[int]:
    m = manifest(bank, ref)
    index = records_by_hash(m)
    t = next(t for t in m.tensors if t.name == tensor)
    return [len(chain_of(m.chunks[c], index)) for c in t.chunks]


def same_bytes(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and a.reshape(-1).view(torch.uint8).equal(b.reshape(-1).view(torch.uint8))
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_delta_chains_reload_bit_exact_across_keyframes(
    bank: wb.Bank, dtype: torch.dtype, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A generous decode budget, so keyframe_every is what ends the chains here.
    monkeypatch.setattr(planner, "CHAIN_BUDGET", 100.0)
    steps = training_steps(9, dtype)
    infos = [
        bank.save(s, run="r", step=i, keyframe_every=4, chunk_size=128 << 10) for i, s in enumerate(steps)
    ]
    lengths = [chain_lengths(bank, info.id, "w")[0] for info in infos]
    assert lengths == [1, 2, 3, 4, 1, 2, 3, 4, 1], "a keyframe every 4 generations, chains of at most 4"
    for info, state in zip(infos, steps, strict=True):
        got = bank.load(info.id)
        assert all(same_bytes(got[k], v) for k, v in state.items())
    assert bank.verify().ok
    delta_bytes = sum(i.save_stats.per_codec.get("delta", 0) for i in infos if i.save_stats is not None)
    assert delta_bytes > 0
    # The frozen table is deduplicated, never re-stored as a delta.
    assert all(i.save_stats is not None and i.save_stats.new_chunks > 0 for i in infos)


def test_chain_budget_falls_back_to_a_delta_against_the_keyframe(local_bank: wb.Bank) -> None:
    steps = training_steps(5)
    infos = [local_bank.save(s, run="r", step=i) for i, s in enumerate(steps)]
    lengths = [chain_lengths(local_bank, info.id, "w")[0] for info in infos]
    # fp32 links cost about half a chunk: one fits the default budget, then each new
    # chunk is coded against its chain's keyframe (two links), never a longer chain.
    assert lengths == [1, 2, 2, 2, 2], lengths
    first_w = manifest(local_bank, infos[0].id)
    key_hash = first_w.chunks[next(t for t in first_w.tensors if t.name == "w").chunks[0]].hash
    m = manifest(local_bank, infos[-1].id)
    w = next(t for t in m.tensors if t.name == "w")
    assert chain_of(m.chunks[w.chunks[0]], records_by_hash(m))[0].hash == key_hash
    got = local_bank.load(infos[-1].id)
    assert all(same_bytes(got[k], v) for k, v in steps[-1].items())
    assert local_bank.verify().ok


def test_delta_ratio_on_small_updates(local_bank: wb.Bank) -> None:
    steps = training_steps(3)
    first = local_bank.save(steps[0], run="r", step=0)
    second = local_bank.save(steps[1], run="r", step=1)
    assert first.save_stats is not None and second.save_stats is not None
    w_bytes = steps[0]["w"].nbytes
    assert first.save_stats.written_bytes < 0.87 * (w_bytes + steps[0]["frozen"].nbytes)
    assert second.save_stats.per_codec.get("delta", 0) < 0.6 * w_bytes
    detail = local_bank.show(second.id)
    rows = {t.name: t for t in detail.tensors}
    assert rows["w"].codecs == ("delta",) and rows["w"].ratio > 1.6
    assert rows["frozen"].codecs == ("planes",)
    du = local_bank.du()
    assert du.codec_ratio("delta") > 1.6 and du.per_codec_raw["planes"] > du.per_codec["planes"]


def test_keyframe_every_one_and_planes_mode_never_delta(bank: wb.Bank) -> None:
    steps = training_steps(3)
    for i, s in enumerate(steps):
        info = bank.save(s, run="k1", step=i, keyframe_every=1)
        assert "delta" not in (info.save_stats.per_codec if info.save_stats else {})
        info = bank.save(s, run="pl", step=i, codec="planes")
        assert info.save_stats is not None and "delta" not in info.save_stats.per_codec
    with pytest.raises(wb.InvalidState):
        bank.save(steps[0], keyframe_every=0)
    with pytest.raises(wb.InvalidState):
        bank.save(steps[0], lossy="int4")


def test_raw_codec_keeps_the_mmap_fast_path(local_bank: wb.Bank) -> None:
    state = {"w": seeded((256, 256), 0)}
    raw = local_bank.save(state, run="serve", codec="raw")
    assert raw.save_stats is not None and raw.save_stats.written_bytes == state["w"].nbytes
    assert local_bank.show(raw.id).tensors[0].codecs == ("raw",)
    got = local_bank.load(raw.id)["w"]
    assert same_bytes(got, state["w"])
    # Mapped from the pack, not copied: its storage is not torch-allocated memory.
    assert not got.untyped_storage().resizable()


def test_pruned_parent_keeps_the_delta_base_alive(local_bank: wb.Bank) -> None:
    steps = training_steps(3)
    for i, s in enumerate(steps):
        local_bank.save(s, run="r", step=i, codec="planes" if i == 1 else "auto")
    m = manifest(local_bank, "r@2")
    assert any(c.codec == "delta" for c in m.chunks)
    # Every base of every delta is listed in the same manifest.
    index = records_by_hash(m)
    for c in m.chunks:
        assert all(link.hash in index for link in chain_of(c, index))
    pruned = local_bank.prune(keep_last=1)
    assert len(pruned.deleted) == 2
    local_bank.gc(grace=0)
    got = local_bank.load("r@2")
    assert all(same_bytes(got[k], v) for k, v in steps[2].items())
    assert local_bank.verify().ok


def _pack_of(bank: wb.Bank, ref: str, chunk_hash: str) -> tuple[Path, int, int]:
    m = manifest(bank, ref)
    rec = next(c for c in m.chunks if c.hash == chunk_hash)
    assert isinstance(bank.storage, LocalStorage)
    return bank.storage.root / m.packs[rec.pack], rec.offset, rec.stored_len


def test_corrupted_delta_base_is_detected_not_decoded(local_bank: wb.Bank) -> None:
    steps = training_steps(2)
    local_bank.save(steps[0], run="r", step=0)
    child = local_bank.save(steps[1], run="r", step=1)
    m = manifest(local_bank, child.id)
    index = records_by_hash(m)
    w = next(t for t in m.tensors if t.name == "w")
    chain = chain_of(m.chunks[w.chunks[0]], index)
    assert [c.codec for c in chain] == ["planes", "delta"]
    path, offset, length = _pack_of(local_bank, child.id, chain[0].hash)
    data = bytearray(path.read_bytes())
    data[offset + length - 5] ^= 0x10  # inside the base's last plane
    path.write_bytes(bytes(data))
    with pytest.raises(wb.CorruptObject) as e:
        local_bank.load(child.id)
    assert e.value.tensor == "w" and e.value.checkpoint == child.id
    with pytest.raises(wb.CorruptObject):
        local_bank.load("r@0", select="w")
    report = local_bank.verify()
    assert not report.ok
    damaged = {p.tensor for p in report.problems if p.kind == "corrupt"}
    assert "w" in damaged, damaged
    # Loads of untouched tensors still work.
    assert same_bytes(local_bank.load(child.id, select="b")["b"], steps[1]["b"])
    # The next save does not delta against the damaged base: it stores a keyframe.
    third = local_bank.save(training_steps(3)[2], run="r", step=2)
    assert chain_lengths(local_bank, third.id, "w") == [1]


def test_unknown_codec_is_refused_with_an_upgrade_message(local_bank: wb.Bank) -> None:
    info = local_bank.save({"w": seeded((64, 64), 0)})
    m = manifest(local_bank, info.id)
    obj = m.to_json()
    obj["chunks"][0][2] = "zfp-v9"
    obj["format"] = 1  # a one-document manifest (format 3 keeps codecs in its location head: tests/attacks)
    del obj["segments"]
    data = json.dumps(obj, separators=(",", ":")).encode()
    from weightbank.bank.layout import manifest_key
    from weightbank.format.hashing import digest

    local_bank.storage.write(manifest_key(digest(data)), data)
    with pytest.raises(wb.UnsupportedFormat, match="upgrade"):
        local_bank.load(digest(data))


def test_old_codecs_stay_readable(bank: wb.Bank) -> None:
    state = {"a": seeded((128, 128), 1), "z": torch.zeros(4096)}
    for codec in ("raw", "zstd"):
        info = bank.save(state, run=codec, codec=codec)
        got = bank.load(info.id)
        assert all(same_bytes(got[k], v) for k, v in state.items())
    assert bank.verify().ok


@pytest.mark.parametrize("method", ["int8", "fp8"])
def test_lossy_is_marked_and_within_its_recorded_error(bank: wb.Bank, method: str) -> None:
    lin = torch.nn.Linear(256, 128)
    state = {
        "weight": lin.weight.detach().clone(),
        "bias": lin.bias.detach().clone(),
        "ids": torch.arange(10),
    }
    info = bank.save(state, lossy=method, tags=["q"])
    assert info.is_lossy and set(info.lossy) == {"weight"}, "1-D and integer tensors stay lossless"
    rec = info.lossy["weight"]
    assert rec["codec"] == method and rec["max_abs"] > 0 and 0 < rec["rel_err"] < 0.05
    got = bank.load("q")
    err = (got["weight"].double() - state["weight"].double()).abs().max().item()
    assert err == pytest.approx(rec["max_abs"], rel=1e-9)
    rel = (
        (got["weight"].double() - state["weight"].double()).norm() / state["weight"].double().norm()
    ).item()
    assert rel == pytest.approx(rec["rel_err"], rel=1e-6)
    assert same_bytes(got["bias"], state["bias"]) and same_bytes(got["ids"], state["ids"])
    shown = bank.show(info.id)
    assert {t.name: t.lossy.get("codec") for t in shown.tensors} == {
        "weight": method,
        "bias": None,
        "ids": None,
    }
    assert bank.log()[0].is_lossy and bank.verify().ok
    result = bank.load("q", into=torch.nn.Linear(256, 128), select=["weight", "bias"])
    assert result.checkpoint.is_lossy
    lossless = bank.save(state)
    assert not lossless.is_lossy and lossless.lossy == {}


def test_frozen_layers_store_only_the_trained_tensors(local_bank: wb.Bank) -> None:
    g = torch.Generator().manual_seed(5)
    state = {f"layer{i}": torch.randn(256, 256, generator=g) for i in range(8)}
    local_bank.save(state, run="ft", step=0)
    trained = local_bank.save(
        {**state, "layer7": state["layer7"] + 1e-3 * torch.randn(256, 256, generator=g)}, run="ft", step=1
    )
    assert trained.save_stats is not None
    assert trained.save_stats.new_chunks == 1 and trained.save_stats.reused_chunks == 7


@pytest.mark.parametrize("method", ["int8", "fp8"])
def test_export_quantize_writes_codes_scales_and_errors(
    local_bank: wb.Bank, tmp_path: Path, method: str
) -> None:
    from safetensors import safe_open

    state = {"w": seeded((64, 32), 0), "b": seeded((32,), 1)}
    local_bank.save(state, tags=["v"])
    out = export(local_bank, "v", tmp_path / "q.safetensors", quantize=method)
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
        codes = f.get_tensor("w")
        scale = f.get_tensor("w.weightbank_scale")
    assert keys == {"w", "w.weightbank_scale", "b"}
    assert codes.dtype == (torch.int8 if method == "int8" else torch.float8_e4m3fn) and scale.shape == (64, 1)
    info = json.loads(meta["weightbank_quantized"])
    back = codes.float() * scale
    assert (back - state["w"]).abs().max().item() == pytest.approx(info["w"]["max_abs"], rel=1e-6)
    assert info["w"]["codec"] == method
    with pytest.raises(wb.ExternalFileError):
        export(local_bank, "v", tmp_path / "q2.safetensors", quantize="int3")


def test_chunk_equal_to_its_parent_is_reused_even_if_the_index_misses_it(tmp_path: Path) -> None:
    bank = wb.open(tmp_path / "b")
    g = torch.Generator().manual_seed(0)
    state = {"w": torch.randn(256, 256, generator=g)}
    first = bank.save(state, run="r", step=1)

    class FindsNothing:
        def get(self, h: str) -> None:
            return None

    # As if the bank-wide chunk index knew nothing of the parent's chunks.
    bank._catalog.chunk_finder = FindsNothing  # type: ignore[method-assign, assignment]
    second = bank.save(state, run="r", step=2)
    assert second.parent == first.id and second.save_stats is not None
    assert second.save_stats.written_bytes == 0
    assert torch.equal(bank.load(second.id)["w"], state["w"]) and bank.verify().ok
