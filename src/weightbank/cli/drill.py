"""``weightbank drill REF --model pkg.module:factory``: a restore rehearsal a user can run nightly.

The command builds a fresh model with the factory (a module, a ``(model,
optimizer)`` pair or a TrainingState), verifies every chunk hash of the
checkpoint, restores it, runs the optional ``--check pkg.module:function``
on the model, and prints the restore time by phase. It exits non-zero on any
failure: 4 for damaged data, 3 for an unknown ref, 2 for a model that does not
fit, 1 for a failed check.

Example:
    >>> import typer
    >>> from typer.testing import CliRunner
    >>> from weightbank.cli.drill import register
    >>> app = typer.Typer(); register(app)
    >>> "--model" in CliRunner().invoke(app, ["drill", "--help"]).output
    True
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from .. import open as open_bank
from ..errors import WeightbankError
from ..training.drill import DrillReport, drill
from . import render
from .exitcodes import CORRUPT, FAILURE, describe, exit_code

__all__ = ["load_object", "register"]


def load_object(spec: str) -> Any:
    """The object named ``module.path:attr.path`` (or ``file.py:attr``).

    Example:
        >>> load_object("os.path:join")("a", "b")
        'a/b'
    """
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"{spec!r} is not MODULE:NAME (e.g. mypkg.models:build)")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise FileNotFoundError(2, "No such file", str(path))
        mspec = importlib.util.spec_from_file_location(path.stem, path)
        if mspec is None or mspec.loader is None:
            raise ValueError(f"cannot import {module_name}")
        module = importlib.util.module_from_spec(mspec)
        sys.modules.setdefault(path.stem, module)
        mspec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise ValueError(f"cannot import {module_name!r}: {e}") from None
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise ValueError(f"{module_name!r} has no attribute {attr!r}") from None
    return obj


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:,.1f} ms"


def _report(report: DrillReport) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False, show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value")
    info = report.checkpoint
    table.add_row("checkpoint", f"{info.short_id}  {render.label(info)}")
    v = report.verify
    table.add_row(
        "verify",
        f"{'ok' if v.ok else 'FAILED'}: {v.chunks} chunks, {render.human_bytes(v.bytes_checked)} hashed"
        f" in {_ms(report.verify_seconds)}",
    )
    for p in v.problems:
        table.add_row("", f"{p.kind}: {p.key} {p.detail}")
    if v.ok:
        table.add_row("restored", ", ".join(report.restored))
        table.add_row(
            "read+decode", _ms(report.read_seconds) + "  (fetch, hash-check and decode every tensor)"
        )
        table.add_row("copy", _ms(report.copy_seconds) + "  (into the model / optimizer)")
        table.add_row("restore total", _ms(report.restore_seconds))
    if report.check_error is not None:
        table.add_row("check", f"FAILED: {report.check_error}")
    elif report.check_seconds:
        table.add_row("check", f"passed in {_ms(report.check_seconds)}")
    return table


def register(app: typer.Typer) -> None:
    """Add the ``drill`` command to ``app``.

    Example:
        >>> import typer
        >>> register(typer.Typer())
    """

    @app.command("drill")
    def drill_cmd(
        ref: Annotated[str, typer.Argument(help="The checkpoint to restore (any ref).")],
        model: Annotated[
            str,
            typer.Option(
                "--model",
                "-M",
                metavar="MODULE:FACTORY",
                help="Builds a fresh model, (model, optimizer) or TrainingState.",
            ),
        ],
        check: Annotated[
            str | None,
            typer.Option(
                "--check", metavar="MODULE:FUNCTION", help="Called with the model; False or raising fails."
            ),
        ] = None,
        device: Annotated[
            str | None, typer.Option("--device", metavar="DEVICE", help="Where to build the model.")
        ] = None,
        bank: Annotated[
            str,
            typer.Option("--bank", "-b", envvar="WEIGHTBANK_BANK", metavar="PATH", help="The bank."),
        ] = "./bank",
    ) -> None:
        """Restore a checkpoint into a freshly built model, verify every hash, time it; non-zero on failure."""
        try:
            factory = load_object(model)
            checker = load_object(check) if check else None
            b = open_bank(bank, create=False)
            report = drill(b, ref, factory, device=device, check=checker)
        except (WeightbankError, OSError, ValueError) as err:
            typer.echo(f"error: {describe(err)}", err=True)
            raise typer.Exit(exit_code(err)) from None
        render.make_console().print(_report(report))
        if not report.verify.ok:
            raise typer.Exit(CORRUPT)
        if report.check_error is not None:
            raise typer.Exit(FAILURE)
