"""What every ``weightbank`` subcommand module shares: the common options and how output is printed.

Example:
    >>> from weightbank.cli.common import DEFAULT_BANK
    >>> DEFAULT_BANK
    './bank'
"""

from __future__ import annotations

import os
from typing import Annotated, Any

import typer
from rich.console import RenderableType

from .. import open as open_bank
from ..bank.bank import Bank
from ..errors import NotABank
from . import render

__all__ = [
    "DEFAULT_BANK",
    "BankOpt",
    "JsonOpt",
    "MessageOpt",
    "RunOpt",
    "StepOpt",
    "TagOpt",
    "WhyOpt",
    "emit",
    "emit_json",
    "open_existing",
]

DEFAULT_BANK = "./bank"
BankOpt = Annotated[
    str,
    typer.Option(
        "--bank",
        "-b",
        envvar="WEIGHTBANK_BANK",
        help="The bank: a directory, file://…, memory://… or s3://bucket/prefix (client options as JSON in $WEIGHTBANK_STORAGE_OPTIONS).",
        metavar="PATH",
    ),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON instead of tables.")]
TagOpt = Annotated[
    list[str], typer.Option("--tag", "-t", metavar="TAG", help="Tag the new checkpoint (repeatable).")
]
RunOpt = Annotated[str, typer.Option("--run", "-r", metavar="RUN", help="Run the checkpoint belongs to.")]
StepOpt = Annotated[int | None, typer.Option("--step", "-s", min=0, metavar="N", help="Training step.")]
MessageOpt = Annotated[
    str, typer.Option("--message", "-m", metavar="TEXT", help="A note stored with the checkpoint.")
]
WhyOpt = Annotated[str, typer.Option("--why", metavar="TEXT", help="Reason, kept in the tag's history.")]


def emit(*renderables: RenderableType) -> None:
    """Print rich renderables to stdout."""
    console = render.make_console()
    for r in renderables:
        console.print(r)


def emit_json(obj: Any) -> None:
    """Print a result as JSON (``--json``)."""
    typer.echo(render.to_json(obj))


def open_existing(path: str) -> Bank:
    """An existing bank; never creates one (NotABank says how)."""
    if "://" not in path and not os.path.isdir(path):
        raise NotABank(os.path.abspath(path), "it is a file" if os.path.exists(path) else "no such directory")
    return open_bank(path, create=False)
