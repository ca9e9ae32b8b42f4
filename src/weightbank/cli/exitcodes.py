"""Exit codes of the ``weightbank`` command and the one-line reports of user errors and warnings.

Every :class:`~weightbank.errors.WeightbankError`, a missing or unreadable input
file, a bad option value and a usage mistake ends the command with one line on
stderr (``error: ...``) and the exit code of its kind; anything else is a bug and
keeps its traceback. ``WEIGHTBANK_DEBUG=1`` shows the traceback of user errors too.
A warning the library gives users (:data:`USER_WARNINGS`: the catalog index could
not be trusted, so the answer came from listing every manifest) is one
``warning: ...`` line on stderr, and the command still answers.

Example:
    >>> import weightbank as wb
    >>> from weightbank.cli.exitcodes import exit_code, NOT_FOUND
    >>> exit_code(wb.CheckpointNotFound("x")) == NOT_FOUND
    True
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from typing import Any, TextIO

import typer
import typer.core

from ..bank.catalog import IndexFallbackWarning
from ..errors import CheckpointNotFound, CorruptObject, MissingObject, NoHistory, NotABank, WeightbankError

__all__ = [
    "CORRUPT",
    "EPILOG",
    "FAILURE",
    "INTERRUPTED",
    "NOT_FOUND",
    "OK",
    "USAGE",
    "USER_WARNINGS",
    "BankGroup",
    "describe",
    "exit_code",
    "warnings_as_lines",
]

OK = 0
FAILURE = 1
USAGE = 2
NOT_FOUND = 3
CORRUPT = 4
INTERRUPTED = 130

EPILOG = (
    "Exit codes: 0 ok · 1 other failure (storage, concurrent update) · "
    "2 usage or bad input (bad ref, name, option value) · "
    "3 not found (checkpoint, tag, run, bank, input file, history) · "
    "4 damaged bank (corrupt or missing data, `verify` found problems) · 130 interrupted."
)


def exit_code(err: BaseException) -> int:
    """The exit code for a user-facing error (see :data:`EPILOG`).

    Beyond the named classes, the built-in base of an error decides: a
    WeightbankError that is a LookupError (KeyError) or FileNotFoundError is
    "not found", one that is a ValueError or TypeError is bad input.
    """
    if isinstance(err, (CorruptObject, MissingObject)):
        return CORRUPT
    if isinstance(err, (CheckpointNotFound, NoHistory, NotABank, FileNotFoundError)):
        return NOT_FOUND
    if isinstance(err, LookupError) and isinstance(err, WeightbankError):
        return NOT_FOUND
    if isinstance(err, (ValueError, TypeError)) and isinstance(err, WeightbankError):
        return USAGE
    if isinstance(err, WeightbankError):
        return FAILURE
    if isinstance(err, ValueError):
        return USAGE
    return FAILURE


def describe(err: BaseException) -> str:
    """One line saying what went wrong, without the exception class or a traceback."""
    if isinstance(err, OSError) and not isinstance(err, WeightbankError) and err.strerror:
        where = f": {err.filename}" if err.filename else ""
        text = f"{err.strerror.lower()}{where}"
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())


#: Warnings the library gives users of a bank, shown as one ``warning:`` line each (others keep Python's format).
USER_WARNINGS: tuple[type[Warning], ...] = (IndexFallbackWarning,)


@contextlib.contextmanager
def warnings_as_lines() -> Iterator[None]:
    """While the block runs, each of :data:`USER_WARNINGS` is printed as one ``warning: ...`` line on stderr.

    They are always shown (the library gives each once per bank), never turned
    into errors by the caller's filters: the command still answers.

    Example:
        >>> import contextlib, io, warnings
        >>> err = io.StringIO()
        >>> with contextlib.redirect_stderr(err), warnings_as_lines():
        ...     warnings.warn("the index is damaged; listing every manifest", IndexFallbackWarning)
        >>> print(err.getvalue().strip())
        warning: the index is damaged; listing every manifest
    """
    with warnings.catch_warnings():
        for category in USER_WARNINGS:
            warnings.simplefilter("always", category)
        previous = warnings.showwarning

        def show(
            message: Warning | str,
            category: type[Warning],
            filename: str,
            lineno: int,
            file: TextIO | None = None,
            line: str | None = None,
        ) -> None:
            if issubclass(category, USER_WARNINGS):
                typer.echo(f"warning: {' '.join(str(message).split())}", err=True)
            else:
                previous(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def _usage_line(err: typer.TyperException) -> str:
    text = " ".join(err.format_message().split())
    ctx = getattr(err, "ctx", None)
    if ctx is not None:
        text += f" (see `{ctx.command_path} --help`)"
    return text


class BankGroup(typer.core.TyperGroup):
    """The command group: a user error raised by any subcommand becomes one line and an exit code, a user warning one line."""

    def invoke(self, ctx: Any) -> Any:  # a click Context (typer vendors click privately)
        try:
            with warnings_as_lines():
                return super().invoke(ctx)
        except (WeightbankError, OSError, ValueError) as err:
            if os.environ.get("WEIGHTBANK_DEBUG") or isinstance(err, BrokenPipeError):
                raise
            typer.echo(f"error: {describe(err)}", err=True)
            raise typer.Exit(exit_code(err)) from None
        except typer.TyperException as err:
            # Typer shows the help screen for a bare command; that is not an error line.
            if type(err).__name__ == "NoArgsIsHelpError":
                raise
            typer.echo(f"error: {_usage_line(err)}", err=True)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            typer.echo("error: interrupted", err=True)
            raise typer.Exit(INTERRUPTED) from None
