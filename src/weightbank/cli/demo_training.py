"""The training part of ``weightbank demo``: managed training, a SIGKILL and an exact resume, a NaN rolled back.

Sections (each prints what happened):

1. train a small model with the CheckpointManager (async saves, LastN/BestN
   retention, a best tag) and show how long the loop was blocked per save;
2. start the same training in a child process, SIGKILL it mid-epoch, resume
   it here from the bank, and compare the final weights and optimizer state
   with the uninterrupted run, bit for bit;
3. train with a NaN injected into one batch: the guard rolls back to the last
   good state, skips the bad batches and records the event;
4. fine-tune from the best checkpoint in a new run and draw the lineage.

It runs on CPU in a few seconds (one intra-op thread, deterministic kernels);
the thread and determinism settings are put back afterwards.

Example:
    >>> import weightbank as wb
    >>> from weightbank.cli.demo_training import run
    >>> from weightbank.cli.render import make_console
    >>> run(wb.open("/tmp/demo-bank"), make_console())  # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from rich.text import Text
from torch import nn

from ..bank.bank import Bank
from ..bank.bank import open as open_bank
from ..errors import CheckpointNotFound
from ..training import (
    BestN,
    CheckpointManager,
    Every,
    Guard,
    LastN,
    OnImprovement,
    ResumableLoader,
    TrainingState,
    deterministic,
)
from . import render

__all__ = ["run"]

TOTAL = 60
EVAL_EVERY = 10
KILL_AFTER = 33
NAN_AT = 25


class _Data(torch.utils.data.Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """A fixed regression problem with a little noise drawn at fetch time."""

    def __init__(self, n: int, seed: int) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 16, generator=g)
        self.y = torch.sin(self.x @ torch.randn(16, 1, generator=g))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i] + 0.02 * torch.randn(16), self.y[i]


def _setup(model: nn.Module | None = None) -> tuple[nn.Module, TrainingState, ResumableLoader]:
    deterministic(0, threads=1)
    model = model or nn.Sequential(nn.Linear(16, 64), nn.GELU(), nn.Dropout(0.1), nn.Linear(64, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=20, gamma=0.5)
    loader = ResumableLoader(_Data(192, seed=1), batch_size=16, shuffle=True, seed=7)
    return model, TrainingState(model=model, optimizer=opt, scheduler=sched, data=loader), loader


def _val_loss(model: nn.Module) -> float:
    data = _Data(64, seed=2)
    model.eval()
    with torch.no_grad():
        loss = nn.functional.mse_loss(model(data.x), data.y).item()
    model.train()
    return loss


def _forever(loader: ResumableLoader) -> Iterator[Any]:
    while True:
        yield from loader


def _train(
    bank: Bank,
    run: str,
    *,
    guard: Guard | None = None,
    nan_at: int = -1,
    init_from: str | None = None,
    total: int = TOTAL,
    report: Any = None,
) -> tuple[nn.Module, TrainingState, CheckpointManager, list[Any]]:
    model, state, loader = _setup()
    mgr = CheckpointManager(
        bank,
        run=run,
        save=[Every(steps=EVAL_EVERY), OnImprovement("val_loss")],
        keep=[LastN(3), BestN("val_loss", 1)],
        guard=guard,
        init_from=init_from,
        config={"lr": 3e-3, "batch_size": 16, "model": "mlp-16-64-1"},
        data_fingerprint="demo-regression-v1",
        max_inflight=2,
        signals=(),
    )
    outcomes = []
    opt = state.objects("optimizer")[""]
    sched = state.objects("scheduler")[""]
    with mgr:
        step = mgr.restore(state)
        if report is not None:
            report(f"resumed {step} {loader.epoch} {loader.index}")
        batches = _forever(loader)
        while step < total:
            x, y = next(batches)
            batch_no = loader.epoch * len(loader) + loader.index - 1
            loss = nn.functional.mse_loss(model(x), y)
            if batch_no == nan_at:
                loss = loss * math.nan
            opt.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            opt.step()
            sched.step()
            metrics = {"loss": loss.detach().item()}
            if (step + 1) % EVAL_EVERY == 0:
                metrics["val_loss"] = _val_loss(model)
            out = mgr.step(step, state, metrics)
            outcomes.append(out)
            if report is not None:
                report(f"step {step}")
            step = out.next_step
    return model, state, mgr, outcomes


def _final_state(state: TrainingState) -> dict[str, Any]:
    return {
        "model": state.objects("model")[""].state_dict(),
        "optimizer": state.objects("optimizer")[""].state_dict(),
    }


def _bitwise_equal(a: Any, b: Any) -> tuple[bool, int]:
    """(identical, tensors compared) for two nested states."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        same = a.dtype == b.dtype and a.shape == b.shape
        same = same and bool((a.reshape(-1).view(torch.uint8) == b.reshape(-1).view(torch.uint8)).all())
        return same, 1
    if isinstance(a, dict) and isinstance(b, dict) and set(a) == set(b):
        results = [_bitwise_equal(a[k], b[k]) for k in a]
        return all(r for r, _ in results), sum(n for _, n in results)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        results = [_bitwise_equal(x, y) for x, y in zip(a, b, strict=True)]
        return all(r for r, _ in results), sum(n for _, n in results)
    return a == b, 0


def _header(console: Console, title: str) -> None:
    console.print()
    console.rule(Text(title, style="bold"), align="left")


def _section_train(bank: Bank, console: Console) -> TrainingState:
    _header(console, "training · a CheckpointManager saves asynchronously while the model trains")
    _model, state, mgr, outcomes = _train(bank, "train")
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("STEP", "LOSS", "VAL_LOSS", "CHECKPOINT", "BLOCKED"):
        table.add_column(col, justify="right" if col != "CHECKPOINT" else "left")
    for out in outcomes:
        if out.saved is None:
            continue
        info = out.saved.wait()
        val = info.metrics.get("val_loss")
        table.add_row(
            str(info.step),
            f"{info.metrics['loss']:.4f}",
            "" if val is None else f"{val:.4f}",
            info.short_id,
            f"{out.saved.blocked_seconds * 1e3:.2f} ms",
        )
    console.print(table)
    kept = [c.step for c in bank.log("train")]
    console.print(
        Text.from_markup(
            f"kept {kept} (LastN(3) ∪ BestN('val_loss', 1)); tag [bold]{mgr.best_tag('val_loss')}[/] →"
            f" step {bank.info(mgr.best_tag('val_loss')).step}"
        )
    )
    return state


def _section_kill(bank: Bank, console: Console, uninterrupted: TrainingState) -> None:
    _header(console, "crash · SIGKILL the training process mid-epoch, resume from the bank")
    cmd = [sys.executable, "-m", "weightbank.cli.demo_training", "child", bank.url, "crash"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    killed_at = None
    assert proc.stdout is not None
    with proc.stdout:
        for line in proc.stdout:
            if line.startswith("step ") and int(line.split()[1]) >= KILL_AFTER:
                try:
                    saved = bank.log("crash")
                except CheckpointNotFound:
                    saved = []
                if saved:
                    os.kill(proc.pid, signal.SIGKILL)
                    killed_at = int(line.split()[1]) + 1
                    break
    proc.wait()
    console.print(f"child process killed with SIGKILL after {killed_at} steps (exit {proc.returncode})")
    lines: list[str] = []
    _, state, _, _ = _train(bank, "crash", report=lines.append)
    step, epoch, index = (int(v) for v in lines[0].split()[1:])
    console.print(f"resumed here from crash@{step}: epoch {epoch}, batch {index} of the epoch — no replay")
    same, n = _bitwise_equal(_final_state(uninterrupted), _final_state(state))
    verdict = "[green]bitwise identical[/]" if same else "[red]DIFFERENT[/]"
    console.print(
        Text.from_markup(
            f"final weights and optimizer state vs the uninterrupted run: {verdict} ({n} tensors)"
        )
    )


def _section_nan(bank: Bank, console: Console) -> None:
    _header(console, "divergence · a NaN loss is rolled back automatically")
    model, _, _mgr, _ = _train(bank, "nan", guard=Guard(spike=10.0, lr_scale=0.5), nan_at=NAN_AT)
    finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
    for e in bank.events("nan"):
        d = e.data
        console.print(
            Text.from_markup(
                f"step {e.step}: [bold]{e.kind}[/] ({d['reason']}) → restored {render.short(e.checkpoint)}"
                f" (step {d['restored_step']}), skipped {d['skipped_steps']} batches,"
                f" LR × {d['lr_scale']}"
            )
        )
    console.print(f"training finished {TOTAL} steps; weights finite: {finite}")


def _section_lineage(bank: Bank, console: Console) -> None:
    _header(console, "lineage · fine-tune from the best checkpoint in a new run (weightbank log --graph)")
    _train(bank, "train-ft", init_from="train@best:val_loss", total=20)
    infos = [c for r in ("train", "train-ft", "nan") for c in bank.log(r)]
    console.print(render.graph_view(sorted(infos, key=lambda c: c.created, reverse=True)))


def run(bank: Bank, console: Console) -> None:
    """Run the training demo against ``bank``, printing to ``console`` (see the module docstring).

    Example:
        >>> run(open_bank("memory://"), Console())  # doctest: +SKIP
    """
    threads = torch.get_num_threads()
    was_deterministic = torch.are_deterministic_algorithms_enabled()
    try:
        uninterrupted = _section_train(bank, console)
        if bank.url.startswith("memory://"):
            console.print("(the crash section needs a bank on disk; skipped for memory://)")
        else:
            _section_kill(bank, console, uninterrupted)
        _section_nan(bank, console)
        _section_lineage(bank, console)
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(was_deterministic)


def _child(bank_url: str, run_name: str) -> None:
    """Train ``run_name`` in this process, printing ``step N`` lines (the demo kills it)."""
    _train(open_bank(bank_url), run_name, report=lambda line: print(line, flush=True))


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "child":
        _child(sys.argv[2], sys.argv[3])
    else:
        sys.exit("usage: python -m weightbank.cli.demo_training child BANK RUN")
