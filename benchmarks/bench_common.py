"""Shared by the benchmark scripts: file helpers, and each script's own section of benchmarks/RESULTS.md."""

from __future__ import annotations

import argparse
import contextlib
import os
from pathlib import Path


def files_under(path: Path) -> list[Path]:
    """``path`` itself if it is a file, else every file below it."""
    if path.is_file():
        return [path]
    return [Path(d) / f for d, _, fs in os.walk(path) for f in fs]


def tree_bytes(path: Path) -> int:
    """Bytes of every file under ``path`` (files vanishing meanwhile are skipped)."""
    total = 0
    for p in files_under(path):
        with contextlib.suppress(FileNotFoundError):
            total += p.stat().st_size
    return total


def fsync_file_and_dir(path: Path) -> None:
    """Make a peer's freshly written file durable the way weightbank makes its own: file, then directory."""
    for target, flags in ((path, os.O_RDONLY), (path.parent, os.O_RDONLY | os.O_DIRECTORY)):
        fd = os.open(target, flags)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def print_outcome(table: str, misses: list[str], what: str) -> None:
    """Print a benchmark's table, then each missed ``what`` (e.g. "target") or that all were met."""
    print(table)
    print()
    if misses:
        print(f"MISSED {len(misses)} {what}(s):")
        for m in misses:
            print(f"  - {m}")
    else:
        print(f"All {what}s met.")


def write_section(path: Path, section: str, begin: str, end: str) -> None:
    """Replace the text between ``begin`` and ``end`` in ``path`` (or append it), keeping other sections."""
    text = path.read_text() if path.exists() else "# weightbank benchmark results\n"
    if begin in text and end in text:
        before, rest = text.split(begin, 1)
        after = rest.split(end, 1)[1].lstrip("\n")
        text = before + section + ("\n" + after if after else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    path.write_text(text)


def settle_args(args: argparse.Namespace, *, repeats: int, results: Path) -> argparse.Namespace:
    """Fill the defaults a ``--quick`` smoke run changes: repeats, layers (2 / 24), warm-up, results file."""
    args.repeats = args.repeats or (1 if args.quick else repeats)
    args.layers = args.layers or (2 if args.quick else 24)
    args.warmup = not args.quick
    if args.results is None and not args.quick:
        args.results = results
    return args
