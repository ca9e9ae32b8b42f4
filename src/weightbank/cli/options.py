"""Parsing the CLI's option values that are more than a plain string or number.

Each parser raises :class:`typer.BadParameter` naming the option, so a bad value
ends the command with one ``error:`` line and exit code 2.

Example:
    >>> from weightbank.cli.options import parse_duration, parse_keep_best, parse_metrics
    >>> parse_duration("7d"), parse_keep_best("val_loss:3:max"), parse_metrics(["loss=0.5", "tag=a"])
    (604800.0, ('val_loss', 3, 'max'), {'loss': 0.5, 'tag': 'a'})
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer

__all__ = ["parse_config", "parse_duration", "parse_keep_best", "parse_metrics"]

_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([smhdw]?)\s*$")


def parse_duration(text: str, option: str = "--older-than") -> float:
    """Seconds in ``"90"``, ``"90s"``, ``"15m"``, ``"2h"``, ``"7d"`` or ``"1w"``."""
    m = _DURATION.match(text)
    if not m:
        raise typer.BadParameter(
            f"expected a duration such as 90s, 15m, 2h, 7d or 1w, not {text!r}", param_hint=f"'{option}'"
        )
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_keep_best(text: str) -> tuple[str, int, str]:
    """``"val_loss:3"`` → ``("val_loss", 3, "min")``; a trailing ``:max`` keeps the highest."""
    parts = text.split(":")
    mode = "min"
    if len(parts) == 3 and parts[2] in ("min", "max"):
        mode = parts.pop()
    if len(parts) != 2 or not parts[0] or not parts[1].isdigit() or int(parts[1]) < 1:
        raise typer.BadParameter(
            f"expected METRIC:K[:max] with K >= 1 (e.g. val_loss:3), not {text!r}", param_hint="'--keep-best'"
        )
    return parts[0], int(parts[1]), mode


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_metrics(items: Sequence[str]) -> dict[str, Any]:
    """``["loss=0.5", "note=ok"]`` → ``{"loss": 0.5, "note": "ok"}`` (values parsed as JSON when they can be)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"expected KEY=VALUE, not {item!r}", param_hint="'--metric'")
        out[key.strip()] = _value(value.strip())
    return out


def parse_config(config_json: str | None, config_file: Path | None) -> dict[str, Any] | None:
    """The config given as inline JSON (``--config-json``) or a JSON file (``--config``), if any."""
    if config_json is not None and config_file is not None:
        raise typer.BadParameter("give --config-json or --config, not both", param_hint="'--config'")
    if config_json is None and config_file is None:
        return None
    if config_file is not None:
        source, text = "--config", config_file.read_text(encoding="utf-8")
    else:
        source, text = "--config-json", str(config_json)
    try:
        value = json.loads(text)
    except ValueError as e:
        raise typer.BadParameter(f"not valid JSON ({e})", param_hint=f"'{source}'") from None
    if not isinstance(value, dict):
        raise typer.BadParameter("the config must be a JSON object", param_hint=f"'{source}'")
    return value
