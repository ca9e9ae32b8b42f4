"""Save/load round-trips: every dtype, odd shapes and layouts, nesting, tied weights, partial loads."""

from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import weightbank as wb
from weightbank.format.dtypes import SUPPORTED
from weightbank.storage import LocalStorage

from ..conftest import seeded


def bits(t: torch.Tensor) -> bytes:
    return bytes(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and bits(a) == bits(b)


def random_of(dtype: torch.dtype, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """Random bit patterns (NaN payloads, -0.0, denormals included) of any dtype."""
    n = math.prod(shape) * dtype.itemsize
    raw = torch.randint(0, 256, (n,), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))
    if dtype == torch.bool:
        return (raw % 2).to(torch.bool).reshape(shape)
    return raw.view(dtype).reshape(shape)


@pytest.mark.parametrize("name", sorted(SUPPORTED))
def test_every_dtype_round_trips_bit_exact(bank: wb.Bank, name: str) -> None:
    dtype = SUPPORTED[name]
    state = {
        "big": random_of(dtype, (33, 17), 1),
        "scalar": random_of(dtype, (), 2),
        "empty": random_of(dtype, (0, 5), 3),
    }
    info = bank.save(state, run=f"dt-{name}", step=0)
    out = bank.load(info.id)
    for k, v in state.items():
        assert same_bits(out[k], v), k


def test_special_float_values_bit_exact(bank: wb.Bank) -> None:
    t = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-45, -1e-40, 3.4e38])
    payload_nan = (
        torch.tensor([0x7FC00123, 0xFFA00001], dtype=torch.int64).to(torch.uint32).view(torch.float32)
    )
    out = bank.load(bank.save({"t": t, "p": payload_nan}).id)
    assert same_bits(out["t"], t) and same_bits(out["p"], payload_nan)


def test_multi_chunk_tensors_and_small_chunks(bank: wb.Bank) -> None:
    state = {f"w{i}": seeded((300, 77), i) for i in range(5)}
    info = bank.save(state, chunk_size=4096)
    assert info.save_stats is not None and info.save_stats.new_chunks > 5 * 20
    out = bank.load(info.id)
    assert all(same_bits(out[k], v) for k, v in state.items())


def test_non_contiguous_views_round_trip(bank: wb.Bank) -> None:
    base = seeded((64, 48), 0)
    state = {
        "t": base.t(),
        "s": base[::3, 1::2],
        "e": base.expand(2, 64, 48)[1],
        "x": base.unsqueeze(0).expand(3, 64, 48),
    }
    out = bank.load(bank.save(state, chunk_size=1024).id)
    for k, v in state.items():
        assert torch.equal(out[k], v) and out[k].is_contiguous(), k


def test_nested_state_with_optimizer_and_values(bank: wb.Bank) -> None:
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched = torch.optim.lr_scheduler.StepLR(opt, 10)
    np_state = np.random.get_state(legacy=True)
    assert isinstance(np_state, tuple)  # the legacy form: ("MT19937", keys, pos, has_gauss, cached_gaussian)
    state = {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "sched": sched.state_dict(),
        "rng": {"torch": torch.get_rng_state(), "np": np_state[1]},
        "values": {"inf": float("inf"), "none": None, "t": (1, "two", [3.0, True])},
    }
    out = bank.load(bank.save(state, run="train", step=1).id)
    assert out["values"] == {"inf": float("inf"), "none": None, "t": (1, "two", [3.0, True])}
    assert torch.equal(out["rng"]["torch"], state["rng"]["torch"])
    assert isinstance(out["rng"]["np"], np.ndarray)
    opt2 = torch.optim.AdamW(torch.nn.Linear(4, 3).parameters(), lr=1e-3)
    opt2.load_state_dict(out["optim"])
    assert opt2.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
    sched2 = torch.optim.lr_scheduler.StepLR(opt2, 10)
    sched2.load_state_dict(out["sched"])


class Tied(torch.nn.Module):
    """An embedding and a decoder that share one weight, and a norm."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(50, 8)
        self.decoder = torch.nn.Linear(8, 50)
        self.decoder.weight = self.embed.weight
        self.norm = torch.nn.LayerNorm(8)


def tied_model() -> Tied:
    return Tied()


def test_tied_weights_stored_once_and_come_back_tied(bank: wb.Bank) -> None:
    src = tied_model()
    info = bank.save(src.state_dict())
    assert info.nbytes == (50 * 8 + 50 + 8 + 8) * 4, "the shared storage counts once"
    flat = bank.load(info.id)
    assert flat["embed.weight"] is flat["decoder.weight"]
    dst = tied_model()
    res = bank.load(info.id, into=dst)
    assert dst.decoder.weight is dst.embed.weight
    assert torch.equal(dst.embed.weight, src.embed.weight)
    assert set(res.loaded) == set(src.state_dict())


def test_partial_load_in_place(bank: wb.Bank) -> None:
    src = tied_model()
    bank.save(src.state_dict(), run="tts", step=1)
    dst = tied_model()
    before_embed = dst.embed.weight.detach().clone()
    ptr = dst.norm.weight.data_ptr()
    res = bank.load("tts@latest", into=dst, select="norm.*")
    assert sorted(res.loaded) == ["norm.bias", "norm.weight"]
    assert torch.equal(dst.norm.weight, src.norm.weight) and dst.norm.weight.data_ptr() == ptr
    assert torch.equal(dst.embed.weight, before_embed), "unselected tensors untouched"
    sub = bank.load("tts@latest", select=["norm.*", "decoder.bias"])
    assert sorted(sub) == ["decoder.bias", "norm.bias", "norm.weight"]


def test_load_into_checks_before_writing(bank: wb.Bank) -> None:
    bank.save(torch.nn.Linear(4, 3).state_dict(), tags=["lin"])
    wrong = torch.nn.Linear(4, 5)
    before = {k: v.clone() for k, v in wrong.state_dict().items()}
    with pytest.raises(wb.IncompatibleState, match="shape"):
        bank.load("lin", into=wrong)
    assert all(torch.equal(before[k], v) for k, v in wrong.state_dict().items())
    with pytest.raises(wb.IncompatibleState, match="missing"):
        bank.load("lin", into=torch.nn.Sequential(torch.nn.Linear(4, 3)))
    half = torch.nn.Linear(4, 3).to(torch.float16)
    with pytest.raises(wb.IncompatibleState, match="dtype"):
        bank.load("lin", into=half)
    bank.load("lin", into=half, dtype=torch.float16)  # explicit conversion is allowed
    assert half.weight.dtype == torch.float16
    with pytest.raises(wb.IncompatibleState, match="matches no tensor"):
        bank.load("lin", select="nothing.*")


def test_dtype_is_explicit_only(bank: wb.Bank) -> None:
    info = bank.save({"f": torch.ones(3), "i": torch.arange(3)})
    plain = bank.load(info.id)
    assert plain["f"].dtype == torch.float32
    cast = bank.load(info.id, dtype=torch.bfloat16)
    assert cast["f"].dtype == torch.bfloat16 and cast["i"].dtype == torch.int64


def test_device_argument(bank: wb.Bank) -> None:
    info = bank.save({"w": torch.ones(2)})
    assert bank.load(info.id, device="cpu")["w"].device.type == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(wb.DeviceError, match="CUDA is not available"):
            bank.load(info.id, device="cuda:0")
    with pytest.raises(wb.DeviceError):
        bank.load(info.id, device="tpu:0")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_load_to_cuda(bank: wb.Bank) -> None:  # pragma: no cover - runs on GPU machines
    state = {"w": seeded((128, 64), 0), "b": torch.arange(7)}
    out = bank.load(bank.save(state).id, device="cuda:0")
    assert out["w"].device.type == "cuda" and torch.equal(out["w"].cpu(), state["w"])
    cuda_state = {"w": state["w"].cuda()}
    assert torch.equal(bank.load(bank.save(cuda_state).id)["w"], state["w"])


def test_unchanged_save_writes_only_a_manifest(local_bank: wb.Bank) -> None:
    state = {f"w{i}": seeded((256, 256), i) for i in range(8)}
    a = local_bank.save(state, run="r", step=1)
    assert isinstance(local_bank.storage, LocalStorage)
    packs_before = sorted(p.name for p in (local_bank.storage.root / "packs").rglob("*.pack"))
    b = local_bank.save(state, run="r", step=2)
    assert b.save_stats is not None
    assert b.save_stats.written_bytes == 0 and b.save_stats.packs == 0
    assert sorted(p.name for p in (local_bank.storage.root / "packs").rglob("*.pack")) == packs_before
    assert b.parent == a.id


def test_dedup_across_runs_and_within_a_state(bank: wb.Bank) -> None:
    w = seeded((512, 512), 7)
    a = bank.save({"a": w, "b": w.clone()}, run="one", codec="raw")
    assert a.save_stats is not None and a.save_stats.written_bytes == w.numel() * 4
    b = bank.save({"x": w.clone(), "y": seeded((8,), 1)}, run="two", codec="raw")
    assert b.save_stats is not None and b.save_stats.written_bytes == 8 * 4
    du = bank.du()
    assert du.logical_bytes == 3 * w.numel() * 4 + 32 and du.unique_bytes == w.numel() * 4 + 32


def test_lineage_and_cross_run_parent(bank: wb.Bank) -> None:
    p1 = bank.save({"w": torch.zeros(2)}, run="pretrain", step=100, metrics={"val_loss": 2.0})
    p2 = bank.save({"w": torch.ones(2)}, run="pretrain", step=200, metrics={"val_loss": 1.0})
    ft = bank.save({"w": torch.ones(2) * 3}, run="ft", step=0, parent="pretrain@best:val_loss")
    ft2 = bank.save({"w": torch.ones(2) * 4}, run="ft", step=1)
    root = bank.save({"w": torch.ones(2)}, run="ft", step=2, parent=None)
    assert p2.parent == p1.id and ft.parent == p2.id and ft2.parent == ft.id and root.parent is None
    assert bank.resolve("ft@1~2") == p2.id


def test_metadata_recorded(bank: wb.Bank, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    repo = tmp_path / "repo"
    repo.mkdir()
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@x",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@x",
    }
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True, env=env)
    subprocess.run(["git", "commit", "-q", "--allow-empty", "-m", "x"], cwd=repo, check=True, env=env)
    head = subprocess.run(
        ["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True, check=True
    ).stdout.strip()
    monkeypatch.chdir(repo)
    info = bank.save(
        {"w": torch.ones(1)},
        run="r",
        step=5,
        metrics={"val_loss": 0.42, "nan": float("nan")},
        config={"lr": 3e-4, "layers": [1, 2]},
        message="after warmup",
        meta={"dataset": "x"},
    )
    shown = bank.show(info.id).info
    assert shown.metrics["val_loss"] == 0.42 and math.isnan(shown.metrics["nan"])
    assert shown.config == {"lr": 3e-4, "layers": [1, 2]} and shown.message == "after warmup"
    assert shown.meta == {"dataset": "x"}
    for key in ("host", "pid", "python", "torch", "weightbank", "user"):
        assert key in shown.env
    assert shown.env["git"]["commit"] == head
    assert shown.created > 0


@given(
    shapes=st.lists(st.lists(st.integers(0, 7), min_size=0, max_size=3), min_size=1, max_size=4),
    dtype=st.sampled_from(
        [torch.float32, torch.bfloat16, torch.int8, torch.bool, torch.complex64, torch.float64]
    ),
    chunk=st.sampled_from([64, 192, 4096]),
)
@settings(max_examples=40, deadline=None)
def test_property_round_trip(shapes: list[list[int]], dtype: torch.dtype, chunk: int) -> None:
    bank = wb.open("memory://")
    state = {f"t{i}": random_of(dtype, tuple(s), i) for i, s in enumerate(shapes)}
    out = bank.load(bank.save(state, chunk_size=chunk).id)
    assert all(same_bits(out[k], v) for k, v in state.items())


@pytest.mark.slow
def test_huge_tensor_over_4gib(tmp_path: Path) -> None:
    bank = wb.open(tmp_path / "bank")
    n = (4 << 30) + 4096 + 3
    big = torch.empty(n, dtype=torch.uint8)
    big[:: 1 << 20] = 7
    big[-3:] = torch.tensor([1, 2, 3], dtype=torch.uint8)
    info = bank.save({"big": big}, run="huge")
    out = bank.load(info.id)["big"]
    assert out.shape == big.shape and torch.equal(out[-3:], big[-3:]) and torch.equal(out, big)
    del out
    assert bank.verify(full=False).ok


def test_mapped_loads_are_private_and_self_contained(local_bank: wb.Bank, tmp_path: Path) -> None:
    state = {f"w{i}": seeded((256, 256), i) for i in range(4)}  # 256 KiB each: mapped from the pack
    info = local_bank.save(state)
    out = local_bank.load(info.id)
    out["w0"].add_(1.0)  # copy-on-write: the bank's bytes are untouched
    assert torch.equal(local_bank.load(info.id)["w0"], state["w0"])
    assert local_bank.verify().ok
    torch.save({"w1": out["w1"]}, tmp_path / "one.pt")
    assert (tmp_path / "one.pt").stat().st_size < 2 * 256 * 256 * 4, (
        "a loaded tensor does not drag its pack along"
    )
    local_bank.prune(keep_last=0)
    local_bank.gc(grace=0)
    assert torch.equal(out["w2"], state["w2"]), "tensors stay valid after their pack is collected"


def test_many_packs_commit_in_the_background(local_bank: wb.Bank, monkeypatch: pytest.MonkeyPatch) -> None:
    import functools

    from weightbank.bank import bank as bank_module
    from weightbank.bank.writer import SaveOptions

    monkeypatch.setattr(bank_module, "SaveOptions", functools.partial(SaveOptions, pack_size=1 << 16))
    state = {f"w{i}": seeded((64, 64), i) for i in range(12)}  # 16 KiB each, 4 per pack
    info = local_bank.save(state, codec="raw", chunk_size=8192)
    assert info.save_stats is not None and info.save_stats.packs >= 3
    assert len(local_bank.show(info.id).packs) == info.save_stats.packs
    assert not list((Path(local_bank.url) / "tmp").glob("*")), "every pack was published"
    out = local_bank.load(info.id)
    assert all(torch.equal(out[k], v) for k, v in state.items())
    assert local_bank.verify().ok
