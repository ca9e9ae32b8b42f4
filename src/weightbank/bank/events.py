"""Run events: an append-only log per run of things that happened besides saves.

Training appends events such as a rollback on divergence (step, reason,
restored checkpoint) or a preemption; ``weightbank log`` shows them beside
the checkpoints. Each run's log is one ref updated by compare-and-swap, and an
append that loses a race is simply retried on the fresh log, so concurrent
appends from several processes are all kept.

Example:
    >>> from weightbank.storage import open_storage
    >>> from weightbank.bank.events import EventLog
    >>> log = EventLog(open_storage("memory://"))
    >>> _ = log.append("tts", "rollback", step=120, data={"reason": "nan"}, by="me")
    >>> [(e.kind, e.step) for e in log.read("tts")]
    [('rollback', 120)]
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from ..errors import ConcurrentUpdate, CorruptObject
from ..format.jsonsafe import decode, encode
from ..storage.base import Storage
from .layout import EVENTS, check_name
from .results import RunEvent

__all__ = ["EventLog"]

_RETRIES = 20


def _key(run: str) -> str:
    return f"{EVENTS}{check_name('run', run)}.json"


class EventLog:
    """Append-only per-run event logs in a storage backend."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    def _load(self, run: str) -> tuple[list[dict[str, Any]], str | None]:
        ref = self._storage.get_ref(_key(run))
        if ref is None:
            return [], None
        try:
            events = json.loads(ref.data)["events"]
            if not isinstance(events, list):
                raise TypeError("events must be a list")
        except (ValueError, KeyError, TypeError) as e:
            raise CorruptObject(_key(run), detail=f"event log is malformed ({e})") from None
        return events, ref.token

    def append(
        self,
        run: str,
        kind: str,
        *,
        by: str,
        step: int | None = None,
        checkpoint: str | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> RunEvent:
        """Append one event to ``run``'s log (retrying on concurrent appends)."""
        check_name("event kind", kind)
        entry = {
            "kind": kind,
            "at": time.time(),
            "by": by,
            "step": step,
            "checkpoint": checkpoint,
            "data": encode(dict(data or {}), "data"),
        }
        for attempt in range(_RETRIES):
            events, token = self._load(run)
            body = json.dumps({"run": run, "events": [*events, entry]}, separators=(",", ":")).encode()
            try:
                self._storage.put_ref(_key(run), body, token)
                return self._event(run, entry)
            except ConcurrentUpdate:
                if attempt == _RETRIES - 1:
                    raise
                time.sleep(0.005 * (attempt + 1))
        raise ConcurrentUpdate(_key(run))  # pragma: no cover - loop always returns or raises

    def read(self, run: str) -> list[RunEvent]:
        """Every event of ``run``, oldest first."""
        events, _ = self._load(run)
        return [self._event(run, e) for e in events]

    @staticmethod
    def _event(run: str, e: Mapping[str, Any]) -> RunEvent:
        return RunEvent(
            run=run,
            kind=str(e.get("kind", "")),
            at=float(e.get("at", 0.0)),
            by=str(e.get("by", "")),
            step=e.get("step"),
            checkpoint=e.get("checkpoint"),
            data=decode(e.get("data", {})),
        )
