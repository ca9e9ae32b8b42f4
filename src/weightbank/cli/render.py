"""Turning bank results into terminal output: human sizes, short ids, rich tables, and JSON.

Every function here takes results the library returned and builds a rich
renderable (or a string); nothing here talks to a bank. User-provided text
(messages, tag names, metric keys) is never read as rich markup.

Example:
    >>> from weightbank.cli.render import human_bytes, fmt_metrics
    >>> human_bytes(1536), human_bytes(3 << 30), fmt_metrics({"loss": 0.123456, "epoch": 2})
    ('1.5 KiB', '3.0 GiB', 'epoch=2 loss=0.1235')
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from rich import box
from rich.console import Console, Group, RenderableType
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from ..bank.bank import CheckpointDetail
from ..bank.results import (
    CheckpointInfo,
    DiffResult,
    DuReport,
    GcReport,
    PruneReport,
    RunEvent,
    SaveResult,
    TagEvent,
    TagInfo,
    VerifyReport,
)
from .graph import layout

__all__ = [
    "busy",
    "checkpoint_table",
    "detail_view",
    "diff_view",
    "du_view",
    "fmt_metrics",
    "fmt_value",
    "gc_view",
    "graph_view",
    "history_table",
    "human_bytes",
    "jsonable",
    "label",
    "make_console",
    "prune_view",
    "saved_line",
    "short",
    "tag_event_line",
    "tags_table",
    "to_json",
    "verify_view",
    "when",
]

ID = "yellow"
TAG = "bold green"
RUN = "cyan"
BAD = "bold red"
GOOD = "green"
DIM = "dim"
SHORT = 12


# -- plain formatting ----------------------------------------------------------------
def human_bytes(n: int | float) -> str:
    """``1536`` → ``'1.5 KiB'`` (binary units; whole bytes below 1 KiB).

    Example:
        >>> human_bytes(512), human_bytes(7 * 2**20)
        ('512 B', '7.0 MiB')
    """
    value = float(n)
    if abs(value) < 1024:
        return f"{int(value)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")  # pragma: no cover


def short(cid: str | None) -> str:
    """The first 12 characters of a checkpoint id (``'-'`` for none).

    Example:
        >>> short("3f2a9c1b0d4e5f6a7b8c"), short(None)
        ('3f2a9c1b0d4e', '-')
    """
    return cid[:SHORT] if cid else "-"


def when(ts: float) -> str:
    """A timestamp in local time, to the second."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def fmt_value(v: Any) -> str:
    """A metric or config value, compactly: floats to 4 significant digits."""
    if isinstance(v, bool) or v is None:
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(jsonable(v), separators=(",", ":"))
    return str(v)


def fmt_metrics(metrics: Mapping[str, Any]) -> str:
    """``{"loss": 0.5}`` → ``'loss=0.5'``, keys sorted."""
    return " ".join(f"{k}={fmt_value(v)}" for k, v in sorted(metrics.items()))


def label(info: CheckpointInfo) -> str:
    """``run@step`` (or just ``run`` for a checkpoint saved without a step)."""
    return f"{info.run}@{info.step}" if info.step is not None else info.run


# -- JSON --------------------------------------------------------------------------
def jsonable(obj: Any) -> Any:
    """Plain JSON data for a result: dataclasses become dicts (with their properties), tuples lists.

    Non-finite floats become the strings ``"nan"``, ``"inf"`` and ``"-inf"`` so the
    output stays strict JSON.

    Example:
        >>> from weightbank import SaveStats
        >>> jsonable(SaveStats(10, 30, 1, 3, 1, 0.5))["dedup_ratio"], jsonable((1, float("nan")))
        (0.75, [1, 'nan'])
    """
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = {f.name: jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
        for name, attr in vars(type(obj)).items():
            if isinstance(attr, property):
                out[name] = jsonable(getattr(obj, name))
        return out
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return "nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf")
    return obj


def to_json(obj: Any) -> str:
    """``jsonable(obj)`` as indented strict JSON."""
    return json.dumps(jsonable(obj), indent=2, allow_nan=False)


# -- consoles and progress -----------------------------------------------------------
def make_console(*, stderr: bool = False) -> Console:
    """A console that never reads user text as markup; wide (120 columns) when not a terminal."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or "COLUMNS" in os.environ else 120
    return Console(stderr=stderr, markup=False, highlight=False, width=width)


@contextlib.contextmanager
def busy(description: str) -> Iterator[None]:
    """A spinner with elapsed time on stderr while slow work runs (only on a terminal)."""
    console = make_console(stderr=True)
    progress = Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    with progress:
        progress.add_task(description, total=None)
        yield


def _table(*columns: str, right: Sequence[str] = ()) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, header_style="bold")
    for col in columns:
        table.add_column(col, justify="right" if col in right else "left", overflow="fold")
    return table


def _tags(tags: Sequence[str]) -> Text:
    return Text(", ".join(tags), style=TAG)


# -- checkpoints ---------------------------------------------------------------------
def checkpoint_table(infos: Sequence[CheckpointInfo]) -> Table:
    """``log``: one row per checkpoint, tags next to the id."""
    table = _table("ID", "TAGS", "CHECKPOINT", "CREATED", "SIZE", "METRICS", "MESSAGE", right=("SIZE",))
    for c in infos:
        table.add_row(
            Text(c.short_id, style=ID),
            _tags(c.tags),
            Text(label(c), style=RUN),
            when(c.created),
            human_bytes(c.nbytes),
            fmt_metrics(c.metrics),
            c.message,
        )
    return table


def events_table(events: Sequence[RunEvent]) -> Table:
    """Run events (automatic rollbacks, preemptions...), as ``log`` shows them under the checkpoints."""
    table = _table("WHEN", "RUN", "STEP", "EVENT", "CHECKPOINT", "DETAILS", right=("STEP",))
    for e in events:
        table.add_row(
            when(e.at),
            Text(e.run, style=RUN),
            "" if e.step is None else str(e.step),
            Text(e.kind, style="bold yellow"),
            Text(short(e.checkpoint), style=ID),
            ", ".join(f"{k}={fmt_value(v)}" for k, v in e.data.items()),
        )
    return table


def graph_view(infos: Sequence[CheckpointInfo]) -> Text:
    """``log --graph``: the lineage, newest first; a parent in another run is named."""
    by_id = {c.id: c for c in infos}
    rows = layout([(c.id, c.parent, c.created) for c in infos])
    width = max((len(prefix) for prefix, _ in rows), default=0)
    out = Text()
    for i, (prefix, cid) in enumerate(rows):
        if i:
            out.append("\n")
        out.append(prefix.ljust(width), style="magenta")
        if cid is None:
            continue
        c = by_id[cid]
        out.append("  ")
        out.append(c.short_id, style=ID)
        out.append("  ")
        out.append(label(c), style=RUN)
        if c.tags:
            out.append("  (")
            out.append(", ".join(c.tags), style=TAG)
            out.append(")")
        parent = by_id.get(c.parent) if c.parent else None
        if c.parent and (parent is None or parent.run != c.run):
            out.append(f"  ← from {label(parent) if parent else short(c.parent)}", style=DIM)
        if c.metrics:
            out.append("  " + fmt_metrics(c.metrics))
        if c.message:
            out.append("  " + c.message, style=DIM)
    return out


def saved_line(info: CheckpointInfo) -> Text:
    """One line for a new checkpoint: id, name, tags and what the save wrote."""
    out = Text("saved ")
    out.append(info.short_id, style=ID)
    out.append(" ")
    out.append(label(info), style=RUN)
    if info.tags:
        out.append(" (")
        out.append(", ".join(info.tags), style=TAG)
        out.append(")")
    out.append(f"  {info.n_tensors} tensors, {human_bytes(info.nbytes)}")
    stats = info.save_stats if isinstance(info, SaveResult) else None
    if stats is not None:
        out.append(
            f"; wrote {human_bytes(stats.written_bytes)}, reused {human_bytes(stats.reused_bytes)}"
            f" ({stats.dedup_ratio:.0%} deduplicated)"
        )
    return out


def _kv(rows: Sequence[tuple[str, RenderableType]]) -> Table:
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column()
    for key, value in rows:
        grid.add_row(key, value)
    return grid


def _section(title: str, rows: Mapping[str, Any]) -> list[RenderableType]:
    if not rows:
        return []
    return [Text(""), Text(title, style="bold underline"), _kv([(k, fmt_value(v)) for k, v in rows.items()])]


def detail_view(detail: CheckpointDetail, parent_label: str | None = None) -> Group:
    """``show``: metadata, metrics, config, env and the per-tensor table."""
    c = detail.info
    parent: RenderableType = "-"
    if c.parent:
        parent = Text(short(c.parent), style=ID)
        if parent_label:
            parent.append(f" ({parent_label})", style=RUN)
    head = [
        ("checkpoint", Text(c.id, style=ID)),
        ("name", Text(label(c), style=RUN)),
        ("tags", _tags(c.tags) if c.tags else Text("-")),
        ("parent", parent),
        ("created", when(c.created)),
        ("message", c.message or "-"),
        (
            "size",
            f"{human_bytes(c.nbytes)} logical, {human_bytes(c.stored_bytes)} stored, "
            f"{c.n_tensors} tensors in {len(detail.packs)} pack(s)",
        ),
    ]
    if c.is_lossy:
        worst = max((float(v.get("rel_err", 0.0)) for v in c.lossy.values()), default=0.0)
        codecs = ", ".join(sorted({str(v.get("codec", "?")) for v in c.lossy.values()}))
        head.append(
            (
                "LOSSY",
                Text(
                    f"{len(c.lossy)} tensor(s) quantized ({codecs}); worst relative error {worst:.3g}",
                    style="bold red",
                ),
            )
        )
    parts: list[RenderableType] = [_kv(head)]
    parts += _section("metrics", dict(sorted(c.metrics.items())))
    parts += _section("config", c.config)
    parts += _section("meta", c.meta)
    parts += _section("env", c.env)
    table = _table("TENSOR", "DTYPE", "SHAPE", "BYTES", "STORED", "CHUNKS", "CODECS", "ALIAS OF",
                   right=("BYTES", "STORED", "CHUNKS"))  # fmt: skip
    for t in detail.tensors:
        table.add_row(
            t.name,
            t.dtype,
            "×".join(str(d) for d in t.shape) or "scalar",
            human_bytes(t.nbytes),
            human_bytes(t.stored_bytes),
            str(t.chunks),
            ",".join(t.codecs),
            t.alias_of or "",
        )
    parts += [Text(""), table]
    return Group(*parts)


# -- diff ----------------------------------------------------------------------------
def diff_view(
    result: DiffResult, *, show_all: bool = False, labels: Mapping[str, str] | None = None
) -> Group:
    """``diff``: per-tensor changes (unchanged rows only with ``show_all``), metric changes, totals."""
    labels = labels or {}

    def name(cid: str) -> str:
        return f"{short(cid)} ({labels[cid]})" if cid in labels else short(cid)

    counts = {s: len(result.by_status(s)) for s in ("changed", "same", "added", "removed", "retyped")}
    share = result.differing_bytes / result.total_bytes if result.total_bytes else 0.0
    summary = Text(f"{name(result.a)} → {name(result.b)}: ")
    summary.append(", ".join(f"{n} {s}" for s, n in counts.items() if n) or "no tensors")
    summary.append(
        f" · {human_bytes(result.differing_bytes)} of {human_bytes(result.total_bytes)} differ ({share:.0%})"
    )
    parts: list[RenderableType] = [summary]
    rows = [t for t in result.tensors if show_all or t.status != "same"]
    if rows:
        table = _table("TENSOR", "STATUS", "DTYPE", "SHAPE", "MAX |Δ|", "REL L2", "BYTES DIFFERING",
                       right=("MAX |Δ|", "REL L2", "BYTES DIFFERING"))  # fmt: skip
        styles = {"same": DIM, "changed": "yellow", "added": GOOD, "removed": BAD, "retyped": BAD}
        for t in rows:
            table.add_row(
                t.name,
                Text(t.status, style=styles[t.status]),
                t.dtype,
                "×".join(str(d) for d in t.shape) or "scalar",
                "" if t.max_abs is None else f"{t.max_abs:.3g}",
                "" if t.rel_l2 is None else f"{t.rel_l2:.3g}",
                human_bytes(t.differing_bytes) if t.differing_bytes else "",
            )
        parts += [Text(""), table]
    hidden = counts["same"] if not show_all else 0
    if hidden:
        parts.append(Text(f"{hidden} unchanged tensor(s) not shown (--all shows them)", style=DIM))
    if result.metrics:
        parts += [Text(""), Text("metrics", style="bold underline")]
        parts.append(_kv([(k, f"{fmt_value(a)} → {fmt_value(b)}") for k, (a, b) in result.metrics.items()]))
    return Group(*parts)


# -- tags ----------------------------------------------------------------------------
def tags_table(tags: Sequence[TagInfo], infos: Mapping[str, CheckpointInfo]) -> Table:
    """``tags``: each live tag, its target and when it last moved."""
    table = _table("TAG", "TARGET", "CHECKPOINT", "UPDATED", "CHANGES", right=("CHANGES",))
    for t in tags:
        info = infos.get(t.target) if t.target else None
        if t.problem:
            where = Text(f"(damaged record: {t.problem}; see `weightbank verify`)", style=BAD)
        else:
            where = Text(label(info), style=RUN) if info else Text("(missing)", style=BAD)
        table.add_row(
            Text(t.name, style=TAG),
            Text(short(t.target), style=ID),
            where,
            when(t.updated),
            str(t.events),
        )
    return table


def history_table(events: Sequence[TagEvent]) -> Table:
    """``tags --history``: every change of the tags, oldest first."""
    table = _table("WHEN", "TAG", "ACTION", "FROM", "TO", "BY", "WHY")
    for e in events:
        table.add_row(
            when(e.at),
            Text(e.tag, style=TAG),
            e.action,
            Text(short(e.old), style=ID),
            Text(short(e.new), style=ID),
            e.by,
            e.why,
        )
    return table


def tag_event_line(event: TagEvent) -> Text:
    """``tag``/``untag``/``rollback``: what moved where."""
    out = Text()
    out.append(event.tag, style=TAG)
    out.append(": ")
    out.append(short(event.old), style=ID)
    out.append(" → ")
    out.append(short(event.new), style=ID)
    out.append(f"  ({event.action})", style=DIM)
    return out


# -- maintenance ---------------------------------------------------------------------
def du_view(report: DuReport) -> Table:
    """``du``: logical vs unique vs stored bytes, the dedup ratio and bytes per codec."""
    rows: list[tuple[str, RenderableType]] = [
        ("checkpoints", str(report.checkpoints)),
        ("logical", f"{human_bytes(report.logical_bytes)}  (sum of every checkpoint's tensors)"),
        ("unique", f"{human_bytes(report.unique_bytes)}  (distinct chunks, before compression)"),
        ("stored", f"{human_bytes(report.stored_bytes)}  (distinct chunks as stored)"),
        ("packs", human_bytes(report.pack_bytes)),
        ("manifests", human_bytes(report.manifest_bytes)),
        ("orphaned", f"{human_bytes(report.orphan_bytes)}  (unreferenced; `gc` removes it)"),
        ("dedup ratio", f"{report.dedup_ratio:.2f}×  (logical / unique)"),
        ("overall", f"{report.ratio:.2f}×  (logical / bytes on storage)"),
    ]
    rows += [(f"codec {k}", human_bytes(v)) for k, v in sorted(report.per_codec.items())]
    return _kv(rows)


def verify_view(report: VerifyReport) -> Group:
    """``verify``: a verdict line and one row per problem."""
    head = Text()
    if report.ok:
        head.append("ok", style=GOOD)
    else:
        head.append("FAILED", style=BAD)
    head.append(
        f": {report.checkpoints} checkpoint(s), {report.chunks} chunk(s), "
        f"{human_bytes(report.bytes_checked)} checked"
    )
    parts: list[RenderableType] = [head]
    if report.problems:
        table = _table("KIND", "OBJECT", "CHECKPOINT", "TENSOR", "DETAIL")
        for p in report.problems:
            table.add_row(
                Text(p.kind, style=DIM if p.kind == "orphan" else BAD),
                p.key,
                Text(short(p.checkpoint) if p.checkpoint else "", style=ID),
                p.tensor,
                p.detail,
            )
        parts += [Text(""), table]
    return Group(*parts)


def gc_view(report: GcReport) -> Text:
    """``gc``: what was (or would be) removed and why some was kept."""
    verb = "would remove" if report.dry_run else "removed"
    out = Text(
        f"{verb} {len(report.packs_deleted)} pack(s), {human_bytes(report.bytes_freed)}"
        f"; {report.trash_dropped} trash entr{'y' if report.trash_dropped == 1 else 'ies'}"
        f", {report.leases_dropped} stale lease(s)"
    )
    if report.packs_kept_for_inflight:
        out.append(f"; kept {report.packs_kept_for_inflight} pack(s) of saves in flight")
    if report.index_pages_deleted:
        out.append(f"; {report.index_pages_deleted} old catalog index page(s)")
    return out


def prune_view(report: PruneReport, infos: Mapping[str, CheckpointInfo]) -> Group:
    """``prune``: the checkpoints deleted (or that would be) and the bytes that frees."""
    parts: list[RenderableType] = []
    if report.deleted:
        table = _table("ID", "CHECKPOINT", "CREATED", "METRICS")
        for cid in report.deleted:
            info = infos.get(cid)
            table.add_row(
                Text(short(cid), style=ID),
                Text(label(info), style=RUN) if info else "",
                when(info.created) if info else "",
                fmt_metrics(info.metrics) if info else "",
            )
        parts += [table, Text("")]
    n = len(report.deleted)
    freed = human_bytes(report.bytes_freed)
    if report.dry_run:
        line = Text(f"dry run: would delete {n} checkpoint(s), keep {len(report.kept)}, free up to {freed}")
        if n:
            line.append("; run again with --yes to delete them", style="bold")
    else:
        line = Text(
            f"deleted {n} checkpoint(s), kept {len(report.kept)}; `weightbank gc` reclaims up to {freed}"
            " once the grace period has passed"
        )
    parts.append(line)
    return Group(*parts)
