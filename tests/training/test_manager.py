"""CheckpointManager: async saves, policies, retention after commit, tags, failures, lineage, signals."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import weightbank as wb
from tests.training.common import build, train


def _simple() -> tuple[nn.Linear, wb.TrainingState]:
    torch.manual_seed(0)
    model = nn.Linear(4, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return model, wb.TrainingState(model=model, optimizer=opt)


def _step(model: nn.Module, state: wb.TrainingState) -> float:
    opt = state.objects("optimizer")[""]
    loss = model(torch.randn(2, 4)).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()
    return loss.detach().item()


def test_every_steps_saves_async_and_close_waits(bank: wb.Bank) -> None:
    model, state = _simple()
    handles = []
    with wb.CheckpointManager(bank, run="r", save=wb.Every(steps=3), signals=()) as mgr:
        for step in range(mgr.restore(state), 9):
            out = mgr.step(step, state, {"loss": _step(model, state)})
            assert out.next_step == step + 1 == out.step
            if out.saved is not None:
                handles.append(out.saved)
    assert [h.step for h in handles] == [3, 6, 9] and all(h.done() for h in handles)
    assert [c.step for c in bank.log("r")] == [9, 6, 3]
    latest = bank.load("r@latest")
    assert latest["manager"]["step"] == 9
    assert torch.equal(latest["model"]["weight"], model.weight.detach())
    info = handles[-1].wait()
    assert info.parent == handles[-2].wait().id and info.meta["trigger"] == "policy"


def test_snapshot_is_isolated_from_later_training(bank: wb.Bank) -> None:
    model, state = _simple()
    gate = threading.Event()
    real_save = bank.save

    def slow_save(*a: Any, **k: Any) -> wb.SaveResult:
        assert gate.wait(60), "the test never opened the gate"
        return real_save(*a, **k)

    bank.save = slow_save  # type: ignore[method-assign]
    mgr = wb.CheckpointManager(bank, run="r", save=wb.Every(steps=1), max_inflight=2, signals=())
    before = model.weight.detach().clone()
    h = mgr.step(0, state, {}).saved
    assert h is not None and not h.done()
    with torch.no_grad():
        model.weight.add_(1.0)  # training goes on while the save is in flight
    gate.set()
    mgr.close()
    assert torch.equal(bank.load(h.wait().id)["model"]["weight"], before)


def test_back_pressure_limits_saves_in_flight(bank: wb.Bank) -> None:
    _model, state = _simple()
    active = []
    lock = threading.Lock()
    real_save = bank.save

    def counting_save(*a: Any, **k: Any) -> wb.SaveResult:
        with lock:
            active.append(1)
        time.sleep(0.05)
        return real_save(*a, **k)

    bank.save = counting_save  # type: ignore[method-assign]
    with wb.CheckpointManager(bank, run="r", save=wb.Every(steps=1), max_inflight=2, signals=()) as mgr:
        for step in range(6):
            out = mgr.step(step, state, {})
            assert len(mgr._saves.pending()) <= 2
            assert out.saved is not None
    assert len(bank.log("r")) == 6


def test_failed_background_save_is_raised_on_next_step_and_close(bank: wb.Bank) -> None:
    _model, state = _simple()
    real_save = bank.save
    calls = []

    def failing(*a: Any, **k: Any) -> wb.SaveResult:
        calls.append(1)
        if len(calls) == 2:
            raise wb.StorageError("disk full")
        return real_save(*a, **k)

    bank.save = failing  # type: ignore[method-assign]
    mgr = wb.CheckpointManager(bank, run="r", save=wb.Every(steps=1), signals=())
    mgr.step(0, state, {})
    h = mgr.step(1, state, {}).saved
    assert h is not None and isinstance(h.exception(), wb.StorageError)
    with pytest.raises(wb.StorageError, match="disk full"):
        mgr.step(2, state, {})
    mgr.step(3, state, {})  # reported once, then training may go on
    mgr.close()

    mgr2 = wb.CheckpointManager(bank, run="r2", save=wb.Every(steps=1), signals=())
    calls.clear()
    mgr2.step(0, state, {})
    mgr2.step(1, state, {})
    with pytest.raises(wb.StorageError):
        mgr2.close()


def test_retention_keeps_last_best_every_and_tagged(bank: wb.Bank) -> None:
    _model, state = _simple()
    keep: list[wb.KeepPolicy] = [wb.LastN(2), wb.BestN("val", 1), wb.EveryN(5)]
    vals = {2: 0.5, 4: 0.1, 6: 0.9, 8: 0.7}
    with wb.CheckpointManager(bank, run="r", save=wb.Every(steps=1), keep=keep, signals=()) as mgr:
        for step in range(10):
            done = step + 1
            mgr.step(step, state, {"val": vals[done]} if done in vals else {})
            if done == 3:
                mgr.save_now(step, state, tags=["keepme"]).wait()
    steps = sorted(c.step or 0 for c in bank.log("r"))
    # last 2 (9, 10), best val (4), every 5 (5, 10), tagged (3)
    assert steps == [3, 4, 5, 9, 10]
    assert bank.resolve("r.best.val") == bank.resolve("r@4")


def test_on_improvement_and_early_stopping_tag_the_best(bank: wb.Bank) -> None:
    _model, state = _simple()
    vals = [1.0, 0.8, 0.85, 0.9, 0.95, 0.7]
    es = wb.EarlyStopping("val_loss", patience=3)
    mgr = wb.CheckpointManager(
        bank, run="r", save=wb.OnImprovement("val_loss", min_delta=0.01), early_stopping=es, signals=()
    )
    outs = []
    for step, v in enumerate(vals):
        out = mgr.step(step, state, {"val_loss": v})
        outs.append(out)
        if out.stop:
            break
    mgr.close()
    assert [o.saved is not None for o in outs] == [True, True, False, False, False]
    assert outs[-1].stop and "early stopping" in outs[-1].reason
    assert bank.resolve("r.best.val_loss") == bank.resolve("r@2")
    assert bank.load("r@2")["manager"]["early_stopping"] == {"best": 0.8, "bad": 0}


def test_policies_state_is_restored_on_resume(bank: wb.Bank) -> None:
    _model, state = _simple()
    es = wb.EarlyStopping("val", patience=2)
    with wb.CheckpointManager(bank, run="r", save=wb.Every(steps=1), early_stopping=es, signals=()) as mgr:
        mgr.step(0, state, {"val": 1.0})
        mgr.step(1, state, {"val": 2.0})
    es2 = wb.EarlyStopping("val", patience=2)
    mgr2 = wb.CheckpointManager(bank, run="r", save=wb.Every(steps=1), early_stopping=es2, signals=())
    with pytest.warns(wb.DataPositionWarning):  # this state has no data position to restore
        assert mgr2.restore(state) == 2 and es2.best == 1.0 and es2.bad == 1
    assert mgr2.step(2, state, {"val": 3.0}).stop
    mgr2.close()


def test_init_from_another_run_links_lineage_and_metadata(bank: wb.Bank) -> None:
    model, state = _simple()
    with wb.CheckpointManager(bank, run="pretrain", save=wb.Every(steps=1), signals=()) as mgr:
        mgr.step(0, state, {"val_loss": 0.5})
        mgr.step(1, state, {"val_loss": 0.3})
    weights = model.weight.detach().clone()
    ft_model, ft_state = _simple()
    mgr = wb.CheckpointManager(
        bank,
        run="ft",
        save=wb.Every(steps=1),
        init_from="pretrain@best:val_loss",
        config={"lr": 0.1},
        data_fingerprint="sha256:abc",
        signals=(),
    )
    assert mgr.restore(ft_state) == 0
    assert torch.equal(ft_model.weight.detach(), weights)
    info = mgr.save_now(0, ft_state).wait()
    mgr.close()
    assert info.parent == bank.resolve("pretrain@2")
    assert info.config == {"lr": 0.1} and info.meta["data_fingerprint"] == "sha256:abc"
    assert "torch_seed" in info.meta
    # a second process of the same run resumes from its own latest, not from init_from
    mgr2 = wb.CheckpointManager(bank, run="ft", init_from="pretrain@1", signals=())
    with pytest.warns(wb.DataPositionWarning):
        assert mgr2.restore(ft_state) == 1
    mgr2.close()


def test_sigusr1_finishes_the_step_saves_and_exits(bank: wb.Bank) -> None:
    _model, state = _simple()
    mgr = wb.CheckpointManager(bank, run="r", save=wb.Every(steps=100), signals=(signal.SIGUSR1,))
    mgr.step(0, state, {})
    os.kill(os.getpid(), signal.SIGUSR1)
    with pytest.raises(SystemExit) as exc:
        mgr.step(1, state, {"loss": 1.0})
    assert exc.value.code == 0
    assert [c.step for c in bank.log("r")] == [2]
    assert [e.kind for e in bank.events("r")] == ["preempted"]
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_signal_without_exit_stops_the_loop(bank: wb.Bank) -> None:
    _model, state = _simple()
    mgr = wb.CheckpointManager(bank, run="r", signals=(signal.SIGUSR1,), exit_on_signal=False)
    os.kill(os.getpid(), signal.SIGUSR1)
    out = mgr.step(4, state, {})
    assert out.stop and out.saved is not None and out.saved.wait().step == 5
    with pytest.raises(wb.AlreadyClosed, match="closed"):
        mgr.step(5, state, {})


def test_bad_arguments_fail_early(bank: wb.Bank) -> None:
    with pytest.raises(wb.InvalidName):
        wb.CheckpointManager(bank, run="bad/run", signals=())
    with pytest.raises(wb.InvalidName, match="id prefix"):
        wb.CheckpointManager(bank, run="c0ffee", signals=())
    with pytest.raises(ValueError):
        wb.CheckpointManager(bank, run="r", max_inflight=0, signals=())
    with pytest.raises(ValueError):
        wb.Every(steps=1, seconds=1)
    with pytest.raises(ValueError):
        wb.BestN("x", 1, mode="up")


def test_every_seconds_policy() -> None:
    p = wb.Every(seconds=10)
    assert [p.should_save(s, {}, t) for s, t in [(1, 0.0), (2, 5.0), (3, 10.0)]] == [False, False, True]
    p.saved(3, 10.0)
    assert not p.should_save(4, {}, 15.0)
    assert wb.MaxAge(minutes=1).seconds == 60.0


def test_training_helper_finishes(tmp_path: Path) -> None:
    model, state, loader = build()
    bank = wb.open(tmp_path / "b")
    with wb.CheckpointManager(bank, run="t", save=wb.Every(steps=5), signals=()) as mgr:
        assert train(mgr, state, model, loader, 10) == 10
    assert bank.load("t@latest")["data"]["index"] == 10


def test_environment_probe_runs_before_training(bank: wb.Bank) -> None:
    """The bank's git probe must not run in the save thread while loader workers may fork (deadlock)."""
    from weightbank.bank.environment import git_info

    git_info.cache_clear()
    wb.CheckpointManager(bank, run="r", signals=()).close()
    assert git_info.cache_info().currsize == 1


def _rekey_run(bank: wb.Bank, steps: int) -> tuple[wb.CheckpointManager, list[dict[str, torch.Tensor]]]:
    torch.manual_seed(0)
    model = nn.Linear(512, 512)  # 1 MiB of fp32 weights: deltas pay for their link
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)
    state = wb.TrainingState(model=model, optimizer=opt)
    saved = []
    mgr = wb.CheckpointManager(bank, run="r", save=wb.Every(steps=1), codec="auto", signals=())  # rekeys
    with mgr:
        for step in range(steps):
            loss = model(torch.randn(8, 512)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            mgr.step(step, state, {"loss": loss.item()})
            saved.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return mgr, saved


def test_rekey_keeps_the_newest_checkpoint_a_keyframe(bank: wb.Bank) -> None:
    _, saved = _rekey_run(bank, 5)
    log = list(reversed(bank.log("r")))
    assert [c.step for c in log] == [1, 2, 3, 4, 5]

    def deltas(ref: str) -> int:
        m = bank.checkpoint(ref).manifest
        return sum(1 for i in {c for t in m.tensors for c in t.chunks} if m.chunks[i].codec == "delta")

    assert deltas("r@latest") == 0, "a resume loads no chain"
    assert deltas("r@4") > 0, "the parent became reverse deltas against it"
    for c, want in zip(log, saved, strict=True):
        got = bank.load(c.id)["model"]
        assert all(torch.equal(got[k], v) for k, v in want.items()), c.step
    assert bank.gc(grace=0).bytes_freed > 0, "the codings a rekey replaced die in whole packs"
    assert bank.verify().problems == ()


def test_rekey_needs_the_auto_codec_and_a_held_lock_skips_it(bank: wb.Bank) -> None:
    from weightbank.bank import locks

    with pytest.raises(wb.InvalidArgument, match="codec='auto'"):
        wb.CheckpointManager(bank, run="r", rekey=True, signals=())
    with (
        locks.hold(bank.storage, "repack", "someone-else"),
        pytest.warns(wb.RekeySkipped, match="not rekeyed"),
    ):
        _, saved = _rekey_run(bank, 2)
    assert [c.step for c in bank.log("r")] == [2, 1], "the saves stand"
    got = bank.load("r@latest")["model"]
    assert all(torch.equal(got[k], v) for k, v in saved[-1].items())
    for ref in ("r@1", "r@2"):  # a save to be rekeyed writes its changed chunks standalone
        m = bank.checkpoint(ref).manifest
        assert all(c.codec != "delta" for c in m.chunks), ref


def test_rekey_is_on_with_the_auto_codec_and_can_be_turned_off(bank: wb.Bank) -> None:
    assert wb.CheckpointManager(bank, run="a", codec="auto", signals=()).rekey is True
    assert wb.CheckpointManager(bank, run="b", codec="auto", rekey=False, signals=()).rekey is False
    assert wb.CheckpointManager(bank, run="c", signals=()).rekey is False  # raw: no chains to turn
