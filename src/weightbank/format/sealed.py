"""Self-verifying JSON records: the mutable objects of a bank carry a digest of their own content.

Data objects are named by their hash, so they verify themselves; the small
mutable records (tags with their history, run event logs, trash entries,
leases) cannot be. Each is written *sealed*: its JSON object plus a
``"digest"`` field, the BLAKE3 of the object's canonical JSON (sorted keys,
no spaces, ASCII, no NaN). Reading checks the digest, so a flipped byte is a
CorruptObject, never a silently different history.

A record written before sealing existed has exactly its legacy keys and no
digest; it is accepted as it is (``sealed`` False) and sealed on its next
write. A damaged record can not pass for a legacy one: any other key set
without a valid digest is refused.

Example:
    >>> from weightbank.format.sealed import seal, unseal
    >>> data = seal({"name": "prod", "stack": []})
    >>> unseal(data, "refs/tags/prod.json").body
    {'name': 'prod', 'stack': []}
    >>> try:
    ...     unseal(data.replace(b"prod", b"prad"), "refs/tags/prod.json")
    ... except OSError as e:
    ...     print(e.detail)
    record does not match its digest
"""

from __future__ import annotations

import json
from collections.abc import Collection
from dataclasses import dataclass
from typing import Any

from ..errors import CorruptObject
from .hashing import digest

__all__ = ["DIGEST_KEY", "Unsealed", "seal", "unseal"]

#: The field that holds a sealed record's digest.
DIGEST_KEY = "digest"


def _canonical(body: dict[str, Any]) -> bytes:
    return json.dumps(
        body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    ).encode()


def seal(body: dict[str, Any]) -> bytes:
    """The bytes of ``body`` sealed with its digest (``body`` must not hold the digest key)."""
    if DIGEST_KEY in body:
        raise ValueError(f"a sealed record's body may not have a {DIGEST_KEY!r} field")
    return _canonical({**body, DIGEST_KEY: digest(_canonical(body))})


@dataclass(frozen=True)
class Unsealed:
    """A record read back: its body (digest removed) and whether it was sealed or legacy."""

    body: dict[str, Any]
    sealed: bool


def unseal(data: bytes, key: str, legacy_keys: Collection[str] = (), what: str = "record") -> Unsealed:
    """Parse and check a sealed record; CorruptObject (naming ``key``) if it is damaged or malformed.

    ``legacy_keys``: the exact key set of this record's unsealed form, accepted without a digest;
    ``what`` names the record in messages (``"tag record"``).
    """
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise CorruptObject(key, detail=f"{what} is not valid JSON ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise CorruptObject(key, detail=f"{what} is not a JSON object")
    stored = obj.pop(DIGEST_KEY, None)
    if stored is None:
        if legacy_keys and set(obj) == set(legacy_keys):
            return Unsealed(obj, sealed=False)
        raise CorruptObject(key, detail=f"{what} has no digest")
    try:
        actual = digest(_canonical(obj))
    except (ValueError, TypeError, RecursionError):
        raise CorruptObject(key, detail=f"{what} does not match its digest") from None
    if stored != actual:
        raise CorruptObject(
            key, expected=str(stored)[:64], actual=actual, detail=f"{what} does not match its digest"
        )
    return Unsealed(obj, sealed=True)
