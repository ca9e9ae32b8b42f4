"""What the catalog-index tests check against, and how they damage an index.

* :func:`oracle` lists and reads every manifest into a
  :class:`~weightbank.bank.listing.ScanView` — the bank's truth, the way
  ``verify`` and the fallback read it — and :func:`assert_views_agree` asks an
  index :class:`~weightbank.bank.index.view.Snapshot` every question the
  catalog asks (members, newest, latest, steps, at-step, best, id prefixes,
  recent, records) and compares each answer with the oracle's.
* :func:`outcomes` resolves refs through a bank and through a listing-only
  catalog on the same storage, each to its id or its error type.
* :func:`small_pages` shrinks the page and compaction constants where the code
  reads them (the modules that import them, not only the ones that define them).
* The damage helpers break one index object the way a bad disk or a stray
  ``rm`` would; :func:`drop_ref` removes a ref on every backend;
  :func:`forget_done` empties the head's list of done entries (readers then
  read every entry and look for its manifest, as after writers that died).
* :func:`commit_copy` commits a copy of a checkpoint with other metadata the way
  a save's commit does (add entry, then manifest), and :func:`twins` finds two
  such copies whose ids share a 6-hex-character prefix (an ambiguous prefix).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterable
from typing import Any

import pytest

import weightbank as wb
from weightbank.bank.catalog import Catalog
from weightbank.bank.index.records import CatalogRecord
from weightbank.bank.index.store import Head, Root, put_root, read_head_state, read_root
from weightbank.bank.index.view import Snapshot, list_gens, list_seqs
from weightbank.bank.layout import INDEX_HEAD, INDEX_PAGES, manifest_key, page_key, root_key
from weightbank.bank.listing import ScanView, scan_manifests
from weightbank.bank.refs import resolve
from weightbank.bank.tags import TagStore
from weightbank.format.hashing import digest
from weightbank.format.manifest import FORMAT_VERSION, SHARDED_FORMAT, Manifest
from weightbank.format.sealed import seal
from weightbank.storage.base import Storage
from weightbank.storage.memory import MemoryStorage

__all__ = [
    "assert_views_agree",
    "commit_copy",
    "delete_run_page",
    "drop_ref",
    "flip_root_byte",
    "forget_done",
    "garble_ref",
    "index_snapshot",
    "missing_page_root",
    "newest_root",
    "one_document",
    "oracle",
    "outcomes",
    "pending_seqs",
    "referenced_pages",
    "scan_outcomes",
    "small_pages",
    "twins",
]


def oracle(storage: Storage) -> ScanView:
    """Every manifest in the bank, read and checked, as a listing view (the bank's truth)."""
    records: dict[str, CatalogRecord] = {}
    for cid, result in scan_manifests(storage):
        assert isinstance(result, Manifest), f"manifest {cid[:12]} is unreadable: {result}"
        records[cid] = CatalogRecord.of(cid, result)
    return ScanView(records)


def index_snapshot(bank: wb.Bank) -> Snapshot:
    """The bank's current index picture; fails if the catalog fell back to a listing."""
    bank._catalog.refresh()
    view = bank._catalog._current()  # view() wraps a snapshot in its fallback guard
    assert isinstance(view, Snapshot), f"the catalog is scanning: {bank._catalog.damage}"
    return view


def _ids(records: Iterable[CatalogRecord]) -> list[str]:
    return [r.id for r in records]


def _id(record: CatalogRecord | None) -> str | None:
    return None if record is None else record.id


def assert_views_agree(got: Any, want: ScanView, metrics: Iterable[str] = ("val",)) -> None:
    """Every catalog query answered by ``got`` (an index snapshot) equals ``want``'s (the oracle)."""
    assert got.count() == want.count(), "count"
    assert got.run_names() == want.run_names(), "run_names"
    for run in [*want.run_names(), "no-such-run"]:
        assert _ids(got.members(run)) == _ids(want.members(run)), f"members({run})"
        assert got.run_count(run) == want.run_count(run), f"run_count({run})"
        assert _ids(got.newest(run)) == _ids(want.newest(run)), f"newest({run})"
        assert _id(got.latest(run)) == _id(want.latest(run)), f"latest({run})"
        steps = want.steps(run)
        assert got.steps(run) == steps, f"steps({run})"
        for step in [*steps, max(steps, default=0) + 1]:
            assert _ids(got.at_step(run, step)) == _ids(want.at_step(run, step)), f"at_step({run}, {step})"
        for metric in [*metrics, "no-such-metric"]:
            for mode in ("min", "max"):
                assert _id(got.best(run, metric, mode)) == _id(want.best(run, metric, mode)), (
                    f"best({run}, {metric}, {mode})"
                )
    everything = sorted(want.records)
    for cid in everything:
        assert got.record(cid) == want.record(cid), f"record({cid[:12]})"
    prefixes = {c[:n] for c in everything for n in (1, 2, 3)} | {"0", "f", "00", "ff"}
    for prefix in sorted(prefixes):
        assert got.match(prefix) == want.match(prefix), f"match({prefix!r})"
    for n in sorted({0, 1, 2, 3, 5, 8, 20, 64, 65, want.count(), want.count() + 1}):
        assert _ids(got.recent(n)) == _ids(want.recent(n)), f"recent({n})"
    assert _ids(got.everything()) == _ids(want.everything()), "everything"


def outcomes(bank: wb.Bank, refs: Iterable[str]) -> dict[str, str]:
    """Each ref resolved by ``bank``: its id, or ``!ErrorType`` (what a user would see)."""
    out = {}
    for ref in refs:
        try:
            out[ref] = bank.resolve(ref)
        except wb.WeightbankError as e:
            out[ref] = f"!{type(e).__name__}"
    return out


def scan_outcomes(storage: Storage, refs: Iterable[str]) -> dict[str, str]:
    """Each ref resolved from a listing of every manifest (a catalog that never reads the index)."""
    catalog, tags = Catalog(storage, indexed=False), TagStore(storage)
    out = {}
    for ref in refs:  # one listing answers them all: nothing changes meanwhile
        try:
            out[ref] = resolve(ref, catalog, tags)
        except wb.WeightbankError as e:
            out[ref] = f"!{type(e).__name__}"
    return out


def small_pages(
    monkeypatch: pytest.MonkeyPatch, *, page: int = 4, every: int = 3, recent: int | None = None
) -> None:
    """Tiny run/id pages and a compaction every ``every`` log entries, patched where they are read.

    ``compact.py`` and ``catalog.py`` bind the constants at import
    (``from .pages import RUN_PAGE``), so patching only the defining module
    would change nothing.
    """
    from weightbank.bank import catalog
    from weightbank.bank.index import compact, pages

    for module in (pages, compact):
        monkeypatch.setattr(module, "RUN_PAGE", page)
        monkeypatch.setattr(module, "ID_PAGE", page)
        if recent is not None:
            monkeypatch.setattr(module, "RECENT", recent)
    for module in (compact, catalog):
        monkeypatch.setattr(module, "COMPACT_EVERY", every)


# -- damage --------------------------------------------------------------------------------------


def drop_ref(storage: Storage, key: str) -> None:
    """Remove a ref (a log entry or root). ``MemoryStorage.delete`` removes data objects only."""
    storage.delete(key)
    inner = getattr(storage, "inner", storage)
    if isinstance(inner, MemoryStorage):
        with inner._lock:
            inner._refs.pop(key, None)


def garble_ref(storage: Storage, key: str, data: bytes = b"\x00 not a sealed record") -> None:
    """Replace a ref's bytes (or create it) with garbage, through the ref API."""
    current = storage.get_ref(key)
    storage.put_ref(key, data, None if current is None else current.token)


def forget_done(storage: Storage) -> None:
    """Empty the head's list of done entries, as if every writer had died before marking its entry."""
    head = read_head_state(storage)
    storage.put_ref(INDEX_HEAD, seal(Head(head.seq, head.token, {}).body()), head.token)


def newest_root(storage: Storage) -> Root:
    gens = list_gens(storage)
    assert gens, "the bank has no index root yet"
    root = read_root(storage, gens[-1])
    assert root is not None
    return root


def flip_root_byte(storage: Storage) -> str:
    """Flip one byte in the middle of the newest root; its key."""
    key = root_key(newest_root(storage).gen)
    ref = storage.get_ref(key)
    assert ref is not None
    data = bytearray(ref.data)
    data[len(data) // 2] ^= 0x01
    storage.put_ref(key, bytes(data), ref.token)
    return key


def delete_run_page(storage: Storage, run: str) -> str:
    """Delete one page of ``run``'s records that the newest root names (through its run index); its key."""
    from weightbank.bank.index.pages import run_index
    from weightbank.bank.index.store import read_page

    root = newest_root(storage)
    index_key = root.runs[run][1]
    pages = run_index(read_page(storage, index_key), index_key)
    key = pages[len(pages) // 2].key
    storage.delete(key)
    return key


def missing_page_root(storage: Storage) -> str:
    """Publish a root ``gen + 1`` like the newest but naming an id directory that does not exist; that page's key."""
    root = newest_root(storage)
    key = page_key("0" * 64)
    assert key.startswith(INDEX_PAGES) and not storage.exists(key)
    assert put_root(storage, dataclasses.replace(root, gen=root.gen + 1, ids=key))
    return key


def referenced_pages(storage: Storage, gens: Iterable[int]) -> set[str]:
    """Every page the roots ``gens`` name, directly or through a directory page."""
    from weightbank.bank.index.pages import chunk_dir, id_dir, run_index
    from weightbank.bank.index.store import read_page

    out: set[str] = set()
    for gen in gens:
        root = read_root(storage, gen)
        assert root is not None
        for _, key, _ in root.runs.values():
            out |= {key, *(p.key for p in run_index(read_page(storage, key), key))}
        if root.ids is not None:
            out |= {root.ids, *(k for _, k, _ in id_dir(read_page(storage, root.ids), root.ids))}
        if root.chunks is not None:
            chunks = chunk_dir(read_page(storage, root.chunks), root.chunks)
            out |= {root.chunks, *(k for k, _ in chunks.values())}
        if root.recent is not None:
            out.add(root.recent)
    return out


def pending_seqs(storage: Storage) -> list[int]:
    """Log entries the newest root has not folded (held, or after its ``upto``)."""
    gens = list_gens(storage)
    root = read_root(storage, gens[-1]) if gens else None
    upto, held = (root.upto, set(root.held)) if root is not None else (0, set())
    return [s for s in list_seqs(storage) if s > upto or s in held]


# -- crafted commits -----------------------------------------------------------------------------


def one_document(manifest: Manifest) -> Manifest:
    """``manifest`` as a format-1/2 document (id = hash of its bytes): what crafted commits write, simply."""
    return dataclasses.replace(
        manifest, format=SHARDED_FORMAT if manifest.sharded else FORMAT_VERSION, segments=()
    )


def commit_copy(bank: wb.Bank, manifest: Manifest) -> str:
    """Commit ``manifest`` (a copy of a committed one, other metadata) as a save's commit does: entry, manifest."""
    manifest = one_document(manifest)
    data = manifest.to_bytes()
    cid = digest(data)
    entry = bank._catalog.intend(cid, manifest, [], [])
    bank.storage.write(manifest_key(cid), data)
    bank._catalog.add(cid, manifest, entry=entry)
    return cid


def twins(manifest: Manifest, run: str, limit: int = 200_000) -> tuple[Manifest, Manifest]:
    """Two copies of ``manifest`` in ``run`` (messages differ) whose ids share their first 6 hex characters.

    A birthday search over the message: about 5,000 candidates for even odds,
    so it ends within a second or two.
    """
    marker = "twin-0000000000"
    manifest = one_document(manifest)
    template = dataclasses.replace(manifest, run=run, message=marker).to_bytes()
    assert template.count(marker.encode()) == 1
    seen: dict[str, str] = {}
    for k in itertools.islice(itertools.count(), limit):
        message = f"twin-{k:010d}"
        h = digest(template.replace(marker.encode(), message.encode()))
        other = seen.setdefault(h[:6], message)
        if other != message:
            return (
                dataclasses.replace(manifest, run=run, message=other),
                dataclasses.replace(manifest, run=run, message=message),
            )
    raise AssertionError("no two ids shared a 6-character prefix")
