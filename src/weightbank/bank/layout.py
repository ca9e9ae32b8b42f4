"""Where each kind of object lives in a bank, and which names are allowed.

::

    weightbank.json                   format marker {"format": "weightbank", "version": N}
    packs/<ab>/<save-id>-<n>.pack     chunk payloads, written once by one save
    manifests/<ab>/<checkpoint-id>.json
    segments/<hh>/<save-id>.<hash>.zst  part of a format-3 manifest (its body or locations), written by one save
    refs/tags/<name>.json             tag target + full history (compare-and-swap)
    refs/events/<run>.json            the run's event log (rollbacks, preemptions...)
    refs/locks/<name>.json            an exclusive maintenance lock (repack)
    leases/<save-id>.json             a save in flight (gc keeps its data)
    trash/<checkpoint-id>.json        deleted manifests, kept until gc may drop their data
    released/<repack-id>.json         packs a repack moved out of, kept until gc may drop them
    quarantine/<key>.<ns>             damaged records set aside when replaced (untag --force, a reset event log)
    index/log/<seq>.json              catalog log entry: one checkpoint added or deleted (put-if-absent)
    index/head.json                   the highest log sequence number written (only grows; compare-and-swap)
    index/roots/<gen>.json            compacted catalog snapshot root (put-if-absent; the newest wins)
    index/pages/<ab>/<hash>.zst       immutable pages a root names (records by run, by id; chunk buckets)
    tmp/                              local backend scratch

Example:
    >>> from weightbank.bank.layout import manifest_key, check_name
    >>> manifest_key("ab12" + "0" * 60)
    'manifests/ab/ab12000000000000000000000000000000000000000000000000000000000000.json'
    >>> check_name("tag", "prod-v2")
    'prod-v2'
"""

from __future__ import annotations

import re
import time

from ..errors import InvalidName

__all__ = [
    "EVENTS",
    "FORMAT_KEY",
    "INDEX_HEAD",
    "INDEX_LOG",
    "INDEX_PAGES",
    "INDEX_ROOTS",
    "LEASES",
    "LOCKS",
    "MANIFESTS",
    "PACKS",
    "QUARANTINE",
    "RELEASED",
    "SEGMENTS",
    "TAGS",
    "TRASH",
    "check_name",
    "check_new_name",
    "is_pack_key",
    "is_segment_key",
    "lease_key",
    "lock_key",
    "log_key",
    "log_seq_from_key",
    "manifest_id_from_key",
    "manifest_key",
    "pack_key",
    "page_key",
    "quarantine_key",
    "release_key",
    "root_gen_from_key",
    "root_key",
    "sanitize_name",
    "save_id_from_pack",
    "save_id_from_segment",
    "segment_hash_from_key",
    "segment_key",
    "tag_key",
    "trash_key",
]

FORMAT_KEY = "weightbank.json"
PACKS = "packs/"
MANIFESTS = "manifests/"
SEGMENTS = "segments/"
TAGS = "refs/tags/"
EVENTS = "refs/events/"
LOCKS = "refs/locks/"
LEASES = "leases/"
TRASH = "trash/"
RELEASED = "released/"
QUARANTINE = "quarantine/"
INDEX_LOG = "index/log/"
INDEX_ROOTS = "index/roots/"
INDEX_PAGES = "index/pages/"
INDEX_HEAD = "index/head.json"

_NAME_CHARS = "A-Za-z0-9_.+=,-"
_NAME = re.compile(rf"^[A-Za-z0-9_][{_NAME_CHARS}]*$")
_NOT_NAME_CHAR = re.compile(rf"[^{_NAME_CHARS}]")
_MAX_NAME = 128
# Shortest id prefix a ref may use (format.hashing.MIN_PREFIX): a name of this many lowercase hex
# characters or more could be read as a checkpoint id or id prefix.
_ID_LIKE = re.compile(r"^[0-9a-f]{6,}$")


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


def check_new_name(kind: str, name: object) -> str:
    """:func:`check_name`, and refuse a name that could be read as a checkpoint id or id prefix.

    Used where a tag or run is created or moved; reading an existing name (a
    tag made before this rule) only needs :func:`check_name`. Without this
    rule ``bank.tag(a_id, b_id)`` would make the ref ``a_id`` name checkpoint b.

    Example:
        >>> check_new_name("tag", "prod")
        'prod'
        >>> check_new_name("tag", "cafe01")
        Traceback (most recent call last):
        weightbank.errors.InvalidName: invalid tag name 'cafe01': 6 or more lowercase hex characters read as a checkpoint id prefix; add a letter outside a-f (e.g. 'v-cafe01')
    """
    checked = check_name(kind, name)
    if _ID_LIKE.match(checked):
        raise InvalidName(
            kind,
            checked,
            f"6 or more lowercase hex characters read as a checkpoint id prefix;"
            f" add a letter outside a-f (e.g. 'v-{checked[:12]}')",
        )
    return checked


def sanitize_name(text: str) -> str:
    """``text`` with what a tag or run name may not hold replaced by ``_`` (for names built from free text).

    Each character outside the name alphabet becomes ``_``, and so do a
    leading ``.`` or ``-`` and the second dot of ``..``. Only characters
    change: :func:`check_name` still refuses an empty or too long result.

    Example:
        >>> sanitize_name("tts.best.val/loss..ema")
        'tts.best.val_loss._ema'
    """
    out = _NOT_NAME_CHAR.sub("_", text)
    if out[:1] in (".", "-"):
        out = "_" + out[1:]
    return out.replace("..", "._")


def manifest_key(cid: str) -> str:
    return f"{MANIFESTS}{cid[:2]}/{cid}.json"


def manifest_id_from_key(key: str) -> str | None:
    name = key.rsplit("/", 1)[-1]
    return name[:-5] if name.endswith(".json") else None


_PACK_KEY = re.compile(re.escape(PACKS) + r"([0-9A-Za-z_-]{1,2})/([0-9A-Za-z_-]{1,128})-[0-9]{1,9}\.pack")


def is_pack_key(key: object) -> bool:
    """Whether ``key`` is one :func:`pack_key` makes (a pack key read from a manifest is untrusted).

    Example:
        >>> is_pack_key(pack_key("ab12", 0)), is_pack_key("packs/../../etc/passwd")
        (True, False)
    """
    if not isinstance(key, str):
        return False
    m = _PACK_KEY.fullmatch(key)
    return m is not None and m.group(1) == m.group(2)[:2]


def pack_key(save_id: str, n: int) -> str:
    return f"{PACKS}{save_id[:2]}/{save_id}-{n}.pack"


def save_id_from_pack(key: str) -> str:
    name = key.rsplit("/", 1)[-1]
    return name.rsplit("-", 1)[0]


_SEGMENT_KEY = re.compile(re.escape(SEGMENTS) + r"([0-9a-f]{2})/([0-9A-Za-z_-]{1,128})\.([0-9a-f]{64})\.zst")


def segment_key(save_id: str, h: str) -> str:
    """Where the save ``save_id`` stores the manifest segment whose text hashes to ``h``.

    Named by the save as packs are, so gc keeps it by the same rules (a
    save's lease, the manifests and trash entries that name it).

    Example:
        >>> k = segment_key("s1", "cd" * 32); is_segment_key(k), save_id_from_segment(k), is_segment_key("x")
        (True, 's1', False)
    """
    return f"{SEGMENTS}{h[:2]}/{save_id}.{h}.zst"


def is_segment_key(key: object) -> bool:
    """Whether ``key`` is one :func:`segment_key` makes (a key read from a manifest is untrusted)."""
    if not isinstance(key, str):
        return False
    m = _SEGMENT_KEY.fullmatch(key)
    return m is not None and m.group(1) == m.group(3)[:2]


def save_id_from_segment(key: str) -> str:
    return key.rsplit("/", 1)[-1].split(".", 1)[0]


def segment_hash_from_key(key: str) -> str:
    return key.rsplit("/", 1)[-1].split(".")[1]


def tag_key(name: str) -> str:
    return f"{TAGS}{check_name('tag', name)}.json"


def release_key(repack_id: str) -> str:
    return f"{RELEASED}{check_name('repack', repack_id)}.json"


def lock_key(name: str) -> str:
    return f"{LOCKS}{check_name('lock', name)}.json"


def lease_key(save_id: str) -> str:
    return f"{LEASES}{save_id}.json"


def quarantine_key(key: str) -> str:
    """Where the damaged bytes of record ``key`` are kept when the record is replaced."""
    return f"{QUARANTINE}{key}.{time.time_ns()}"


def trash_key(cid: str) -> str:
    return f"{TRASH}{cid}.json"


_SEQ = re.compile(r"([0-9]{12,18})\.json")


def log_key(seq: int) -> str:
    """The key of catalog log entry ``seq`` (zero-padded, so keys sort as numbers)."""
    return f"{INDEX_LOG}{seq:012d}.json"


def log_seq_from_key(key: str) -> int | None:
    """The sequence number a :func:`log_key` names, None for any other key."""
    m = _SEQ.fullmatch(key[len(INDEX_LOG) :]) if key.startswith(INDEX_LOG) else None
    return int(m.group(1)) if m else None


def root_key(gen: int) -> str:
    """The key of catalog snapshot root number ``gen``."""
    return f"{INDEX_ROOTS}{gen:012d}.json"


def root_gen_from_key(key: str) -> int | None:
    """The generation a :func:`root_key` names, None for any other key."""
    m = _SEQ.fullmatch(key[len(INDEX_ROOTS) :]) if key.startswith(INDEX_ROOTS) else None
    return int(m.group(1)) if m else None


def page_key(h: str) -> str:
    """The key of the index page whose (uncompressed) content hashes to ``h``."""
    return f"{INDEX_PAGES}{h[:2]}/{h}.zst"
