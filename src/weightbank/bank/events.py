"""Run events: an append-only log per run of things that happened besides saves.

Training appends events such as a rollback on divergence (step, reason,
restored checkpoint) or a preemption; ``weightbank log`` shows them beside
the checkpoints. Each run's log is one ref updated by compare-and-swap, and an
append that loses a race is simply retried on the fresh log, so concurrent
appends from several processes are all kept. The log is sealed with a digest
(:mod:`weightbank.format.sealed`) and every entry is checked when read: a
damaged log is a CorruptObject for that run only; the next append sets it
aside under ``quarantine/`` and starts a new log with a ``log-reset`` event
saying so.

Example:
    >>> from weightbank.storage import open_storage
    >>> from weightbank.bank.events import EventLog
    >>> log = EventLog(open_storage("memory://"))
    >>> _ = log.append("tts", "rollback", step=120, data={"reason": "nan"}, by="me")
    >>> [(e.kind, e.step) for e in log.read("tts")]
    [('rollback', 120)]
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from ..errors import ConcurrentUpdate, CorruptObject
from ..format.jsonsafe import check, decode, encode
from ..format.schema import finite, hex_digest, typed
from ..format.sealed import seal, unseal
from ..storage.base import Storage
from .layout import EVENTS, check_name, quarantine_key
from .results import RunEvent

__all__ = ["EventLog"]

_RETRIES = 20
_LEGACY_KEYS = ("run", "events")


def _key(run: str) -> str:
    return f"{EVENTS}{check_name('run', run)}.json"


class EventLog:
    """Append-only per-run event logs in a storage backend."""

    def __init__(self, storage: Storage) -> None:
        self._storage = storage

    def _load(self, run: str) -> tuple[list[dict[str, Any]], str | None]:
        key = _key(run)
        ref = self._storage.get_ref(key)
        if ref is None:
            return [], None
        body = unseal(ref.data, key, _LEGACY_KEYS, "event log").body
        try:
            if body.get("run") != run:
                raise ValueError(f"the log names run {str(body.get('run'))[:40]!r}")
            events = typed(body.get("events"), list, "events")
            for e in events:
                _check_entry(e)
        except (ValueError, TypeError) as e:
            raise CorruptObject(key, detail=f"event log is malformed ({e})") from None
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
            try:
                events, token = self._load(run)
            except CorruptObject as e:
                events, token = self._reset(run, e, by)
            body = seal({"run": run, "events": [*events, entry]})
            try:
                self._storage.put_ref(_key(run), body, token)
                return self._event(run, entry)
            except ConcurrentUpdate:
                if attempt == _RETRIES - 1:
                    raise
                time.sleep(0.005 * (attempt + 1))
        raise ConcurrentUpdate(_key(run))  # pragma: no cover - loop always returns or raises

    def _reset(self, run: str, damage: CorruptObject, by: str) -> tuple[list[dict[str, Any]], str | None]:
        """A damaged log is set aside under ``quarantine/`` and a new one starts with a ``log-reset`` event.

        An append must not fail forever on damage it did not cause (a guard's
        rollback records one); the reset event says where the old bytes are.
        """
        key = _key(run)
        ref = self._storage.get_ref(key)
        if ref is None:
            return [], None
        kept = quarantine_key(key)
        self._storage.write(kept, ref.data)
        note = {"quarantined": kept, "problem": damage.detail or str(damage)}
        reset = {
            "kind": "log-reset",
            "at": time.time(),
            "by": by,
            "step": None,
            "checkpoint": None,
            "data": note,
        }
        return [reset], ref.token

    def runs(self) -> list[str]:
        """Every run with an event log (refs whose key is no run name are skipped)."""
        out = []
        for key in self._storage.list_refs(EVENTS):
            leaf = key[len(EVENTS) :]
            if leaf.endswith(".json") and "/" not in leaf:
                try:
                    out.append(check_name("run", leaf[:-5]))
                except ValueError:
                    continue
        return sorted(out)

    def read(self, run: str) -> list[RunEvent]:
        """Every event of ``run``, oldest first."""
        events, _ = self._load(run)
        return [self._event(run, e) for e in events]

    @staticmethod
    def _event(run: str, e: Mapping[str, Any]) -> RunEvent:
        return RunEvent(
            run=run,
            kind=e["kind"],
            at=float(e["at"]),
            by=e.get("by", ""),
            step=e.get("step"),
            checkpoint=e.get("checkpoint"),
            data=decode(e.get("data", {})),
        )


def _check_entry(e: Any) -> None:
    """One stored event, checked (TypeError/ValueError say what is wrong)."""
    typed(e, dict, "event")
    check_name("event kind", typed(e.get("kind"), str, "kind"))
    finite(e.get("at"), "at")
    typed(e.get("by", ""), str, "by")
    step = e.get("step")
    if step is not None and typed(step, int, "step") < 0:
        raise ValueError("step is negative")
    if e.get("checkpoint") is not None:
        hex_digest(e["checkpoint"], "checkpoint")
    check(typed(e.get("data", {}), dict, "data"), "data")
