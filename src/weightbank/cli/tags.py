"""``weightbank tag``, ``untag``, ``rollback`` and ``tags``: moving names and reading their history.

Example:
    >>> import typer
    >>> from weightbank.cli.tags import register
    >>> app = typer.Typer(); register(app)
    >>> sorted(c.name or c.callback.__name__ for c in app.registered_commands)
    ['rollback', 'tag', 'tags', 'untag']
"""

from __future__ import annotations

import contextlib
from typing import Annotated, Any

import typer

from ..errors import CheckpointNotFound
from . import render
from .common import DEFAULT_BANK, BankOpt, JsonOpt, WhyOpt, emit, emit_json, open_existing

__all__ = ["register"]


def register(app: typer.Typer) -> None:
    """Add the tag commands to ``app``."""

    @app.command()
    def tag(
        name: Annotated[str, typer.Argument(metavar="NAME", help="Tag name.")],
        ref: Annotated[str, typer.Argument(metavar="REF", help="Checkpoint it should point to.")],
        why: WhyOpt = "",
        expect: Annotated[
            str | None,
            typer.Option(
                "--expect",
                metavar="REF",
                help="Only move the tag if it points here now (a ref; `none`: only if the tag does not exist).",
            ),
        ] = None,
        bank: BankOpt = DEFAULT_BANK,
        as_json: JsonOpt = False,
    ) -> None:
        """Point a tag at a checkpoint (recorded in the tag's history)."""
        with open_existing(bank) as b:
            kwargs: dict[str, Any] = {}
            if expect is not None:
                kwargs["expect"] = None if expect.lower() == "none" else expect
            event = b.tag(name, ref, why=why, **kwargs)
        if as_json:
            emit_json(event)
        else:
            emit(render.tag_event_line(event))

    @app.command()
    def untag(
        name: Annotated[str, typer.Argument(metavar="NAME", help="Tag to remove.")],
        why: WhyOpt = "",
        force: Annotated[
            bool,
            typer.Option(
                "--force", help="Also remove a tag whose record is damaged (its bytes go to quarantine/)."
            ),
        ] = False,
        bank: BankOpt = DEFAULT_BANK,
        as_json: JsonOpt = False,
    ) -> None:
        """Remove a tag (its history stays; `rollback` brings it back)."""
        with open_existing(bank) as b:
            event = b.untag(name, why=why, force=force)
        if as_json:
            emit_json(event)
        else:
            emit(render.tag_event_line(event))

    @app.command()
    def rollback(
        name: Annotated[str, typer.Argument(metavar="TAG", help="Tag to move back.")],
        steps: Annotated[
            int, typer.Option("--steps", "-n", min=1, metavar="N", help="How many moves to undo.")
        ] = 1,
        why: WhyOpt = "",
        bank: BankOpt = DEFAULT_BANK,
        as_json: JsonOpt = False,
    ) -> None:
        """Move a tag back to where it pointed before its last move(s)."""
        with open_existing(bank) as b:
            event = b.rollback(name, steps, why=why)
        if as_json:
            emit_json(event)
        else:
            emit(render.tag_event_line(event))

    @app.command()
    def tags(
        name: Annotated[str | None, typer.Argument(metavar="NAME", help="Show this tag's history.")] = None,
        history: Annotated[bool, typer.Option("--history", help="Show every change, oldest first.")] = False,
        bank: BankOpt = DEFAULT_BANK,
        as_json: JsonOpt = False,
    ) -> None:
        """List tags and their targets, or (--history / NAME) every change made to them."""
        with open_existing(bank) as b:
            if name is None and not history:
                live = b.tags()
                # Each target's record from the catalog index: the cost follows the tags, not the bank.
                infos = {}
                for t in live:
                    if t.target is not None and t.target not in infos:
                        with contextlib.suppress(CheckpointNotFound):
                            infos[t.target] = b.info(t.target)
                if as_json:
                    emit_json(live)
                elif not live:
                    emit("no tags yet (add one with `weightbank tag NAME REF`)")
                else:
                    emit(render.tags_table(live, infos))
                return
            names = [name] if name is not None else [t.name for t in b.tags() if not t.problem]
            events = sorted((e for n in names for e in b.tag_history(n)), key=lambda e: e.at)
        if as_json:
            emit_json(events)
        elif not events:
            emit("no tag history yet")
        else:
            emit(render.history_table(events))
