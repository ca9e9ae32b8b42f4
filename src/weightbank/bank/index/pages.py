"""The page shapes of a catalog snapshot, and reading them back checked.

::

    run index   {"pages": [[key, n, first, last, min_step, max_step, {metric: [min, max]}], ...]}
    run page    {"records": [record, ...]}           one run's records, oldest first (RUN_PAGE per page)
    id dir      {"pages": [[first_id, key, n], ...]}
    id page     {"ids": [[id, run, created, step], ...]}  sorted by id (ID_PAGE per page, split at twice):
                                                     where in its run's pages the record is
    chunk dir   {"buckets": {"ab": [key, n], ...},   256 buckets by the chunk hash's first byte,
                 "filters": {"ab": key, ...}}        and each bucket's Bloom filter page (optional)
    bucket      {"chunks": [[hash, owner], ...]}     the checkpoint that wrote each chunk (its manifest says where)
    filter      {"bloom": base64}                    the bucket's chunks (bloom.BUCKET_BITS bits each)
    recent      {"records": [record, ...]}           the newest RECENT records of the bank, newest first

A save looks a chunk up in its bucket only when the bucket's filter may hold
it: the chunks of a training save are new almost always, and a filter is
~1/70 of its bucket. A filter is a hint (a wrong one can only cost dedup);
one that is missing or damaged means the bucket is read. Filters live in
their own field so that readers from before them still parse the directory.

``first``/``last`` are a record's order key ``[created, step, id]``; the
per-page metric ranges let ``run@best:m`` read only the pages that can hold
the best value.

Example:
    >>> run_page_rows({"records": []})
    []
"""

from __future__ import annotations

from typing import Any

from ...errors import UnsupportedFormat
from ...format.schema import hex_digest, typed
from ..layout import INDEX_PAGES
from . import bloom
from .records import CatalogRecord
from .store import IndexDamaged

__all__ = [
    "ID_PAGE",
    "RECENT",
    "RUN_PAGE",
    "ChunkEntry",
    "IdRow",
    "RunPageInfo",
    "bucket_filter",
    "bucket_rows",
    "chunk_dir",
    "chunk_filters",
    "id_dir",
    "id_row",
    "id_rows",
    "run_index",
    "run_page_rows",
]

RUN_PAGE = 128
ID_PAGE = 256
RECENT = 64

Order = tuple[float, int, str]
ChunkEntry = tuple[str, str]
"""A chunk the bank holds: its hash and the checkpoint that wrote it."""


def _key(value: Any) -> str:
    key = typed(value, str, "page key")
    if not key.startswith(INDEX_PAGES):
        raise ValueError("not a page key")
    return str(key)


def _order(value: Any) -> Order:
    created, step, cid = typed(value, list, "order")
    return (float(typed(created, (int, float), "created")), typed(step, int, "step"), hex_digest(cid, "id"))


class RunPageInfo:
    """One entry of a run index: where a page of the run's records is and what it spans."""

    __slots__ = ("first", "key", "last", "max_step", "metrics", "min_step", "n")

    def __init__(
        self,
        key: str,
        n: int,
        first: Order,
        last: Order,
        min_step: int,
        max_step: int,
        metrics: dict[str, tuple[float, float]],
    ) -> None:
        self.key, self.n, self.first, self.last = key, n, first, last
        self.min_step, self.max_step, self.metrics = min_step, max_step, metrics

    def to_json(self) -> list[Any]:
        return [
            self.key,
            self.n,
            list(self.first),
            list(self.last),
            self.min_step,
            self.max_step,
            {m: list(v) for m, v in sorted(self.metrics.items())},
        ]


def _checked(key: str, what: str, parse: Any) -> Any:
    try:
        return parse()
    except (KeyError, TypeError, ValueError, OverflowError, IndexError, UnsupportedFormat) as e:
        raise IndexDamaged(key, f"malformed {what} ({type(e).__name__}: {e})") from None


def run_index(obj: dict[str, Any], key: str) -> list[RunPageInfo]:
    def parse() -> list[RunPageInfo]:
        out = []
        for row in typed(obj["pages"], list, "pages"):
            pkey, n, first, last, lo, hi, metrics = typed(row, list, "page row")
            ranges = {
                typed(m, str, "metric"): (
                    float(typed(v[0], (int, float), "min")),
                    float(typed(v[1], (int, float), "max")),
                )
                for m, v in typed(metrics, dict, "metrics").items()
            }
            out.append(
                RunPageInfo(
                    _key(pkey),
                    typed(n, int, "n"),
                    _order(first),
                    _order(last),
                    typed(lo, int, "min_step"),
                    typed(hi, int, "max_step"),
                    ranges,
                )
            )
        return out

    result: list[RunPageInfo] = _checked(key, "run index", parse)
    return result


def run_page_rows(obj: dict[str, Any], key: str = "") -> list[CatalogRecord]:
    """The records of a run page (or an id page, or the recent page)."""
    checked: set[str] = set()
    result: list[CatalogRecord] = _checked(
        key,
        "page",
        lambda: [CatalogRecord.from_json(r, checked) for r in typed(obj["records"], list, "records")],
    )
    return result


def chunk_filters(obj: dict[str, Any], key: str) -> dict[str, str]:
    """Each bucket's filter page key (a directory written before filters has none)."""

    def parse() -> dict[str, str]:
        rows = typed(obj.get("filters", {}), dict, "filters")
        return {typed(b, str, "bucket"): _key(k) for b, k in rows.items()}

    result: dict[str, str] = _checked(key, "chunk directory", parse)
    return result


def bucket_filter(obj: dict[str, Any], key: str) -> bytes:
    """A bucket's Bloom filter bits."""
    result: bytes = _checked(key, "chunk filter", lambda: bloom.check(obj["bloom"]))
    return result


def id_dir(obj: dict[str, Any], key: str) -> list[tuple[str, str, int]]:
    result: list[tuple[str, str, int]] = _checked(
        key,
        "id directory",
        lambda: [
            (hex_digest(first, "id"), _key(pkey), typed(n, int, "n"))
            for first, pkey, n in (typed(r, list, "row") for r in typed(obj["pages"], list, "pages"))
        ],
    )
    return result


def chunk_dir(obj: dict[str, Any], key: str) -> dict[str, tuple[str, int]]:
    def parse() -> dict[str, tuple[str, int]]:
        out = {}
        for b, row in typed(obj["buckets"], dict, "buckets").items():
            if len(b) != 2:
                raise ValueError("bucket names are two hex characters")
            pkey, n = typed(row, list, "bucket row")
            out[b] = (_key(pkey), typed(n, int, "n"))
        return out

    result: dict[str, tuple[str, int]] = _checked(key, "chunk directory", parse)
    return result


IdRow = tuple[str, str, Order]
"""An id page row: the checkpoint id, its run, and its order key in the run's pages."""


def id_rows(obj: dict[str, Any], key: str) -> list[IdRow]:
    def parse() -> list[IdRow]:
        out = []
        for row in typed(obj["ids"], list, "ids"):
            cid, run, created, step = typed(row, list, "id row")
            cid = hex_digest(cid, "id")
            out.append((cid, typed(run, str, "run"), _order([created, step, cid])))
        return out

    result: list[IdRow] = _checked(key, "id page", parse)
    return result


def id_row(rec: CatalogRecord) -> list[Any]:
    created, step, _ = rec.order
    return [rec.id, rec.run, created, step]


def bucket_rows(obj: dict[str, Any], key: str) -> dict[str, str]:
    """A chunk bucket: chunk hash → the checkpoint that wrote it."""

    def parse() -> dict[str, str]:
        return {
            hex_digest(h, "chunk hash"): hex_digest(owner, "owner")
            for h, owner in (typed(r, list, "chunk row") for r in typed(obj["chunks"], list, "chunks"))
        }

    result: dict[str, str] = _checked(key, "chunk bucket", parse)
    return result
