"""Frozen result types returned by the bank: named fields, never loose dicts.

Example:
    >>> from weightbank.bank.results import SaveStats
    >>> SaveStats(written_bytes=10, reused_bytes=90, new_chunks=1, reused_chunks=9, packs=1, seconds=0.1).dedup_ratio
    0.9
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "CheckpointDetail",
    "CheckpointInfo",
    "CopyReport",
    "DiffResult",
    "DuReport",
    "GcReport",
    "LoadResult",
    "PrefetchReport",
    "PruneReport",
    "RekeyReport",
    "RepackReport",
    "RunEvent",
    "SaveResult",
    "SaveStats",
    "TagEvent",
    "TagInfo",
    "TensorDiff",
    "TensorInfo",
    "VerifyProblem",
    "VerifyReport",
]


@dataclass(frozen=True)
class SaveStats:
    """What one save wrote: new bytes vs bytes it found already in the bank."""

    written_bytes: int
    reused_bytes: int
    new_chunks: int
    reused_chunks: int
    packs: int
    seconds: float
    manifest_bytes: int = 0
    per_codec: dict[str, int] = field(default_factory=dict)
    """Bytes written per codec (new chunks only)."""

    @property
    def dedup_ratio(self) -> float:
        total = self.written_bytes + self.reused_bytes
        return self.reused_bytes / total if total else 1.0


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint, as ``show`` lists it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    chunks: int
    stored_bytes: int
    alias_of: str | None = None
    codecs: tuple[str, ...] = ()
    content_key: str = ""
    lossy: dict[str, Any] = field(default_factory=dict)
    """For a quantized tensor: ``codec``, measured ``max_abs`` and ``rel_err``; empty if lossless."""

    @property
    def ratio(self) -> float:
        """Logical bytes per stored byte of this tensor's own chunks (delta bases not counted)."""
        return self.nbytes / self.stored_bytes if self.stored_bytes else 1.0


@dataclass(frozen=True)
class CheckpointInfo:
    """A checkpoint's identity and metadata (no tensor data)."""

    id: str
    run: str
    step: int | None
    parent: str | None
    created: float
    message: str
    metrics: dict[str, Any]
    config: dict[str, Any]
    meta: dict[str, Any]
    env: dict[str, Any]
    nbytes: int
    stored_bytes: int
    n_tensors: int
    tags: tuple[str, ...] = ()
    lossy: dict[str, Any] = field(default_factory=dict)
    """Tensor name → {codec, max_abs, rel_err} for each quantized tensor; empty if bit-exact."""

    @property
    def short_id(self) -> str:
        return self.id[:12]

    @property
    def is_lossy(self) -> bool:
        """Whether loading this checkpoint returns approximations of what was saved."""
        return bool(self.lossy)


@dataclass(frozen=True)
class SaveResult(CheckpointInfo):
    """What ``save`` (and ``commit``) return: the new checkpoint's info and what the save wrote.

    Example:
        >>> import torch, weightbank as wb
        >>> wb.open("memory://").save({"w": torch.ones(4)}).save_stats.written_bytes
        16
    """

    save_stats: SaveStats = field(default_factory=lambda: SaveStats(0, 0, 0, 0, 0, 0.0))


@dataclass(frozen=True)
class CheckpointDetail:
    """``show``: a checkpoint's info plus its per-tensor table."""

    info: CheckpointInfo
    tensors: tuple[TensorInfo, ...]
    packs: tuple[str, ...]


@dataclass(frozen=True)
class LoadResult:
    """What ``load(..., into=module)`` did."""

    checkpoint: CheckpointInfo
    loaded: tuple[str, ...]
    skipped: tuple[str, ...] = ()
    seconds: float = 0.0


@dataclass(frozen=True)
class TagEvent:
    """One change of a tag: when, who, from which target to which, and why."""

    tag: str
    action: Literal["set", "untag", "rollback"]
    old: str | None
    new: str | None
    at: float
    by: str
    why: str = ""


@dataclass(frozen=True)
class RunEvent:
    """Something that happened in a run besides a save (e.g. an automatic rollback)."""

    run: str
    kind: str
    at: float
    by: str
    step: int | None = None
    checkpoint: str | None = None
    data: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class TagInfo:
    """A tag and its current target (None when removed, or when its record is damaged: see ``problem``)."""

    name: str
    target: str | None
    updated: float
    events: int
    problem: str = ""
    """Empty for a sound record; what is wrong with a damaged one (``weightbank verify`` reports it too)."""


@dataclass(frozen=True)
class TensorDiff:
    """How one tensor differs between two checkpoints."""

    name: str
    status: Literal["same", "changed", "added", "removed", "retyped"]
    dtype: str
    shape: tuple[int, ...]
    max_abs: float | None = None
    rel_l2: float | None = None
    differing_bytes: int = 0


@dataclass(frozen=True)
class DiffResult:
    """Per-tensor differences between checkpoint ``a`` and ``b`` and the bytes that differ."""

    a: str
    b: str
    tensors: tuple[TensorDiff, ...]
    differing_bytes: int
    total_bytes: int
    metrics: dict[str, tuple[Any, Any]] = field(default_factory=dict)

    def by_status(self, status: str) -> list[TensorDiff]:
        return [t for t in self.tensors if t.status == status]


@dataclass(frozen=True)
class VerifyProblem:
    """One thing ``verify`` found wrong."""

    kind: Literal[
        "corrupt", "missing", "manifest", "tag", "events", "trash", "lease", "release", "orphan", "index"
    ]
    key: str
    detail: str
    checkpoint: str = ""
    tensor: str = ""


@dataclass(frozen=True)
class VerifyReport:
    """Outcome of ``verify``: ok unless a problem other than orphans was found."""

    checkpoints: int
    chunks: int
    bytes_checked: int
    problems: tuple[VerifyProblem, ...]

    @property
    def ok(self) -> bool:
        return not any(p.kind != "orphan" for p in self.problems)


@dataclass(frozen=True)
class GcReport:
    """What ``gc`` removed (or would remove with ``dry_run``)."""

    packs_deleted: tuple[str, ...]
    bytes_freed: int
    trash_dropped: int
    leases_dropped: int
    packs_kept_for_inflight: int
    dry_run: bool
    incomplete_bytes_freed: int = 0
    """Bytes of writes that never committed (e.g. temp files of killed writers) swept away."""
    index_pages_deleted: int = 0
    """Catalog index pages no snapshot names any more, removed."""
    segments_deleted: int = 0
    """Manifest segments no checkpoint names any more, removed (their bytes are in ``bytes_freed``)."""


@dataclass(frozen=True)
class RepackReport:
    """What ``repack`` rewrote (or, with ``dry_run``, would rewrite).

    ``bytes_before``: the size of the packs chosen; ``bytes_copied``: their
    live bytes, copied into ``packs_written``. The old packs are freed by a
    ``gc`` once no reader can still hold their locations (see
    :mod:`weightbank.bank.releases`): ``bytes_before - bytes_copied`` is what
    that gains. ``packs_pinned``: partly live packs that could not be
    rewritten (a format-1/2 manifest uses them, or a save in flight).
    ``recoded``: checkpoints whose chunks were coded again onto a new
    keyframe (``repack(keyframe=...)``; with ``dry_run``, how many would be
    considered), ``recode_written`` the bytes those new codings took.
    """

    packs_rewritten: tuple[str, ...]
    bytes_before: int
    bytes_copied: int
    packs_written: tuple[str, ...]
    manifests_rewritten: int
    packs_pinned: int
    dry_run: bool
    seconds: float
    recoded: int = 0
    recode_written: int = 0


@dataclass(frozen=True)
class RekeyReport:
    """What ``Bank.rekey`` did: ``keyframe`` now loads with no chain; ``window`` (newest first) was re-coded.

    ``recoded``: heads rewritten; ``chunks_written`` / ``bytes_written``: the
    new codings (the keyframe's chunks and the reverse deltas behind it).
    """

    keyframe: str
    window: tuple[str, ...]
    recoded: int
    chunks_written: int
    bytes_written: int
    seconds: float


@dataclass(frozen=True)
class CopyReport:
    """What ``Bank.copy_to`` did: checkpoints copied (ids unchanged), those the destination had, tags set.

    ``bytes_copied``: stored bytes written into the destination's packs;
    ``bytes_reused``: raw bytes of chunks the destination already held;
    ``tags``: tags created (or, with ``move_tags``, moved) in the destination;
    ``tags_left``: tags the destination has on another checkpoint, left where they are;
    ``refused``: checkpoints of format 1 or 2 that cannot move (only when not named).
    """

    copied: tuple[str, ...]
    skipped: tuple[str, ...]
    bytes_copied: int
    bytes_reused: int
    tags: tuple[str, ...]
    seconds: float
    tags_left: tuple[str, ...] = ()
    refused: tuple[str, ...] = ()


@dataclass(frozen=True)
class PruneReport:
    """What ``prune`` deleted (or would delete with ``dry_run``) and the bytes that frees."""

    deleted: tuple[str, ...]
    kept: tuple[str, ...]
    bytes_freed: int
    dry_run: bool


@dataclass(frozen=True)
class PrefetchReport:
    """What ``Bank.prefetch`` did: raw (decoded) bytes of the distinct chunks it needed, by where they were."""

    checkpoint: str
    chunks: int
    fetched_bytes: int
    """Read from the bank's storage and verified now."""
    cached_bytes: int
    """Already in the local disk cache (nothing read)."""
    dropped_bytes: int = 0
    """Of ``fetched_bytes``, what the cache could not keep (full disk, unwritable directory, over its cap)."""
    enabled: bool = True
    """False when the bank has no disk cache (local and memory banks by default): nothing was done."""


@dataclass(frozen=True)
class DuReport:
    """Logical vs stored size of the bank."""

    checkpoints: int
    logical_bytes: int
    unique_bytes: int
    stored_bytes: int
    pack_bytes: int
    manifest_bytes: int
    orphan_bytes: int
    per_codec: dict[str, int] = field(default_factory=dict)
    """Stored bytes of unique chunks, per codec."""
    per_codec_raw: dict[str, int] = field(default_factory=dict)
    """Raw (decoded) bytes of those same chunks, per codec."""

    def codec_ratio(self, codec: str) -> float:
        """Raw bytes per stored byte among the chunks of ``codec``."""
        stored = self.per_codec.get(codec, 0)
        return self.per_codec_raw.get(codec, 0) / stored if stored else 1.0

    @property
    def dedup_ratio(self) -> float:
        return self.logical_bytes / self.unique_bytes if self.unique_bytes else 1.0

    @property
    def ratio(self) -> float:
        """Logical bytes per stored byte."""
        total = self.pack_bytes + self.manifest_bytes
        return self.logical_bytes / total if total else 1.0
