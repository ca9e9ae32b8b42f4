"""weightbank.lightning.BankIO against the real Lightning (pinned in constraints.txt): ModelCheckpoint's
top-k, last and removals map onto the bank, resumes are exact, and nothing is pickled."""

from __future__ import annotations

import enum
import json
import warnings
from argparse import Namespace
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("lightning")

import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import weightbank as wb
import weightbank.lightning
from weightbank.lightning.encoding import decode, encode


class Kind(enum.Enum):
    SMALL = "small"
    BIG = "big"


@dataclass
class Opt:
    lr: float
    betas: tuple[float, float]


class Net(pl.LightningModule):
    def __init__(
        self, lr: float = 1e-2, kind: Kind = Kind.SMALL, out: Path = Path("runs"), opt: Any = None
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 1))

    def training_step(self, batch: Any, _: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.layer(x), y)

    def validation_step(self, batch: Any, _: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self.layer(x), y))

    def configure_optimizers(self) -> Any:
        opt = torch.optim.Adam(self.parameters(), lr=self.hparams["lr"])
        return {"optimizer": opt, "lr_scheduler": torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.9)}


def _data() -> tuple[DataLoader[Any], DataLoader[Any]]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=g)
    y = x.sum(1, keepdim=True) + 0.1 * torch.randn(64, 1, generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=16), DataLoader(
        TensorDataset(x[:16], y[:16]), batch_size=16
    )


def _trainer(io: Any, ckpt_dir: Path, epochs: int, **kw: Any) -> tuple[pl.Trainer, ModelCheckpoint]:
    cb = ModelCheckpoint(dirpath=ckpt_dir, monitor="val_loss", mode="min", save_top_k=2, save_last=True)
    trainer = pl.Trainer(
        max_epochs=epochs,
        plugins=[io],
        callbacks=[cb],
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        deterministic=True,
        **kw,
    )
    return trainer, cb


def _fit(io: Any, ckpt_dir: Path, epochs: int, ckpt_path: str | None = None) -> tuple[Net, ModelCheckpoint]:
    pl.seed_everything(0, verbose=False)
    model = Net(opt=Opt(1e-2, (0.9, 0.99)))
    trainer, cb = _trainer(io, ckpt_dir, epochs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Lightning's advice about workers and logging
        trainer.fit(model, *_data(), ckpt_path=ckpt_path)
    return model, cb


def _pointers(d: Path) -> dict[str, str]:
    return {p.name: json.loads(p.read_text())["id"] for p in d.glob("*.ckpt")}


def test_model_checkpoint_top_k_last_and_removals_live_in_the_bank(tmp_path: Path) -> None:
    bank = wb.open(tmp_path / "bank")
    io = wb.lightning.BankIO(bank, run="r")
    model, cb = _fit(io, tmp_path / "ckpt", epochs=4)
    pointers = _pointers(tmp_path / "ckpt")
    assert "last.ckpt" in pointers and len(pointers) == 3, pointers  # top-2 + last
    live = {c.id for c in bank.log("r")}
    assert set(pointers.values()) == live, "each removed top-k checkpoint was deleted from the bank"
    best = json.loads(Path(cb.best_model_path).read_text())["id"]
    assert bank.resolve("r.best.val_loss") == best
    assert bank.resolve("r@best:val_loss") == best  # last.ckpt records no score it was not ranked by
    assert "val_loss" not in bank.info(pointers["last.ckpt"]).metrics
    got = io.load_checkpoint(cb.best_model_path)
    assert got["hyper_parameters"]["kind"] is Kind.SMALL and got["hyper_parameters"]["out"] == Path("runs")
    assert got["hyper_parameters"]["opt"] == Opt(1e-2, (0.9, 0.99))
    assert isinstance(got["optimizer_states"][0]["state"][0]["exp_avg"], torch.Tensor)
    last = io.load_checkpoint(tmp_path / "ckpt" / "last.ckpt")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in last["state_dict"].items())
    with pytest.raises(Exception, match=r"pickle|weights_only|Unpickl|invalid load key"):
        torch.load(tmp_path / "ckpt" / "last.ckpt", weights_only=False)  # a pointer holds no code


def test_a_resume_from_last_or_a_ref_matches_the_uninterrupted_run_bit_for_bit(tmp_path: Path) -> None:
    whole, _ = _fit(wb.lightning.BankIO(wb.open(tmp_path / "a"), run="r"), tmp_path / "ca", epochs=4)
    bank = wb.open(tmp_path / "b")
    _fit(wb.lightning.BankIO(bank, run="r"), tmp_path / "cb", epochs=2)
    resumed, _ = _fit(wb.lightning.BankIO(bank, run="r"), tmp_path / "cb", epochs=4, ckpt_path="last")
    for k, v in whole.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k
    # A ref works as ckpt_path too: fit one more epoch from the best of the run.
    again, _ = _fit(
        wb.lightning.BankIO(bank, run="r"), tmp_path / "cc", epochs=5, ckpt_path="wb://r@best:val_loss"
    )
    assert again.trainer.current_epoch == 5 and again.trainer.global_step == 20


def test_saves_under_async_checkpoint_io(tmp_path: Path) -> None:
    bank = wb.open(tmp_path / "bank")
    _fit(AsyncCheckpointIO(wb.lightning.BankIO(bank, run="r")), tmp_path / "ckpt", epochs=3)
    pointers = _pointers(tmp_path / "ckpt")
    assert len(pointers) == 3 and set(pointers.values()) == {c.id for c in bank.log("r")}


def test_what_cannot_be_stored_is_refused_by_key_and_nothing_is_written(tmp_path: Path) -> None:
    bank = wb.open(tmp_path / "bank")
    io = wb.lightning.BankIO(bank, run="r")
    target = tmp_path / "x.ckpt"
    with pytest.raises(wb.InvalidState, match=r"hyper_parameters\.fn"):
        io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "hyper_parameters": {"fn": object()}}, target)
    with pytest.raises(wb.InvalidState, match="__wb__"):
        io.save_checkpoint({"state_dict": {}, "x": {"__wb__": "namespace"}}, target)
    assert not target.exists() and bank.log() == []
    target.write_bytes(b"PK\x03\x04 a torch zip")
    with pytest.raises(wb.IncompatibleState, match="not a weightbank pointer"):
        io.load_checkpoint(target)
    io.remove_checkpoint(target)  # not a pointer: removed as Lightning asked, like its own files
    assert not target.exists()
    with pytest.raises(wb.CheckpointNotFound):
        io.load_checkpoint(tmp_path / "missing.ckpt")
    with pytest.raises(wb.InvalidRef):
        io.load_checkpoint("wb://")


def test_a_damaged_stored_value_is_a_typed_error() -> None:
    for bad in (
        {"__wb__": "namespace", "v": [1]},
        {"__wb__": "dtype", "v": "no_such_dtype"},
        {"__wb__": "device", "v": "warp:9"},
        {"__wb__": "path", "v": 3},
        {"__wb__": "set", "v": [[1]]},
        {"__wb__": "what"},
        {"__wb__": "enum", "cls": 5, "v": "A"},
    ):
        with pytest.raises(wb.InvalidState):
            decode({"k": bad})


_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**62), 2**62),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.sampled_from([torch.float32, torch.bfloat16, torch.device("cpu"), Kind.BIG, Path("a/b")]),
)
_values = st.recursive(
    _leaf,
    lambda kids: st.one_of(
        st.lists(kids, max_size=3),
        st.lists(kids, max_size=3).map(tuple),
        st.dictionaries(st.text(max_size=5).filter(lambda k: k != "__wb__"), kids, max_size=3),
        st.dictionaries(st.text(min_size=1, max_size=5), kids, max_size=3).map(lambda d: Namespace(**d)),
        st.frozensets(st.integers(0, 9), max_size=3),
    ),
    max_leaves=12,
)


@given(value=_values)
@settings(max_examples=150, deadline=None)
def test_the_encoding_round_trips_exactly(value: Any) -> None:
    bank = wb.open("memory://")
    bank.save({"v": encode(value)}, run="r")
    assert decode(bank.load("r@latest"))["v"] == value


def test_import_weightbank_does_not_import_lightning() -> None:
    import subprocess
    import sys

    code = "import sys, weightbank; print('lightning' in sys.modules, 'weightbank.lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.slow
@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_a_sigkill_mid_epoch_then_a_resume_matches_the_uninterrupted_run_bit_for_bit(
    tmp_path: Path, use_async: bool
) -> None:
    """Dropout, a shuffled wb.ResumableLoader, Adam: killed at step 16 (epoch 1, batch 6 of 10), resumed
    from ``last`` — the weights after 3 epochs equal the uninterrupted run's exactly."""
    import signal
    import subprocess
    import sys

    from safetensors.torch import load_file

    child = Path(__file__).with_name("lit_child.py")

    def run(d: Path, kill_at: int, resume: bool) -> int:
        args = [str(d / "bank"), str(d / "ck"), "3", str(kill_at), str(int(resume)), str(int(use_async))]
        return subprocess.run(
            [sys.executable, str(child), *args], capture_output=True, timeout=600
        ).returncode

    assert run(tmp_path / "whole", -1, False) == 0
    assert run(tmp_path / "cut", 16, False) == -signal.SIGKILL
    assert not (tmp_path / "cut" / "ck" / "final.safetensors").exists()
    assert run(tmp_path / "cut", -1, True) == 0
    want = load_file(tmp_path / "whole" / "ck" / "final.safetensors")
    got = load_file(tmp_path / "cut" / "ck" / "final.safetensors")
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_a_resume_into_a_new_directory_keeps_every_pointer_of_the_old_one(tmp_path: Path) -> None:
    """Lightning's version_N layout: the old directory's best must survive the new run's best tag moves."""
    bank = wb.open(tmp_path / "bank")
    _fit(wb.lightning.BankIO(bank, run="r"), tmp_path / "v0", epochs=2)
    old = _pointers(tmp_path / "v0")
    _fit(
        wb.lightning.BankIO(bank, run="r"),
        tmp_path / "v1",
        epochs=4,
        ckpt_path=str(tmp_path / "v0" / "last.ckpt"),
    )
    io = wb.lightning.BankIO(bank, run="r")
    for name in old:
        assert io.load_checkpoint(tmp_path / "v0" / name)["global_step"] > 0, name
    assert set(_pointers(tmp_path / "v1").values()) <= {c.id for c in bank.log("r")}


def test_a_removal_before_its_save_lands_removes_the_save_when_it_lands(tmp_path: Path) -> None:
    """AsyncCheckpointIO queues saves but removes at once: the removal must not be lost."""
    bank = wb.open(tmp_path / "bank")
    io = wb.lightning.BankIO(bank, run="r")
    path = tmp_path / "epoch=0-step=4.ckpt"
    io.remove_checkpoint(path)  # Lightning dropped it from its top-k before the queued save ran
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 4}, path)
    assert not path.exists() and bank.log() == []
    io.save_checkpoint({"state_dict": {"w": torch.ones(2)}, "global_step": 8}, path)  # the path again: kept
    assert path.exists() and [c.step for c in bank.log()] == [8]


def test_stored_class_names_import_nothing_and_run_nothing_unexpected(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys, warnings; warnings.simplefilter('ignore')\n"
        "from weightbank.lightning.encoding import decode\n"
        "before = set(sys.modules)\n"
        "for cls in ('weightbank:dcp.Writer', 'concurrent.futures:ProcessPoolExecutor', 'os:path.join'):\n"
        "    decode({'__wb__': 'dataclass', 'cls': cls, 'v': {}})\n"
        "    decode({'__wb__': 'enum', 'cls': cls, 'v': 'A'})\n"
        "print(sorted(m for m in set(sys.modules) - before if 'dcp' in m or 'futures.process' in m))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


@dataclass
class Checked:
    n: int

    def __post_init__(self) -> None:
        if self.n < 0:
            raise ValueError("n must be >= 0")


def test_damaged_pointers_and_values_are_typed_errors(tmp_path: Path) -> None:
    with pytest.raises(wb.InvalidState):
        decode({"k": {"__wb__": "path", "v": "a", "flavour": ["posix"]}})
    with pytest.raises(wb.InvalidState):
        decode({"k": {"__wb__": "enum", "cls": "x:Y", "v": 3}})
    with pytest.raises(wb.InvalidState, match="refuses"):
        decode({"k": {"__wb__": "dataclass", "cls": f"{__name__}:Checked", "v": {"n": -1}}})
    assert decode({"__wb__": "dataclass", "cls": f"{__name__}:Checked", "v": {"n": 2}}) == Checked(2)
    deep = tmp_path / "deep.ckpt"
    deep.write_text("[" * 30000)
    wrong = tmp_path / "bool.ckpt"
    wrong.write_text(json.dumps({"weightbank": True, "id": "ab" * 32}))
    (tmp_path / "dir.ckpt").mkdir()
    for bad in (deep, wrong, tmp_path / "dir.ckpt"):
        with pytest.raises(wb.IncompatibleState):
            wb.lightning.read_pointer(bad)
