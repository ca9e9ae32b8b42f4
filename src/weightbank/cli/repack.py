"""``weightbank repack``: rewrite partly dead packs so ``gc`` can free them; no id, tag or lineage changes.

Example:
    >>> import typer
    >>> from weightbank.cli.repack import register
    >>> app = typer.Typer(); register(app)
    >>> [c.name or c.callback.__name__ for c in app.registered_commands]
    ['repack', 'rekey']
"""

from __future__ import annotations

from typing import Annotated

import typer
from rich.text import Text

from ..bank.repack import DEFAULT_MIN_DEAD
from ..bank.results import RekeyReport, RepackReport
from .common import DEFAULT_BANK, BankOpt, JsonOpt, emit, emit_json, open_existing
from .render import busy, human_bytes

__all__ = ["register", "rekey_view", "repack_view"]


def repack_view(report: RepackReport) -> Text:
    """What a repack rewrote (or would), and what the next ``gc`` frees.

    Example:
        >>> print(repack_view(RepackReport(("p",), 4096, 1024, ("q",), 3, 0, False, 0.1)))
        rewrote 1 pack(s) (4.0 KiB) into 1 new pack(s) (1.0 KiB of live chunks) and moved 3 manifest(s); ids unchanged
        the next `weightbank gc` frees 3.0 KiB once the old packs are past the grace period
        >>> print(repack_view(RepackReport((), 0, 0, (), 0, 0, False, 0.1, recoded=4, recode_written=2048)))
        re-coded 4 checkpoint(s) onto the new keyframe(s) (2.0 KiB written); ids unchanged
        nothing to repack: no pack is dead enough
    """
    n = len(report.packs_rewritten)
    pinned = f"\n{report.packs_pinned} partly dead pack(s) are used by format-1/2 manifests and stay" * bool(
        report.packs_pinned
    )
    recoded = ""
    if report.recoded:
        recoded = (
            f"would re-code up to {report.recoded} checkpoint(s) onto the new keyframe(s)\n"
            if report.dry_run
            else f"re-coded {report.recoded} checkpoint(s) onto the new keyframe(s)"
            f" ({human_bytes(report.recode_written)} written); ids unchanged\n"
        )
    if not n:
        return Text(recoded + "nothing to repack: no pack is dead enough" + pinned)
    if report.dry_run:
        return Text(
            f"{recoded}would rewrite {n} pack(s) ({human_bytes(report.bytes_before)}), keeping"
            f" {human_bytes(report.bytes_copied)} of live chunks" + pinned
        )
    return Text(
        f"{recoded}rewrote {n} pack(s) ({human_bytes(report.bytes_before)}) into {len(report.packs_written)} new pack(s)"
        f" ({human_bytes(report.bytes_copied)} of live chunks) and moved {report.manifests_rewritten}"
        f" manifest(s); ids unchanged\nthe next `weightbank gc` frees"
        f" {human_bytes(report.bytes_before - report.bytes_copied)} once the old packs are past the grace period"
        + pinned
    )


def rekey_view(report: RekeyReport) -> Text:
    """What a rekey re-coded.

    Example:
        >>> print(rekey_view(RekeyReport("ab" * 32, ("ab" * 32, "cd" * 32), 2, 10, 4096, 0.2)))
        abababababab now loads with no delta chain; re-coded 2 checkpoint(s), 10 chunk(s) (4.0 KiB); ids unchanged
        the next `weightbank gc` frees the codings it replaced
        >>> print(rekey_view(RekeyReport("ab" * 32, ("ab" * 32, "cd" * 32), 1, 0, 0, 0.1)))
        abababababab loads with no delta chain; 1 checkpoint(s)' chains re-pointed, nothing re-coded; ids unchanged
    """
    if not report.chunks_written and report.recoded:
        return Text(
            f"{report.keyframe[:12]} loads with no delta chain; {report.recoded} checkpoint(s)' chains"
            " re-pointed, nothing re-coded; ids unchanged"
        )
    if not report.chunks_written:
        return Text(f"{report.keyframe[:12]} already loads with no delta chain; nothing re-coded")
    return Text(
        f"{report.keyframe[:12]} now loads with no delta chain; re-coded {report.recoded} checkpoint(s),"
        f" {report.chunks_written} chunk(s) ({human_bytes(report.bytes_written)}); ids unchanged\n"
        "the next `weightbank gc` frees the codings it replaced"
    )


def register(app: typer.Typer) -> None:
    """Add ``repack`` and ``rekey`` to ``app``."""

    @app.command()
    def repack(
        min_dead: Annotated[
            float,
            typer.Option(
                "--min-dead",
                metavar="SHARE",
                help="Rewrite packs at least this share dead (0-1].",
            ),
        ] = DEFAULT_MIN_DEAD,
        dry_run: Annotated[
            bool, typer.Option("--dry-run", help="Only report what would be rewritten.")
        ] = False,
        keyframe: Annotated[
            list[str] | None,
            typer.Option(
                "--keyframe",
                "-k",
                metavar="REF",
                help="First make REF a keyframe: its chunks standalone, up to 15 ancestors reverse"
                " deltas onto it, so it loads fastest (repeatable; e.g. run@latest before a resume).",
            ),
        ] = None,
        bank: BankOpt = DEFAULT_BANK,
        as_json: JsonOpt = False,
    ) -> None:
        """Copy the live chunks of partly dead packs into new ones (then `gc` frees the old); no id changes."""
        with open_existing(bank) as b, busy("repacking"):
            report = b.repack(min_dead=min_dead, dry_run=dry_run, keyframe=keyframe or None)
        if as_json:
            emit_json(report)
        else:
            emit(repack_view(report))

    @app.command()
    def rekey(
        ref: Annotated[
            str, typer.Argument(metavar="REF", help="The checkpoint to make a keyframe (e.g. run@latest).")
        ],
        bank: BankOpt = DEFAULT_BANK,
        as_json: JsonOpt = False,
    ) -> None:
        """Make REF load with no delta chain; its parent becomes a reverse delta (cheap after every save)."""
        with open_existing(bank) as b, busy("rekeying"):
            report = b.rekey(ref)
        if as_json:
            emit_json(report)
        else:
            emit(rekey_view(report))
