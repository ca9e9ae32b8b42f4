"""The catalog record: what the index keeps of one committed checkpoint (its metadata, no tensor table).

A record carries every field :class:`~weightbank.CheckpointInfo` shows except
``tags`` — run, step, parent, created, message, metrics, config, meta, env
(JSON-safe encoded, as in the manifest), logical and stored bytes, tensor
count, lossy summaries, manifest format — and the packs the checkpoint's
chunks lie in, so ``log``, ``info``, ref resolution and prune never read a
manifest. It is derived from the manifest (:meth:`CatalogRecord.of`); the
manifest stays the truth, and ``verify`` compares the two.

Example:
    >>> from weightbank.format.manifest import Manifest
    >>> rec = CatalogRecord.of("ab" * 32, Manifest(run="r", step=3, parent=None, created=1.0))
    >>> CatalogRecord.from_json(rec.to_json()) == rec, rec.run, rec.step
    (True, 'r', 3)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ...format.jsonsafe import check, decode
from ...format.manifest import NEWEST_FORMAT, Manifest
from ...format.schema import hex_digest, typed
from ..layout import is_pack_key
from ..results import CheckpointInfo

__all__ = ["CatalogRecord"]


def _count(obj: dict[str, Any], key: str) -> int:
    value = typed(obj[key], int, key)
    if value < 0:
        raise ValueError(f"{key} is negative")
    return int(value)


def _packs(value: Any, checked: set[str]) -> tuple[str, ...]:
    packs = tuple(typed(value, list, "packs"))
    for p in packs:
        if p not in checked:  # a str equal to a checked key; anything else is checked (and refused) here
            if not is_pack_key(p):
                raise ValueError("a record names something that is not a pack key")
            checked.add(p)
    return packs


@dataclass(frozen=True)
class CatalogRecord:
    """One checkpoint as the catalog index lists it (metadata fields stored JSON-safe encoded)."""

    id: str
    run: str
    step: int | None
    parent: str | None
    created: float
    message: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    nbytes: int = 0
    stored_bytes: int = 0
    n_tensors: int = 0
    lossy: dict[str, Any] = field(default_factory=dict)
    format: int = 1
    packs: tuple[str, ...] = ()

    @classmethod
    def of(cls, cid: str, m: Manifest) -> CatalogRecord:
        """The record of checkpoint ``cid`` whose manifest is ``m``."""
        return cls(
            id=cid,
            run=m.run,
            step=m.step,
            parent=m.parent,
            created=m.created,
            message=m.message,
            metrics=m.metrics,
            config=m.config,
            meta=m.meta,
            env=m.env,
            nbytes=m.nbytes,
            stored_bytes=m.stored_bytes,
            n_tensors=len(m.tensors),
            lossy={name: s.to_json() for name, s in m.lossy.items()},
            format=m.format,
            packs=tuple(m.packs),
        )

    @property
    def order(self) -> tuple[float, int, str]:
        """Where the record sorts in its run's history (oldest first): created, step, id."""
        return (self.created, self.step if self.step is not None else -1, self.id)

    def decoded_metrics(self) -> dict[str, Any]:
        return dict(decode(self.metrics))

    def decoded_meta(self) -> dict[str, Any]:
        return dict(decode(self.meta))

    def info(self, tags: tuple[str, ...] = ()) -> CheckpointInfo:
        """This record as the public :class:`~weightbank.CheckpointInfo`."""
        return CheckpointInfo(
            id=self.id,
            run=self.run,
            step=self.step,
            parent=self.parent,
            created=self.created,
            message=self.message,
            metrics=decode(self.metrics),
            config=decode(self.config),
            meta=decode(self.meta),
            env=dict(self.env),
            nbytes=self.nbytes,
            stored_bytes=self.stored_bytes,
            n_tensors=self.n_tensors,
            tags=tags,
            lossy=dict(self.lossy),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "run": self.run,
            "step": self.step,
            "parent": self.parent,
            "created": self.created,
            "message": self.message,
            "metrics": self.metrics,
            "config": self.config,
            "meta": self.meta,
            "env": self.env,
            "nbytes": self.nbytes,
            "stored_bytes": self.stored_bytes,
            "n_tensors": self.n_tensors,
            "lossy": self.lossy,
            "format": self.format,
            "packs": list(self.packs),
        }

    @classmethod
    def from_json(cls, obj: Any, checked: set[str] | None = None) -> CatalogRecord:
        """A record read back from storage, checked field by field (ValueError/TypeError say which).

        ``checked`` holds pack keys already found well formed: the records of
        one page share most of their packs, so a page checks each key once.
        """
        typed(obj, dict, "record")
        step = obj["step"]
        if step is not None and typed(step, int, "step") < 0:
            raise ValueError("step is negative")
        created = float(typed(obj["created"], (int, float), "created"))
        if not math.isfinite(created):
            raise ValueError("created is not a finite time")
        fmt = typed(obj["format"], int, "format")
        if not 1 <= fmt <= NEWEST_FORMAT:
            raise ValueError(f"format {fmt} is not one this reader knows")
        packs = _packs(obj["packs"], set() if checked is None else checked)
        return cls(
            id=hex_digest(obj["id"], "id"),
            run=typed(obj["run"], str, "run"),
            step=step,
            parent=None if obj["parent"] is None else hex_digest(obj["parent"], "parent"),
            created=created,
            message=typed(obj["message"], str, "message"),
            metrics=check(typed(obj["metrics"], dict, "metrics"), "metrics"),
            config=check(typed(obj["config"], dict, "config"), "config"),
            meta=check(typed(obj["meta"], dict, "meta"), "meta"),
            env=check(typed(obj["env"], dict, "env"), "env"),
            nbytes=_count(obj, "nbytes"),
            stored_bytes=_count(obj, "stored_bytes"),
            n_tensors=_count(obj, "n_tensors"),
            lossy=check(typed(obj["lossy"], dict, "lossy"), "lossy"),
            format=fmt,
            packs=packs,
        )
