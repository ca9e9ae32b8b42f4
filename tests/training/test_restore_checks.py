"""A restore that fails changes nothing (issue 11, item 7), and an optimizer or scheduler of another class is
refused with a clear error (item 8) — while checkpoints written before the class record still load."""

from __future__ import annotations

import random
from collections.abc import Callable
from typing import Any, cast

import numpy as np
import pytest
import torch
from torch import nn

import weightbank as wb
from tests.training.test_lr_scale import SCHEDULERS, _advance, _pair
from weightbank.training.checks import same_kind
from weightbank.training.state import clone_tree


def _build(out: int = 2, opt_kind: str = "adamw") -> tuple[nn.Module, wb.TrainingState]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, out))
    if opt_kind == "adamw":
        opt: torch.optim.Optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=256.0)
    loader = wb.ResumableLoader(list(range(12)), batch_size=2, shuffle=True, seed=1)
    gen = torch.Generator().manual_seed(3)
    state = wb.TrainingState(
        model=model, optimizer=opt, scheduler=sched, scaler=scaler, data=loader, extra={"g": gen}
    )
    for _ in range(2):
        model(torch.randn(3, 4)).pow(2).mean().backward()
        opt.step()
        sched.step()
    next(iter(loader))
    return model, state


def _everything(state: wb.TrainingState) -> Any:
    """A copy of every piece of ``state`` a restore could change, and the global generators."""
    tree = clone_tree(state.capture())
    tree.pop("rng")
    return tree, (
        random.getstate(),
        cast(tuple[Any, ...], np.random.get_state(legacy=True))[1].copy(),
        torch.get_rng_state(),
    )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and np.array_equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


def _drop_key(d: dict[str, Any], key: str) -> None:
    del d[key]


# One breakage per section, each something torch (or the loader) refuses only after copying what fits.
BREAKS: dict[str, Callable[[dict[str, Any]], None]] = {
    "model: one layer of another shape": lambda t: t["model"].update({"2.weight": torch.zeros(3, 4)}),
    "model: a key missing": lambda t: _drop_key(t["model"], "2.bias"),
    "optimizer: another number of groups": lambda t: t["optimizer"]["param_groups"].append(
        dict(t["optimizer"]["param_groups"][0])
    ),
    "scheduler: not a mapping": lambda t: t.update({"scheduler": [1, 2]}),
    "scaler: its state is empty": lambda t: t.update({"scaler": {}}),
    "data: not a loader position": lambda t: t.update({"data": {"epoch": "x"}}),
    "extra: a generator state of the wrong size": lambda t: t["extra"].update(
        {"g": {"__generator__": torch.zeros(3, dtype=torch.uint8)}}
    ),
    "rng: a malformed generator state": lambda t: t["rng"].update(
        {"torch": torch.zeros(3, dtype=torch.uint8)}
    ),
}


@pytest.mark.parametrize("what", sorted(BREAKS))
def test_a_failed_restore_leaves_every_group_untouched(what: str) -> None:
    _model, state = _build()
    saved = clone_tree(state.capture())
    BREAKS[what](saved)
    _other, fresh = _build()
    for p in _other.parameters():  # make the target differ from the checkpoint everywhere
        p.data.add_(1.0)
    before = _everything(fresh)
    with pytest.raises(wb.IncompatibleState, match="cannot restore"):
        fresh.load(saved)
    assert _same(_everything(fresh), before), f"{what}: something was restored before the failure"


def test_restoring_into_another_architecture_through_the_bank_changes_nothing(bank: wb.Bank) -> None:
    _model, state = _build(out=2)
    cid = bank.save(state.capture(), run="r", step=1).id
    model3, other = _build(out=3)
    before = {k: v.clone() for k, v in model3.state_dict().items()}
    with pytest.raises(wb.IncompatibleState, match=r"2\.weight: checkpoint shape \[2, 4\] != \[3, 4\]"):
        other.load(bank.load(cid))
    assert all(torch.equal(before[k], v) for k, v in model3.state_dict().items()), "the first layers changed"


def test_an_optimizer_of_another_class_is_refused_naming_both(bank: wb.Bank) -> None:
    _model, adamw = _build(opt_kind="adamw")
    cid = bank.save(adamw.capture(), run="r", step=1).id
    _m, sgd = _build(opt_kind="sgd")
    opt = sgd.objects("optimizer")[""]
    before = clone_tree(opt.state_dict())
    with pytest.raises(wb.IncompatibleState) as exc:
        sgd.load(bank.load(cid))
    assert "torch.optim.adamw.AdamW" in str(exc.value) and "torch.optim.sgd.SGD" in str(exc.value)
    assert exc.value.keys == ["optimizer"]
    assert _same(opt.state_dict(), before) and "momentum" in opt.param_groups[0]
    sgd.load(bank.load(cid), parts=["model"])  # the model alone still restores


def test_a_scheduler_of_another_class_is_refused(bank: wb.Bank) -> None:
    _model, state = _build()
    cid = bank.save(state.capture(), run="r", step=1).id
    model, other = _build()
    opt = other.objects("optimizer")[""]
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    target = wb.TrainingState(model=model, optimizer=opt, scheduler=cosine, rng=False)
    with pytest.raises(wb.IncompatibleState, match=r"StepLR, this state a .*CosineAnnealingLR"):
        target.load(bank.load(cid), parts=["model", "optimizer", "scheduler"])


def test_named_groups_record_each_class(bank: wb.Bank) -> None:
    gen, disc = nn.Linear(2, 2), nn.Linear(2, 1)
    opts = {"gen": torch.optim.Adam(gen.parameters()), "disc": torch.optim.SGD(disc.parameters(), lr=0.1)}
    state = wb.TrainingState(model={"gen": gen, "disc": disc}, optimizer=opts, rng=False)
    tree = bank.load(bank.save(state.capture()).id)
    assert tree["classes"] == {"optimizer": {"gen": "torch.optim.adam.Adam", "disc": "torch.optim.sgd.SGD"}}
    swapped = {"gen": torch.optim.SGD(gen.parameters(), lr=0.1), "disc": torch.optim.Adam(disc.parameters())}
    with pytest.raises(wb.IncompatibleState, match=r"optimizer\.gen.*optimizer\.disc"):
        wb.TrainingState(model={"gen": gen, "disc": disc}, optimizer=swapped, rng=False).load(tree)


def test_a_checkpoint_without_the_class_record_still_loads(bank: wb.Bank) -> None:
    model, state = _build()
    tree = clone_tree(state.capture())
    assert tree["classes"] == {
        "optimizer": "torch.optim.adamw.AdamW",
        "scheduler": "torch.optim.lr_scheduler.StepLR",
    }
    del tree["classes"]  # what every checkpoint written before the record looks like
    cid = bank.save(tree, run="old", step=1).id
    other_model, other = _build()
    for p in other_model.parameters():
        p.data.zero_()
    other.load(bank.load(cid))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), other_model.parameters(), strict=True))


def test_the_manager_refuses_another_optimizer_on_resume(bank: wb.Bank) -> None:
    _model, state = _build(opt_kind="adamw")
    with wb.CheckpointManager(bank, run="r", save=wb.Every(steps=1), signals=()) as mgr:
        mgr.step(0, state, {"loss": 1.0})
    model, sgd = _build(opt_kind="sgd")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with (
        wb.CheckpointManager(bank, run="r", signals=()) as mgr,
        pytest.raises(wb.IncompatibleState, match="AdamW"),
    ):
        mgr.restore(sgd)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("kind", sorted(SCHEDULERS))
def test_every_torch_scheduler_round_trips_through_the_checks(kind: str) -> None:
    """The checks refuse only what does not fit: each scheduler restores into one like it."""
    bank = wb.open("memory://")
    opt, sched = _pair(kind)
    for _ in range(3):
        _advance(opt, sched)
    cid = bank.save(wb.TrainingState(optimizer=opt, scheduler=sched, rng=False).capture()).id
    opt2, sched2 = _pair(kind)
    wb.TrainingState(optimizer=opt2, scheduler=sched2, rng=False).load(bank.load(cid))
    assert sched2.state_dict().get("last_epoch") == sched.state_dict().get("last_epoch")
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]


class Lion(torch.optim.SGD):
    """A custom optimizer, as a training script or the module it moved to defines it."""


# The same class as a script run as ``python train.py`` defined it: only the module differs.
MainLion = type("Lion", (torch.optim.SGD,), {"__module__": "__main__", "__qualname__": "Lion"})
# A class of another library with a torch class's name, deriving from no torch SGD.
OtherSGD = type("SGD", (torch.optim.Optimizer,), {"__module__": "mylib.optim", "__qualname__": "SGD"})
# ... and one that derives from torch's SGD (its state is an SGD's).
DerivedSGD = type("SGD", (torch.optim.SGD,), {"__module__": "mylib.optim", "__qualname__": "SGD"})


def test_a_class_saved_from_main_restores_from_its_module() -> None:
    """Review of item 8: the kind is the class's qualname, not the module it was saved from."""
    bank = wb.open("memory://")
    model = nn.Linear(2, 2)
    saved = wb.TrainingState(
        model=model, optimizer=MainLion(model.parameters(), lr=0.1, momentum=0.9), rng=False
    )
    tree = bank.load(bank.save(saved.capture()).id)
    assert tree["classes"] == {"optimizer": "__main__.Lion"}
    target = wb.TrainingState(
        model=model, optimizer=Lion(model.parameters(), lr=0.5, momentum=0.9), rng=False
    )
    target.load(tree)
    assert target.objects("optimizer")[""].param_groups[0]["lr"] == 0.1


def test_a_torch_class_that_moved_module_restores() -> None:
    bank = wb.open("memory://")
    _model, state = _build(opt_kind="sgd")
    tree = clone_tree(state.capture())
    # what a torch that kept SGD and StepLR in other modules recorded
    tree["classes"] = {"optimizer": "torch.optim._sgd_old.SGD", "scheduler": "torch.optim.schedulers.StepLR"}
    cid = bank.save(tree).id
    _other, fresh = _build(opt_kind="sgd")
    fresh.load(bank.load(cid))
    assert fresh.objects("scheduler")[""].state_dict()["last_epoch"] == 2


@pytest.mark.parametrize(
    ("recorded", "cls", "same"),
    [
        ("torch.optim.sgd.SGD", torch.optim.SGD, True),
        ("torch.optim.sgd.SGD", Lion, False),  # another qualname, whatever it derives from
        ("torch.optim.adamw.AdamW", torch.optim.SGD, False),
        ("torch.optim.adam.Adam", torch.optim.AdamW, False),  # AdamW derives from Adam in newer torch
        ("torch.optim.adamw.AdamW", torch.optim.Adam, False),
        ("torch.optim.lr_scheduler.StepLR", torch.optim.lr_scheduler.CosineAnnealingLR, False),
        ("torch.optim.sgd.SGD", OtherSGD, False),  # a name is not torch's class
        ("mylib.optim.SGD", torch.optim.SGD, False),
        ("torch.optim.sgd.SGD", DerivedSGD, True),
        ("mylib.optim.SGD", OtherSGD, True),
        ("__main__.Lion", Lion, True),
        ("tests.training.test_restore_checks.Lion", MainLion, True),
        ("tests.training.test_restore_checks.Lion", torch.optim.SGD, False),
        ("__main__.make.<locals>.Lion", Lion, False),
    ],
)
def test_same_kind_compares_qualnames_and_keeps_torch_classes_apart(
    recorded: str, cls: type, same: bool
) -> None:
    assert same_kind(recorded, cls) is same


def test_a_torch_named_class_of_another_library_is_refused() -> None:
    bank = wb.open("memory://")
    _model, state = _build(opt_kind="sgd")
    cid = bank.save(state.capture()).id
    model, _other = _build(opt_kind="sgd")
    fake = OtherSGD(model.parameters(), {"lr": 0.1})
    target = wb.TrainingState(model=model, optimizer=fake, rng=False)
    with pytest.raises(wb.IncompatibleState, match=r"torch\.optim\.sgd\.SGD, this state a mylib\.optim\.SGD"):
        target.load(bank.load(cid), parts=["model", "optimizer"])
