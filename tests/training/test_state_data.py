"""TrainingState captures and restores everything; ResumableLoader seeks without replaying."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import weightbank as wb
from tests.training.common import NoisyData
from weightbank.training.rng import capture_rng, restore_rng
from weightbank.training.state import clone_tree


def test_rng_round_trip_covers_python_numpy_torch() -> None:
    random.random()
    np.random.standard_normal()
    saved = clone_tree(capture_rng())
    first = (random.random(), random.gauss(0, 1), np.random.standard_normal(), torch.rand(3).tolist())
    restore_rng(saved)
    again = (random.random(), random.gauss(0, 1), np.random.standard_normal(), torch.rand(3).tolist())
    assert first == again


def test_training_state_round_trips_through_the_bank(bank: wb.Bank) -> None:
    torch.manual_seed(0)
    models = {"gen": nn.Linear(3, 3), "disc": nn.Sequential(nn.Linear(3, 1), nn.BatchNorm1d(1))}
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-3) for n, m in models.items()}
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opts["gen"], T_max=10)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    gen = torch.Generator().manual_seed(5)
    counter = {"tokens": 0}

    class Counter:
        def state_dict(self) -> dict[str, Any]:
            return dict(counter)

        def load_state_dict(self, s: dict[str, Any]) -> None:
            counter.update(s)

    loader = wb.ResumableLoader(list(range(10)), batch_size=3, shuffle=True, seed=1)
    state = wb.TrainingState(
        model=models,
        optimizer=opts,
        scheduler={"gen": sched},
        scaler=scaler,
        data=loader,
        extra={"g": gen, "counter": Counter(), "config": {"depth": 2}, "table": torch.arange(4)},
    )
    for _ in range(3):
        x = torch.randn(4, 3)
        loss = models["disc"](models["gen"](x)).sum()
        loss.backward()
        for o in opts.values():
            o.step()
        sched.step()
    next(iter(loader))
    counter["tokens"] = 42
    cid = bank.save(state.capture(), run="s").id
    expect = {k: v.clone() for k, v in models["gen"].state_dict().items()}
    expected_draw = torch.rand(2, generator=gen).tolist()
    gen.manual_seed(5)
    torch.rand(2, generator=gen)
    next_batch = next(iter(loader)).tolist()
    # perturb everything, then restore
    for m in models.values():
        for p in m.parameters():
            p.data.add_(1.0)
    sched.step()
    counter["tokens"] = 0
    state.extra["config"] = {"depth": 99}
    state.load(bank.load(cid))
    assert all(torch.equal(expect[k], v) for k, v in models["gen"].state_dict().items())
    assert sched.last_epoch == 3 and counter["tokens"] == 42 and state.extra["config"] == {"depth": 2}
    assert torch.rand(2, generator=gen).tolist() == expected_draw
    assert next(iter(loader)).tolist() == next_batch
    assert opts["gen"].state_dict()["param_groups"][0]["betas"] == (0.9, 0.999)


def test_load_refuses_missing_sections_and_mismatched_models(bank: wb.Bank) -> None:
    state = wb.TrainingState(model=nn.Linear(2, 2), optimizer=torch.optim.SGD(nn.Linear(2, 2).parameters()))
    cid = bank.save({"model": nn.Linear(2, 2).state_dict()}).id
    with pytest.raises(wb.IncompatibleState, match="optimizer"):
        state.load(bank.load(cid))
    state.load(bank.load(cid), parts=["model"])
    with pytest.raises(wb.IncompatibleState, match="cannot restore model"):
        wb.TrainingState(model=nn.Linear(3, 3)).load(bank.load(cid), parts=["model"])
    with pytest.raises(wb.InvalidState, match="state_dict"):
        wb.TrainingState(model=object())
    with pytest.raises(ValueError, match="unknown state section"):
        state.load({}, parts=["weights"])


def test_unpicklable_extra_is_refused_by_key(bank: wb.Bank) -> None:
    state = wb.TrainingState(model=nn.Linear(1, 1), extra={"fn": lambda: 1})
    with pytest.raises(wb.InvalidState, match=r"extra\.fn"):
        bank.save(state.capture())


def test_scale_lr_scales_groups_and_scheduler_base() -> None:
    opt = torch.optim.SGD(nn.Linear(1, 1).parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    wb.TrainingState(optimizer=opt, scheduler=sched).scale_lr(0.5)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05)


# -- ResumableLoader ---------------------------------------------------------------------------
class CountingData(torch.utils.data.Dataset[int]):
    def __init__(self, n: int) -> None:
        self.n = n
        self.fetched: list[int] = []

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        self.fetched.append(i)
        return i


def test_resume_mid_epoch_seeks_without_replaying() -> None:
    data = CountingData(20)
    loader = wb.ResumableLoader(data, batch_size=4, shuffle=True, seed=3)
    full = [b.tolist() for b in loader]
    loader2 = wb.ResumableLoader(data, batch_size=4, shuffle=True, seed=3)
    loader2.load_state_dict({"epoch": 0, "index": 3, "seed": 3})
    data.fetched.clear()
    rest = [b.tolist() for b in loader2]
    assert rest == full[3:]
    assert sorted(data.fetched) == sorted(i for b in full[3:] for i in b)  # nothing before was loaded
    assert loader2.state_dict()["epoch"] == 1 and loader2.index == 0


def test_epochs_reshuffle_deterministically_and_cover_the_data() -> None:
    loader = wb.ResumableLoader(list(range(10)), batch_size=4, shuffle=True, seed=9, drop_last=True)
    e0 = [b.tolist() for b in loader]
    e1 = [b.tolist() for b in loader]
    assert len(e0) == len(loader) == 2 and e0 != e1
    again = wb.ResumableLoader(list(range(10)), batch_size=4, shuffle=True, seed=9, drop_last=True)
    assert [b.tolist() for b in again] == e0
    assert loader.batch_indices(0, 1) == e0[1]


def test_position_change_while_iterating_continues_from_there() -> None:
    loader = wb.ResumableLoader(list(range(12)), batch_size=2)
    it = iter(loader)
    assert next(it).tolist() == [0, 1]
    loader.load_state_dict({"epoch": 0, "index": 4, "seed": loader.seed})
    assert [b.tolist() for b in it] == [[8, 9], [10, 11]]
    loader.load_state_dict({"epoch": 2, "index": 6, "seed": loader.seed})  # end of an epoch
    assert next(iter(loader)).tolist() == [0, 1] and loader.epoch == 3


def test_worker_augmentation_is_independent_of_restarts() -> None:
    ds = NoisyData()
    a = wb.ResumableLoader(ds, batch_size=8, shuffle=True, seed=4, num_workers=2)
    full = [b[0] for b in a]
    b = wb.ResumableLoader(ds, batch_size=8, shuffle=True, seed=4, num_workers=2)
    b.load_state_dict({"epoch": 0, "index": 5, "seed": 4})
    rest = [x[0] for x in b]
    assert all(torch.equal(x, y) for x, y in zip(full[5:], rest, strict=True))


def test_loader_rejects_options_it_owns() -> None:
    with pytest.raises(ValueError, match="sampler"):
        wb.ResumableLoader([1], sampler=[0])
    with pytest.raises(ValueError, match="batch_size"):
        wb.ResumableLoader([1], batch_size=0)
    with pytest.raises(ValueError, match="ResumableLoader state"):
        wb.ResumableLoader([1]).load_state_dict({"epoch": 0})


def test_loader_ranks_split_each_epoch_and_convert_positions_across_world_sizes() -> None:
    from weightbank.training.data import ResumableLoader

    data = list(range(10))
    ranks = [
        ResumableLoader(data, batch_size=2, shuffle=True, seed=3, rank=r, world_size=3) for r in range(3)
    ]
    assert [len(r) for r in ranks] == [2, 2, 2]  # 10 samples padded to 12: every rank has as many batches
    seen = [x for r in ranks for b in r for x in b.tolist()]
    assert sorted(set(seen)) == data and len(seen) == 12
    # the same permutation as one process, dealt round-robin
    one = ResumableLoader(data, batch_size=2, shuffle=True, seed=3)
    assert [i for _, i in ranks[1].visits(0)] == [one.order(0)[p % 10] for p in range(1, 12, 3)]
    pos = ranks[0].state_dict()  # after one epoch: epoch 1, index 0; move to index 2 of a 3-rank job
    pos.update(epoch=0, index=2)
    two = ResumableLoader(data, batch_size=2, shuffle=True, seed=3, rank=1, world_size=2)
    two.load_state_dict(pos)
    assert two.state_dict()["index"] == 3  # 2 batches × 3 ranks = 3 batches × 2 ranks
    with pytest.raises(ValueError, match="rank"):
        ResumableLoader(data, rank=2, world_size=2)
