"""The ``weightbank`` command: a thin shell over the library, one subcommand per Bank verb.

Each command opens the bank (``--bank``, or ``$WEIGHTBANK_BANK``, or ``./bank``),
calls one library function, and prints its result as a table, or as JSON with
``--json``. Only ``init``, ``save``, ``import`` and ``demo`` create a bank.

Example:
    >>> from typer.testing import CliRunner
    >>> from weightbank.cli.main import app
    >>> CliRunner().invoke(app, ["--version"]).output.startswith("weightbank ")
    True
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from .. import open as open_bank
from .._version import __version__
from ..bank.bank import AUTO, Bank
from ..bank.results import CheckpointInfo, RunEvent, VerifyReport
from ..errors import CheckpointNotFound, CorruptObject, NotABank
from . import copy as copy_command
from . import drill as drill_command
from . import indexing as indexing_command
from . import render
from . import repack as repack_command
from . import serve as serve_command
from . import tags as tags_command
from .common import (
    DEFAULT_BANK,
    BankOpt,
    JsonOpt,
    MessageOpt,
    RunOpt,
    StepOpt,
    TagOpt,
    emit,
    emit_json,
    open_existing,
)
from .exitcodes import CORRUPT, EPILOG, BankGroup
from .options import parse_config, parse_duration, parse_keep_best, parse_metrics

__all__ = ["app", "main"]

HELP = """\
A content-addressed, crash-safe bank for PyTorch checkpoints.

Refs name checkpoints: an id or unique id prefix (6+ hex), a tag (prod),
run@step, run@latest, run@best:METRIC[:max], REF~N (N-th parent), TAG@{N}
(the tag's N-th previous target).
"""

app = typer.Typer(
    cls=BankGroup,
    help=HELP,
    epilog=EPILOG,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _require_file(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(path))


def _label_of(bank: Bank, cid: str | None) -> str | None:
    if cid is None:
        return None
    try:
        return render.label(bank.info(cid))
    except CheckpointNotFound:
        return "deleted"


def _import(
    bank_path: str,
    source: Path,
    *,
    run: str,
    step: int | None,
    tags: list[str],
    message: str,
    metrics: dict[str, Any] | None = None,
    config: dict[str, Any] | None = None,
    parent: str | None = None,
    as_json: bool = False,
) -> None:
    from ..interop import import_file

    _require_file(source)
    with open_bank(bank_path, create=True) as bank, render.busy(f"importing {source.name}"):
        info: CheckpointInfo = import_file(
            bank,
            source,
            run=run,
            step=step,
            tags=tags,
            message=message,
            metrics=metrics,
            config=config,
            parent=AUTO if parent is None else parent,
        )
    if as_json:
        emit_json(info)
    else:
        emit(render.saved_line(info))


# -- the group ------------------------------------------------------------------------
def _version(value: bool) -> None:
    if value:
        typer.echo(f"weightbank {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", "-V", callback=_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """A content-addressed, crash-safe bank for PyTorch checkpoints."""


# -- creating -------------------------------------------------------------------------
@app.command()
def init(bank: BankOpt = DEFAULT_BANK) -> None:
    """Create an empty bank (a no-op on an existing bank; refuses a non-empty directory that is not one)."""
    try:
        with open_bank(bank, create=False) as b:
            emit(f"{b.url} is already a bank")
            return
    except NotABank:
        pass
    with open_bank(bank, create=True) as b:
        emit(f"initialized an empty bank at {b.url}")


@app.command()
def save(
    file: Annotated[
        Path,
        typer.Argument(
            metavar="FILE", help="A .safetensors, .pt/.pth/.bin file or a Hugging Face model dir."
        ),
    ],
    run: RunOpt = "main",
    step: StepOpt = None,
    tag: TagOpt = [],  # noqa: B006 - typer reads the default, never mutates it
    message: MessageOpt = "",
    metric: Annotated[
        list[str],
        typer.Option(
            "--metric", metavar="KEY=VALUE", help="KEY=VALUE metric, VALUE parsed as JSON (repeatable)."
        ),
    ] = [],  # noqa: B006
    config_json: Annotated[
        str | None, typer.Option("--config-json", metavar="JSON", help="Config as a JSON object.")
    ] = None,
    config: Annotated[
        Path | None, typer.Option("--config", metavar="FILE", help="Config from a JSON file.")
    ] = None,
    parent: Annotated[
        str | None,
        typer.Option("--parent", metavar="REF", help="Parent ref (default: the run's newest checkpoint)."),
    ] = None,
    bank: BankOpt = DEFAULT_BANK,
    as_json: JsonOpt = False,
) -> None:
    """Save weights from a file as a new checkpoint (creates the bank if needed)."""
    if config is not None:
        _require_file(config)
    _import(
        bank,
        file,
        run=run,
        step=step,
        tags=tag,
        message=message,
        metrics=parse_metrics(metric),
        config=parse_config(config_json, config),
        parent=parent,
        as_json=as_json,
    )


@app.command("import")
def import_(
    source: Annotated[
        Path,
        typer.Argument(
            metavar="FILE", help="A .safetensors, .pt/.pth/.bin file or a Hugging Face model dir."
        ),
    ],
    run: RunOpt = "main",
    step: StepOpt = None,
    tag: TagOpt = [],  # noqa: B006
    message: MessageOpt = "",
    bank: BankOpt = DEFAULT_BANK,
    as_json: JsonOpt = False,
) -> None:
    """Import a checkpoint file or model directory (creates the bank if needed)."""
    _import(bank, source, run=run, step=step, tags=tag, message=message, as_json=as_json)


@app.command()
def export(
    ref: Annotated[str, typer.Argument(metavar="REF", help="Checkpoint to export.")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Output file ending in .safetensors or .pt.")],
    select: Annotated[
        list[str],
        typer.Option("--select", metavar="GLOB", help="Only tensors matching this glob (repeatable)."),
    ] = [],  # noqa: B006
    force: Annotated[bool, typer.Option("--force", "-f", help="Replace OUT if it exists.")] = False,
    quantize: Annotated[
        str | None,
        typer.Option(
            "--quantize", metavar="int8|fp8", help="Lossy: quantize float matrices (per-channel scales)."
        ),
    ] = None,
    bank: BankOpt = DEFAULT_BANK,
) -> None:
    """Write a checkpoint out as .safetensors or .pt (lossless unless --quantize)."""
    if quantize not in (None, "int8", "fp8"):
        raise typer.BadParameter(f"--quantize takes int8 or fp8, not {quantize!r}", param_hint="'--quantize'")
    from ..interop import export as export_file

    with open_existing(bank) as b, render.busy(f"exporting {ref}"):
        chosen: str | list[str] | None = (select[0] if len(select) == 1 else select) or None
        cid = b.resolve(ref)
        try:
            path = export_file(b, cid, out, select=chosen, overwrite=force, quantize=quantize)
        except FileExistsError:
            raise typer.BadParameter(
                f"{out} exists; pass --force to replace it", param_hint="'OUT'"
            ) from None
    emit(f"exported {render.short(cid)} ({ref}) to {path} ({render.human_bytes(path.stat().st_size)})")


# -- inspecting -----------------------------------------------------------------------
def _log(bank: str, run: str | None, graph: bool, limit: int | None, as_json: bool) -> None:
    with open_existing(bank) as b:
        infos = b.log(run, limit=limit)
        events = _events(b, run)
    if as_json:
        emit_json(infos)
    elif not infos:
        emit("no checkpoints yet (add one with `weightbank save FILE`)")
    else:
        emit(render.graph_view(infos) if graph else render.checkpoint_table(infos))
        if events:
            emit(render.events_table(events))


def _events(b: Bank, run: str | None) -> list[RunEvent]:
    """Every event of the runs shown; a run whose event log is damaged is named on stderr, not fatal."""
    found: list[RunEvent] = []
    for r in [run] if run is not None else b.runs():
        try:
            found.extend(b.events(r))
        except CorruptObject as e:
            typer.echo(
                f"warning: the event log of run {r!r} is damaged ({e.detail}); see `weightbank verify`",
                err=True,
            )
    return sorted(found, key=lambda e: e.at, reverse=True)


RunArg = Annotated[str | None, typer.Argument(metavar="RUN", help="Only this run.")]
GraphOpt = Annotated[
    bool, typer.Option("--graph", "-g", help="Draw the lineage graph (parents can cross runs).")
]
LimitOpt = Annotated[
    int | None, typer.Option("--limit", "-n", min=1, metavar="N", help="Show at most N checkpoints.")
]


@app.command()
def log(
    run: RunArg = None,
    graph: GraphOpt = False,
    limit: LimitOpt = None,
    bank: BankOpt = DEFAULT_BANK,
    as_json: JsonOpt = False,
) -> None:
    """List checkpoints, newest first, with their tags."""
    _log(bank, run, graph, limit, as_json)


@app.command()
def events(
    run: RunArg = None,
    bank: BankOpt = DEFAULT_BANK,
    as_json: JsonOpt = False,
) -> None:
    """Run events besides saves (automatic rollbacks, preemptions), newest first."""
    with open_existing(bank) as b:
        found = _events(b, run)
    if as_json:
        emit_json(found)
    elif not found:
        emit("no run events")
    else:
        emit(render.events_table(found))


app.command("ls", help="Same as `log`.")(log)


@app.command()
def show(
    ref: Annotated[str, typer.Argument(metavar="REF", help="Checkpoint to show.")],
    bank: BankOpt = DEFAULT_BANK,
    as_json: JsonOpt = False,
) -> None:
    """Metadata, metrics, config, environment and the per-tensor table of one checkpoint."""
    with open_existing(bank) as b:
        detail = b.show(ref)
        parent = _label_of(b, detail.info.parent)
    if as_json:
        emit_json(detail)
    else:
        emit(render.detail_view(detail, parent))


@app.command()
def diff(
    a: Annotated[str, typer.Argument(metavar="A", help="Old checkpoint.")],
    b: Annotated[str, typer.Argument(metavar="B", help="New checkpoint.")],
    show_all: Annotated[bool, typer.Option("--all", "-a", help="Include unchanged tensors.")] = False,
    bank: BankOpt = DEFAULT_BANK,
    as_json: JsonOpt = False,
) -> None:
    """Per-tensor differences from A to B (max |Δ|, relative L2, bytes that differ)."""
    with open_existing(bank) as bk:
        result = bk.diff(a, b)
        labels = {cid: _label_of(bk, cid) or "" for cid in (result.a, result.b)}
    if as_json:
        emit_json(result)
    else:
        emit(render.diff_view(result, show_all=show_all, labels=labels))


@app.command()
def du(bank: BankOpt = DEFAULT_BANK, as_json: JsonOpt = False) -> None:
    """Logical vs unique vs stored bytes: how much deduplication and compression save."""
    with open_existing(bank) as b:
        report = b.du()
    if as_json:
        emit_json(report)
    else:
        emit(render.du_view(report))


# -- tags (cli/tags.py), listed here in --help -----------------------------------------
tags_command.register(app)


# -- maintenance ----------------------------------------------------------------------
@app.command()
def verify(
    ref: Annotated[
        str | None, typer.Argument(metavar="REF", help="Only this checkpoint (default: the whole bank).")
    ] = None,
    quick: Annotated[bool, typer.Option("--quick", help="Check presence and sizes, not every hash.")] = False,
    fix: Annotated[
        bool,
        typer.Option(
            "--fix", help="If the catalog index has problems, rebuild it (`repair-index`) and verify again."
        ),
    ] = False,
    bank: BankOpt = DEFAULT_BANK,
    as_json: JsonOpt = False,
) -> None:
    """Re-hash every chunk and check manifests, tags and the catalog index; exit code 4 if anything is wrong.

    With --fix, `index` problems are repaired and the bank verified again (--json then prints
    {"before": report, "repair": result or null, "after": report}).
    """
    with open_existing(bank) as b:
        with render.busy("verifying"):
            report = b.verify(ref, full=not quick)
        if fix:
            _verify_fix(b, report, ref, full=not quick, as_json=as_json)
            return
    if as_json:
        emit_json(report)
    else:
        emit(render.verify_view(report))
    if not report.ok:
        raise typer.Exit(CORRUPT)


def _verify_fix(b: Bank, before: VerifyReport, ref: str | None, *, full: bool, as_json: bool) -> None:
    """``verify --fix``: repair the index if ``before`` found it wrong, verify again, print both."""
    if not as_json:
        emit(render.verify_view(before))
    repair, after = None, before
    if any(p.kind == "index" for p in before.problems):
        with render.busy("rebuilding the catalog index"):
            repair = b.repair_index()
        with render.busy("verifying again"):
            after = b.verify(ref, full=full)
    if as_json:
        emit_json({"before": before, "repair": repair, "after": after})
    elif repair is not None:
        emit(Text(""), indexing_command.repair_line(repair), Text(""), render.verify_view(after))
    elif not before.ok:
        emit(Text(""), Text("nothing for --fix to repair: the catalog index has no problems"))
    if not after.ok:
        raise typer.Exit(CORRUPT)


@app.command()
def gc(
    grace: Annotated[
        str,
        typer.Option(
            "--grace", metavar="AGE", help="Spare data younger than this (seconds, or 30m, 1h, 2d)."
        ),
    ] = "3600",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Only report what would be removed.")] = False,
    bank: BankOpt = DEFAULT_BANK,
    as_json: JsonOpt = False,
) -> None:
    """Remove data no checkpoint needs (never data a save in flight may use)."""
    seconds = parse_duration(grace, "--grace")
    with open_existing(bank) as b:
        report = b.gc(grace=seconds, dry_run=dry_run)
    if as_json:
        emit_json(report)
    else:
        emit(render.gc_view(report))


@app.command()
def prune(
    keep_last: Annotated[
        int | None, typer.Option("--keep-last", min=0, metavar="N", help="Keep each run's newest N.")
    ] = None,
    keep_best: Annotated[
        str | None,
        typer.Option(
            "--keep-best",
            metavar="METRIC:K[:max]",
            help="METRIC:K[:max]: keep each run's best K (lowest by default).",
        ),
    ] = None,
    keep_every: Annotated[
        int | None,
        typer.Option(
            "--keep-every", min=1, metavar="M", help="Keep checkpoints whose step is a multiple of M."
        ),
    ] = None,
    older_than: Annotated[
        str | None,
        typer.Option(
            "--older-than", metavar="AGE", help="Only consider checkpoints older than this (e.g. 7d, 12h)."
        ),
    ] = None,
    run: Annotated[
        str | None, typer.Option("--run", "-r", metavar="RUN", help="Only prune this run.")
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Really delete (default: dry run).")] = False,
    bank: BankOpt = DEFAULT_BANK,
    as_json: JsonOpt = False,
) -> None:
    """Delete checkpoints no rule keeps. A DRY RUN unless --yes; tagged checkpoints are always kept.

    Rules add up: a checkpoint survives if any rule keeps it. Data is freed by the next `gc`.
    """
    if keep_last is None and keep_best is None and keep_every is None and older_than is None:
        raise typer.BadParameter(
            "prune needs at least one rule: --keep-last, --keep-best, --keep-every or --older-than"
        )
    best = parse_keep_best(keep_best) if keep_best is not None else None
    age = parse_duration(older_than) if older_than is not None else None
    with open_existing(bank) as b:
        infos = {c.id: c for c in b.log()}
        report = b.prune(
            run=run,
            keep_last=keep_last,
            keep_best=best,
            keep_every=keep_every,
            older_than=age,
            dry_run=not yes,
        )
    if as_json:
        emit_json(report)
    else:
        emit(render.prune_view(report, infos))


# -- the catalog index (cli/indexing.py), listed here in --help ------------------------
indexing_command.register(app)
repack_command.register(app)
copy_command.register(app)


# -- demo -----------------------------------------------------------------------------
DEMO_PARTS = ("all", "bank", "training", "serving")


@app.command()
def demo(
    part: Annotated[
        str, typer.Argument(help="bank | training | serving | all (the default runs the three in turn)")
    ] = "all",
    bank: BankOpt = DEFAULT_BANK,
) -> None:
    """Show weightbank on a new local bank: checkpoints and tags, training with resume and rollback, serving."""
    if part not in DEMO_PARTS:
        raise typer.BadParameter(f"unknown demo part {part!r}; choose one of {', '.join(DEMO_PARTS)}")
    from .demo import run_demo

    console = render.make_console()
    if part in ("all", "bank"):
        run_demo(bank, console)
    if part in ("all", "training"):
        from .demo_training import run as run_training

        with open_bank(bank, create=True) as b:
            run_training(b, console)
    if part in ("all", "serving"):
        from .demo_serving import run as run_serving

        with open_bank(bank, create=True) as b:
            run_serving(b, console)


# Commands owned by the training and serving layers register themselves here.
drill_command.register(app)
serve_command.register(app)


def main() -> None:
    """Entry point of the ``weightbank`` console script."""
    app()
