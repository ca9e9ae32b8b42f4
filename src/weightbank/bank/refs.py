"""Parsing and resolving refs: the names a user gives checkpoints.

::

    <id> | <id prefix, >= 6 hex chars>   a checkpoint by content hash
    <tag>                                a tag's current target
    <tag>@{N}                            the tag's N-th previous target (what rollback N restores)
    <run>@<step>                         the run's checkpoint at that step, never a rollback's
                                         re-save of it (saved twice otherwise: the newer)
    <run>@latest                         the run's newest checkpoint
    <run>@best:<metric>[:min|:max]       the run's checkpoint with the lowest (or highest) finite
                                         metric, the newest on ties
    <ref>~N, <ref>~                      the N-th (first) parent of ref; suffixes add up

A full id always names its checkpoint. Tag and run names that read as an id
prefix (6+ lowercase hex characters) are refused when created; a tag made
before that rule that also matches an id prefix is ambiguous (AmbiguousRef),
never silently the tag. An unknown ref raises
CheckpointNotFound with close matches; a prefix matching several ids raises
AmbiguousRef listing them.

Example:
    >>> from weightbank.bank.refs import parse
    >>> parse("tts@best:val_loss:max~2")
    ('tts@best:val_loss:max', 2)
"""

from __future__ import annotations

import difflib
import re

from ..errors import AmbiguousRef, CheckpointNotFound, InvalidRef, TagNotFound
from ..format.hashing import MIN_PREFIX, is_digest
from .catalog import Catalog
from .layout import check_name
from .tags import TagStore

__all__ = ["parse", "resolve"]

_SUFFIX = re.compile(r"~(\d*)$")
_TAG_HIST = re.compile(r"^(?P<tag>[^@]+)@\{(?P<n>\d+)\}$")
_BEST = re.compile(r"^best:(?P<metric>[^:]+)(?::(?P<mode>min|max))?$")
_HEX = re.compile(r"^[0-9a-f]+$")


def parse(ref: str) -> tuple[str, int]:
    """Split ``ref`` into its base and the total number of ``~`` parent steps."""
    if not isinstance(ref, str) or not ref.strip():
        raise InvalidRef(str(ref), "empty ref")
    if any(ord(c) < 32 for c in ref):
        raise InvalidRef(ref, "contains control characters")
    base, up = ref, 0
    while True:
        m = _SUFFIX.search(base)
        if not m:
            break
        up += int(m.group(1)) if m.group(1) else 1
        base = base[: m.start()]
    if not base:
        raise InvalidRef(ref, "nothing before '~'")
    return base, up


def _suggest(word: str, catalog: Catalog, tags: TagStore) -> list[str]:
    runs = catalog.run_names()
    candidates = list(tags.names()) + list(runs) + [f"{r}@latest" for r in runs]
    return difflib.get_close_matches(word, candidates, n=3, cutoff=0.6)


def _resolve_run(base: str, ref: str, catalog: Catalog, tags: TagStore) -> str:
    """``<run>@latest``, ``<run>@<step>`` or ``<run>@best:<metric>[:min|:max]``.

    ``<run>@<step>``: the newest checkpoint of the run at that step that is
    not a *re-save* of another one. A re-save records the checkpoint it saves
    again in its meta (``"resave_of": <id>``, naming a checkpoint of the run
    at the same step) — the training manager's rollback writes one: the
    restored state again, metric-less, at the step it restored. So after a
    rollback ``run@step`` is the original (the one with the step's metrics);
    the copy stays reachable by id, ``run@latest`` and ``log``. A rollback
    copy written before that mark existed (meta ``"trigger": "rollback"``
    and no ``resave_of``) counts as a re-save of its parent when the parent
    is a checkpoint of the run at the same step — what the older manager
    recorded. Checkpoints saved twice at one step without either mark
    resolve to the newer one; if only re-saves are left (the original
    deleted), to the newest of them.

    ``<run>@best:<metric>`` ranks with the retention engine
    (:func:`weightbank.bank.retention.best_first`): finite values only, the
    newest checkpoint on ties — the one ``BestN(metric, 1)`` keeps.

    All three read the catalog index (the run's newest record, the pages
    holding the step, the pages whose metric range can hold the best), never
    the run's manifests.
    """
    run, _, what = base.partition("@")
    check_name("run", run) if run else None
    if not run or not what:
        raise InvalidRef(ref, "expected <run>@<step>, <run>@latest or <run>@best:<metric>")
    view = catalog.view()
    latest = view.latest(run)
    if latest is None:
        raise CheckpointNotFound(ref, _suggest(run, catalog, tags), detail=f"no run {run!r}")
    if what == "latest":
        return latest.id
    if what.isdigit():
        step = int(what)
        at = view.at_step(run, step)
        if not at:
            near = sorted(view.steps(run), key=lambda s: abs(s - step))[:3]
            raise CheckpointNotFound(
                ref, [f"{run}@{s}" for s in near], detail=f"run {run!r} has no step {step}"
            )
        here = {r.id for r in at}
        resaves: set[str] = set()
        for r in at:
            meta = r.decoded_meta()
            of = meta.get("resave_of")
            if of is None and meta.get("trigger") == "rollback":
                of = r.parent  # an older manager's rollback copy: its parent is what it re-saved
            if isinstance(of, str) and of in here:
                resaves.add(r.id)
        return ([r.id for r in at if r.id not in resaves] or [r.id for r in at])[-1]
    best = _BEST.match(what)
    if best:
        metric, mode = best.group("metric"), best.group("mode") or "min"
        found = view.best(run, metric, "max" if mode == "max" else "min")
        if found is None:
            raise CheckpointNotFound(ref, detail=f"no checkpoint of run {run!r} has metric {metric!r}")
        return found.id
    raise InvalidRef(
        ref, f"unknown selector {what!r} after '@' (use a step, latest, best:<metric>, or {{N}})"
    )


def _id_matches(base: str, catalog: Catalog) -> list[str]:
    """Every committed (or unreadable) checkpoint id starting with ``base``."""
    if is_digest(base):
        # A full id: its manifest decides (no index page needed), and a damaged one still names it.
        return [base] if base in catalog.broken or catalog.exists(base) else []
    return sorted({*catalog.view().match(base), *(i for i in catalog.broken if i.startswith(base))})


def _resolve_base(base: str, ref: str, catalog: Catalog, tags: TagStore) -> str:
    hist = _TAG_HIST.match(base)
    if hist:
        target = tags.previous(check_name("tag", hist.group("tag")), int(hist.group("n")))
        return _existing(target, ref, catalog, "tag's earlier target")
    if "@" in base:
        return _resolve_run(base, ref, catalog, tags)
    id_like = bool(_HEX.match(base)) and len(base) >= MIN_PREFIX
    # A full id names its checkpoint whatever tags exist: a tag can never shadow it.
    matches = _id_matches(base, catalog) if id_like else []
    if is_digest(base) and base in matches:
        return base
    try:
        check_name("tag", base)
        is_name = True
    except ValueError:
        is_name = False
    if is_name:
        rec, _ = tags.read(base)
        if rec is not None:
            if rec.target is None:
                if matches:
                    return _one_id(base, matches)
                raise TagNotFound(
                    base, [f"(tag {base!r} was removed; `weightbank rollback {base}` restores it)"]
                )
            if matches:
                # Names that read as id prefixes are refused now; one made before that rule and
                # an id prefix it also matches is ambiguous, never silently the tag.
                raise AmbiguousRef(base, [f"tag:{base}->{rec.target[:12]}", *matches])
            return _existing(rec.target, ref, catalog, "tag's target")
    if _HEX.match(base):
        if len(base) < MIN_PREFIX:
            raise InvalidRef(ref, f"an id prefix needs at least {MIN_PREFIX} hex characters")
        if matches:
            return _one_id(base, matches)
    raise CheckpointNotFound(ref, _suggest(base, catalog, tags))


def _existing(cid: str, ref: str, catalog: Catalog, what: str) -> str:
    """``cid`` if its checkpoint exists (a tag record may name one since deleted)."""
    if cid in catalog.broken:
        return cid  # exists, unreadable: loading it reports the damage
    # Asked of storage each time (one small request): a cached manifest proves nothing once
    # another process may have deleted the checkpoint.
    if not catalog.exists(cid):
        catalog.evict(cid)
        raise CheckpointNotFound(ref, detail=f"its {what} {cid[:12]} was deleted")
    return cid


def _one_id(base: str, matches: list[str]) -> str:
    if len(matches) > 1:
        raise AmbiguousRef(base, matches)
    return matches[0]


def resolve(ref: str, catalog: Catalog, tags: TagStore) -> str:
    """The full checkpoint id ``ref`` names (see the module docstring for the grammar)."""
    base, up = parse(ref)
    cid = _resolve_base(base, ref, catalog, tags)
    for i in range(up):
        rec = catalog.record(cid)
        parent = rec.parent if rec is not None else catalog.get(cid).parent
        if parent is not None and catalog.record(parent) is None and parent not in catalog.broken:
            raise CheckpointNotFound(ref, detail=f"{parent[:12]}, {i + 1} of {up} steps up, was deleted")
        if parent is None:
            raise CheckpointNotFound(ref, detail=f"{cid[:12]} has no parent ({i} of {up} steps up)")
        cid = parent
    return cid
