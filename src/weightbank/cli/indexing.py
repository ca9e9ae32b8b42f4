"""``weightbank upgrade``, ``repair-index`` and ``compact``: the operator's verbs for the catalog index.

Each is one call of :class:`~weightbank.Bank` (``upgrade``, ``repair_index``,
``compact``) and a line saying what it did. Saves keep the index up to date on
their own, so none of these is needed in normal use; ``verify --fix`` (in
:mod:`.main`) runs ``repair-index`` when ``verify`` finds an ``index`` problem.

Example:
    >>> import typer
    >>> from weightbank.cli.indexing import register
    >>> app = typer.Typer(); register(app)
    >>> sorted(c.name or c.callback.__name__ for c in app.registered_commands)
    ['compact', 'repair-index', 'upgrade']
"""

from __future__ import annotations

import typer
from rich.text import Text

from ..bank.indexing import CompactResult
from ..bank.marker import BANK_VERSION
from . import render
from .common import DEFAULT_BANK, BankOpt, JsonOpt, emit, emit_json, open_existing

__all__ = ["compact_line", "register", "repair_line", "upgrade_line"]


# -- output -----------------------------------------------------------------------------
def _unresolved(result: CompactResult) -> str:
    out = ""
    if result.held:
        out += f"; {result.held} entr{'y' if result.held == 1 else 'ies'} held (saves or deletes in flight)"
    if result.dropped:
        out += f"; {result.dropped} dropped (saves that died before their commit)"
    return out


def compact_line(result: CompactResult) -> Text:
    """``compact``: the snapshot published and the log entries folded into it, or that there was none.

    Example:
        >>> print(compact_line(CompactResult(gen=3, folded=2, held=0, dropped=0)))
        folded 2 pending catalog entries into index snapshot 3
    """
    if not result.gen:
        return Text(
            "nothing to compact: no catalog entries were pending (or another process just folded them)"
        )
    n = result.folded
    return Text(
        f"folded {n} pending catalog entr{'y' if n == 1 else 'ies'} into index snapshot {result.gen}"
        + _unresolved(result)
    )


def repair_line(result: CompactResult) -> Text:
    """``repair-index``: the snapshot rebuilt from the manifests and how many checkpoints it holds.

    Example:
        >>> print(repair_line(CompactResult(gen=4, folded=7, held=0, dropped=0)))
        rebuilt the catalog index from the manifests: 7 checkpoint(s) in index snapshot 4
    """
    if not result.gen:
        return Text(
            "the catalog index was not rebuilt: another process published a snapshot at the same moment;"
            " run `weightbank verify`, and `weightbank repair-index` again if it still reports an index problem",
            style=render.BAD,
        )
    return Text(
        f"rebuilt the catalog index from the manifests: {result.folded} checkpoint(s) in index snapshot"
        f" {result.gen}" + _unresolved(result)
    )


def upgrade_line(url: str, upgraded: bool, version: int = BANK_VERSION) -> Text:
    """``upgrade``: whether the bank was upgraded, and what that means for older releases.

    Example:
        >>> print(upgrade_line("/b", False))
        /b is bank format 3 already; nothing to upgrade
    """
    if not upgraded:
        return Text(f"{url} is bank format {version} already; nothing to upgrade")
    out = Text(
        f"upgraded {url} to bank format {version}: it keeps a catalog index (built from every manifest if it had"
        " none), and new checkpoints get format-3 manifests, whose ids cover their content, not where it lies\n"
    )
    out.append(
        "older weightbank releases refuse to open it from now on: every process that uses it needs this one"
    )
    return out


# -- commands ---------------------------------------------------------------------------
def register(app: typer.Typer) -> None:
    """Add the catalog index commands to ``app``."""

    @app.command()
    def upgrade(bank: BankOpt = DEFAULT_BANK, as_json: JsonOpt = False) -> None:
        """Bring an older bank to format 3 (a catalog index, format-3 manifests); older releases refuse it afterwards.

        A format-1 bank's manifests are read once to build the index; nothing
        already in the bank is rewritten, and every id stays. The first save
        into an old bank does the same on its own.
        """
        with open_existing(bank) as b, render.busy("upgrading"):
            upgraded = b.upgrade()
            url = b.url
        if as_json:
            emit_json({"url": url, "upgraded": upgraded, "format": BANK_VERSION})
        else:
            emit(upgrade_line(url, upgraded))

    @app.command("repair-index")
    def repair_index(bank: BankOpt = DEFAULT_BANK, as_json: JsonOpt = False) -> None:
        """Rebuild the catalog index from the manifests (the fix for an `index` problem `verify` reports).

        Checkpoints, tags and data are untouched. Upgrades a format-1 bank.
        """
        with open_existing(bank) as b, render.busy("rebuilding the catalog index"):
            result = b.repair_index()
        if as_json:
            emit_json(result)
        else:
            emit(repair_line(result))

    @app.command()
    def compact(bank: BankOpt = DEFAULT_BANK, as_json: JsonOpt = False) -> None:
        """Fold the catalog index's pending log entries into a new snapshot now (saves do this on their own).

        Upgrades a format-1 bank.
        """
        with open_existing(bank) as b:
            result = b.compact()
        if as_json:
            emit_json(result)
        else:
            emit(compact_line(result))
