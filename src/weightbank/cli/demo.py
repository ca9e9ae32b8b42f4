"""``weightbank demo``: a short CPU training run that shows what the bank does, section by section.

It pre-trains a tiny model for six checkpoints (freezing the lower layers
half-way, so later saves share most of their bytes), branches a fine-tune off
one of them in a second run, and then shows disk usage and deduplication, tags
and their history, the lineage graph, a diff, a rollback and a verify — the same
tables the CLI commands print. It runs offline in seconds.

Example:
    >>> import tempfile
    >>> from weightbank.cli.demo import run_demo
    >>> from weightbank.cli.render import make_console
    >>> run_demo(tempfile.mkdtemp() + "/bank", make_console())  # doctest: +SKIP
"""

from __future__ import annotations

import shlex
import time
from collections.abc import Iterator, Sequence

import torch
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from torch import nn

from .. import open as open_bank
from ..bank.bank import AUTO, Bank
from ..bank.results import SaveResult
from . import render
from .demo_model import FINETUNE_TEXT, PRETRAIN_TEXT, TinyLM, batches, evaluate
from .exitcodes import CORRUPT

__all__ = ["run_demo"]

STEPS_PER_SAVE = 5
PRETRAIN_SAVES = 6
FREEZE_AT_SAVE = 4  # from this save on, only the top block and final norm train
FINETUNE_SAVES = 2
BRANCH_FROM = "pretrain@15"


def _header(console: Console, n: int, title: str) -> None:
    console.print()
    console.rule(Text(f"{n} · {title}", style="bold"), align="left")


def _train(
    model: TinyLM, opt: torch.optim.Optimizer, data: Iterator[tuple[torch.Tensor, torch.Tensor]], steps: int
) -> float:
    """``steps`` optimizer steps; returns the last training loss."""
    loss = torch.zeros(())
    for _ in range(steps):
        x, y = next(data)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        torch.autograd.backward(loss)
        opt.step()
    return loss.item()


def _trainable_only(model: TinyLM, top: int) -> None:
    """Freeze everything except the top ``top`` blocks and the final norm."""
    for p in model.parameters():
        p.requires_grad_(False)
    for block in list(model.blocks)[-top:]:
        for p in block.parameters():
            p.requires_grad_(True)
    for p in model.norm.parameters():
        p.requires_grad_(True)


def _saves_table() -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("CHECKPOINT", "TRAINING", "VAL_LOSS", "ID", "WRITTEN", "REUSED", "DEDUP"):
        table.add_column(
            col, justify="right" if col in ("VAL_LOSS", "WRITTEN", "REUSED", "DEDUP") else "left"
        )
    return table


def _save_row(table: Table, info: SaveResult, training: str) -> None:
    stats = info.save_stats
    table.add_row(
        Text(render.label(info), style=render.RUN),
        training,
        f"{info.metrics['val_loss']:.3f}",
        Text(info.short_id, style=render.ID),
        render.human_bytes(stats.written_bytes),
        render.human_bytes(stats.reused_bytes),
        f"{stats.dedup_ratio:.0%}",
    )


def _pretrain(bank: Bank, console: Console) -> TinyLM:
    model = TinyLM(seed=0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    data = batches(PRETRAIN_TEXT, seed=0)
    table = _saves_table()
    for i in range(1, PRETRAIN_SAVES + 1):
        if i == FREEZE_AT_SAVE:
            _trainable_only(model, top=1)
        loss = _train(model, opt, data, STEPS_PER_SAVE)
        step = i * STEPS_PER_SAVE
        info = bank.save(
            model.state_dict(),
            run="pretrain",
            step=step,
            metrics={"loss": loss, "val_loss": evaluate(model, PRETRAIN_TEXT)},
            config={"d_model": 192, "n_layers": 4, "lr": 3e-3},
            message="all layers" if i < FREEZE_AT_SAVE else "lower layers frozen",
        )
        _save_row(table, info, "all layers" if i < FREEZE_AT_SAVE else "top block only")
    console.print(table)
    console.print(
        Text(
            f"From step {FREEZE_AT_SAVE * STEPS_PER_SAVE} on the embedding and lower blocks are frozen: "
            "their chunks are already in the bank, so each save writes only what changed.",
            style=render.DIM,
        )
    )
    return model


def _finetune(bank: Bank, console: Console) -> None:
    model = TinyLM(seed=0)
    loaded = bank.load(BRANCH_FROM, into=model)
    console.print(f"loaded {BRANCH_FROM} into a fresh model: {len(loaded.loaded)} tensors, verified as read")
    _trainable_only(model, top=1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    data = batches(FINETUNE_TEXT, seed=1)
    table = _saves_table()
    for i in range(1, FINETUNE_SAVES + 1):
        loss = _train(model, opt, data, STEPS_PER_SAVE)
        info = bank.save(
            model.state_dict(),
            run="finetune",
            step=i * STEPS_PER_SAVE,
            parent=BRANCH_FROM if i == 1 else AUTO,
            metrics={"loss": loss, "val_loss": evaluate(model, PRETRAIN_TEXT)},
            config={"d_model": 192, "n_layers": 4, "lr": 3e-3, "base": BRANCH_FROM},
            message=f"fine-tune from {BRANCH_FROM}",
        )
        _save_row(table, info, "top block only")
    console.print(table)


def _say(console: Console, *parts: str | Text) -> None:
    line = Text()
    for part in parts:
        line.append(part if isinstance(part, Text) else Text(part))
    console.print(line)


def _cmd(console: Console, args: Sequence[str]) -> None:
    console.print(Text("$ weightbank " + " ".join(args), style="bold magenta"))


def run_demo(bank_path: str, console: Console) -> None:
    """Run the demo on a new (or empty) bank at ``bank_path``, printing to ``console``."""
    # The model's matmuls are tiny: one thread is as fast as several on an idle machine and far
    # faster on a busy one (spinning intra-op threads fight for the cores).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _run_demo(bank_path, console)
    finally:
        torch.set_num_threads(threads)


def _run_demo(bank_path: str, console: Console) -> None:
    started = time.perf_counter()
    with open_bank(bank_path, create=True) as bank:
        existing = bank.log()
        if existing:
            raise typer.BadParameter(
                f"{bank.url} already holds {len(existing)} checkpoint(s); the demo needs a new or empty bank",
                param_hint="'--bank'",
            )
        model = TinyLM(seed=0)
        n_params = sum(p.numel() for p in model.parameters())
        nbytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())

        _header(console, 1, "A tiny model and an empty bank")
        console.print(
            f"TinyLM, a byte-level transformer (4 blocks, d_model 192, head tied to the embedding): "
            f"{n_params / 1e6:.2f}M parameters, {render.human_bytes(nbytes)} per checkpoint."
        )
        console.print(f"bank: {bank.url}")

        _header(console, 2, f"Pre-training: run 'pretrain', a checkpoint every {STEPS_PER_SAVE} steps")
        _pretrain(bank, console)

        _header(console, 3, f"A fine-tune branches off {BRANCH_FROM} (run 'finetune', parent in another run)")
        _finetune(bank, console)

        _header(console, 4, "What the bank stores")
        _cmd(console, ["du"])
        console.print(render.du_view(bank.du()))

        _header(console, 5, "Tags: names that move, with their history")
        _cmd(console, ["tag", "prod", "pretrain@best:val_loss"])
        console.print(
            render.tag_event_line(bank.tag("prod", "pretrain@best:val_loss", why="best pre-training"))
        )
        _cmd(console, ["tag", "prod", "finetune@latest"])
        console.print(render.tag_event_line(bank.tag("prod", "finetune@latest", why="promote the fine-tune")))
        _cmd(console, ["tags", "--history", "prod"])
        console.print(render.history_table(bank.tag_history("prod")))

        _header(console, 6, "Lineage")
        _cmd(console, ["log", "--graph"])
        console.print(render.graph_view(bank.log()))

        _header(console, 7, "What a rollback would change")
        _cmd(console, ["diff", "prod", "prod@{1}"])
        result = bank.diff("prod", "prod@{1}")
        labels = {c.id: render.label(c) for c in bank.log()}
        console.print(render.diff_view(result, labels=labels))

        _header(console, 8, "Roll back")
        _cmd(console, ["rollback", "prod"])
        event = bank.rollback("prod", why="the fine-tune forgot the pre-training text")
        console.print(render.tag_event_line(event))
        restored = TinyLM(seed=0)
        info = bank.load("prod", into=restored).checkpoint
        _say(
            console,
            "prod is ",
            Text(render.label(info), style=render.RUN),
            f" again; loaded into a fresh model its val_loss is {evaluate(restored, PRETRAIN_TEXT):.4f}"
            f" (recorded at save: {info.metrics['val_loss']:.4f})",
        )

        _header(console, 9, "Verify: every manifest, chunk hash and tag")
        _cmd(console, ["verify"])
        report = bank.verify()
        console.print(render.verify_view(report))

    console.print()
    console.print(
        Text(f"done in {time.perf_counter() - started:.1f} s. Explore the bank yourself:", style="bold")
    )
    for args in (
        "log --graph",
        "show prod",
        "diff pretrain@15 finetune@latest",
        "tags --history",
        "prune --keep-last 2",
        "repack --dry-run",
    ):
        console.print(f"  weightbank {args} --bank {shlex.quote(bank_path)}")
    if not report.ok:
        raise typer.Exit(CORRUPT)
