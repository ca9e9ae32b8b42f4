"""Where each kind of object lives in a bank, and which names are allowed.

::

    weightbank.json                   format marker {"format": "weightbank", "version": N}
    packs/<ab>/<save-id>-<n>.pack     chunk payloads, written once by one save
    manifests/<ab>/<checkpoint-id>.json
    refs/tags/<name>.json             tag target + full history (compare-and-swap)
    refs/events/<run>.json            the run's event log (rollbacks, preemptions...)
    leases/<save-id>.json             a save in flight (gc keeps its data)
    trash/<checkpoint-id>.json        deleted manifests, kept until gc may drop their data
    tmp/                              local backend scratch

Example:
    >>> from weightbank.bank.layout import manifest_key, check_name
    >>> manifest_key("ab12" + "0" * 60)
    'manifests/ab/ab120000000000000000000000000000000000000000000000000000000000000000.json'
    >>> check_name("tag", "prod-v2")
    'prod-v2'
"""

from __future__ import annotations

import re

from ..errors import InvalidName

__all__ = [
    "EVENTS",
    "FORMAT_KEY",
    "LEASES",
    "MANIFESTS",
    "PACKS",
    "TAGS",
    "TRASH",
    "check_name",
    "lease_key",
    "manifest_id_from_key",
    "manifest_key",
    "pack_key",
    "save_id_from_pack",
    "tag_key",
    "trash_key",
]

FORMAT_KEY = "weightbank.json"
PACKS = "packs/"
MANIFESTS = "manifests/"
TAGS = "refs/tags/"
EVENTS = "refs/events/"
LEASES = "leases/"
TRASH = "trash/"

_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+=,-]*$")
_MAX_NAME = 128


def check_name(kind: str, name: object) -> str:
    """Return ``name`` if it is a valid tag/run name, else raise InvalidName saying why.

    Names use letters, digits and ``_ . + = , -``; they may not start with
    ``.`` or ``-``, contain ``..``, path separators, ``@ ~ : { }``, spaces or
    control characters, or exceed 128 characters.
    """
    if not isinstance(name, str):
        raise InvalidName(kind, repr(name), "must be a string")
    if not name:
        raise InvalidName(kind, name, "must not be empty")
    if len(name) > _MAX_NAME:
        raise InvalidName(kind, name, f"longer than {_MAX_NAME} characters")
    bad = sorted({c for c in name if ord(c) < 32 or ord(c) == 127})
    if bad:
        raise InvalidName(kind, name, "contains control characters")
    if "/" in name or "\\" in name:
        raise InvalidName(kind, name, "contains a path separator")
    if ".." in name:
        raise InvalidName(kind, name, "contains '..'")
    if not _NAME.match(name):
        raise InvalidName(
            kind,
            name,
            "use letters, digits and _ . + = , - (not starting with . or -; no @ ~ : { } or spaces)",
        )
    return name


def manifest_key(cid: str) -> str:
    return f"{MANIFESTS}{cid[:2]}/{cid}.json"


def manifest_id_from_key(key: str) -> str | None:
    name = key.rsplit("/", 1)[-1]
    return name[:-5] if name.endswith(".json") else None


def pack_key(save_id: str, n: int) -> str:
    return f"{PACKS}{save_id[:2]}/{save_id}-{n}.pack"


def save_id_from_pack(key: str) -> str:
    name = key.rsplit("/", 1)[-1]
    return name.rsplit("-", 1)[0]


def tag_key(name: str) -> str:
    return f"{TAGS}{check_name('tag', name)}.json"


def lease_key(save_id: str) -> str:
    return f"{LEASES}{save_id}.json"


def trash_key(cid: str) -> str:
    return f"{TRASH}{cid}.json"
