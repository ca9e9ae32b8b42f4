"""``weightbank copy``: checkpoints into another bank (another directory or store), ids and tags kept.

Example:
    >>> import typer
    >>> from weightbank.cli.copy import register
    >>> app = typer.Typer(); register(app)
    >>> [c.name or c.callback.__name__ for c in app.registered_commands]
    ['copy']
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.text import Text

from ..bank.results import CopyReport
from .common import DEFAULT_BANK, BankOpt, JsonOpt, emit, emit_json, open_existing
from .render import busy, human_bytes

__all__ = ["copy_view", "register"]


def copy_view(report: CopyReport, dest: str) -> Text:
    """What a copy did, in a line or two.

    Example:
        >>> r = CopyReport(("a" * 64,), ("b" * 64,), 4096, 1024, ("prod",), 0.5, tags_left=("canary",))
        >>> print(copy_view(r, "s3://b/x"))
        copied 1 checkpoint(s) to s3://b/x (4.0 KiB written, 1.0 KiB already there); ids unchanged
        1 already there; set tag(s) prod; left tag(s) canary where they are there (--move-tags moves them)
    """
    lines = [
        f"copied {len(report.copied)} checkpoint(s) to {dest} ({human_bytes(report.bytes_copied)} written,"
        f" {human_bytes(report.bytes_reused)} already there); ids unchanged"
    ]
    more = []
    if report.skipped:
        more.append(f"{len(report.skipped)} already there")
    if report.tags:
        more.append("set tag(s) " + ", ".join(report.tags))
    if report.tags_left:
        more.append(
            "left tag(s) " + ", ".join(report.tags_left) + " where they are there (--move-tags moves them)"
        )
    if report.refused:
        more.append(f"{len(report.refused)} of format 1/2 not copied (their ids cover where bytes lie)")
    if more:
        lines.append("; ".join(more))
    return Text("\n".join(lines))


def register(app: typer.Typer) -> None:
    """Add ``copy`` to ``app``."""

    @app.command()
    def copy(
        to: Annotated[
            str,
            typer.Option(
                "--to",
                metavar="URL",
                help="The destination bank: a directory or s3://bucket/prefix (created if needed).",
            ),
        ],
        refs: Annotated[
            list[str] | None,
            typer.Argument(metavar="REF", help="What to copy (default: every checkpoint)."),
        ] = None,
        ancestors: Annotated[
            bool, typer.Option("--ancestors", help="Copy each checkpoint's ancestors too.")
        ] = False,
        no_tags: Annotated[
            bool, typer.Option("--no-tags", help="Do not set the tags that point at copied checkpoints.")
        ] = False,
        move_tags: Annotated[
            bool,
            typer.Option(
                "--move-tags", help="Also move tags the destination has on other checkpoints (a promote)."
            ),
        ] = False,
        bank: BankOpt = DEFAULT_BANK,
        as_json: JsonOpt = False,
    ) -> None:
        """Copy checkpoints into another bank (e.g. local disk to S3); ids, lineage and tags stay the same."""
        if not to:
            raise typer.BadParameter("say where to copy with --to URL", param_hint="--to")
        with open_existing(bank) as b, busy("copying"):
            report = b.copy_to(to, refs or None, ancestors=ancestors, tags=not no_tags, move_tags=move_tags)
        if as_json:
            emit_json(report)
        else:
            emit(copy_view(report, to))
