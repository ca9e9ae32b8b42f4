"""Tags and run events of a :class:`~weightbank.Bank`: moving names, their history, rollback, events.

A mixin of the bank (as :mod:`.twophase` is): the verbs live here, the stored
records in :mod:`.tags` and :mod:`.events`.

Example:
    >>> import torch, weightbank as wb
    >>> bank = wb.open("memory://")
    >>> a = bank.save({"w": torch.zeros(1)}, tags=["prod"]).id
    >>> b = bank.save({"w": torch.ones(1)}, tags=["prod"]).id
    >>> bank.rollback("prod").new == a, [e.action for e in bank.tag_history("prod")]
    (True, ['set', 'set', 'rollback'])
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ..errors import CheckpointNotFound, InvalidArgument, TagNotFound
from .catalog import Catalog
from .environment import who
from .events import EventLog
from .layout import check_name, check_new_name
from .results import RunEvent, TagEvent, TagInfo
from .tags import UNSET, TagStore, Unset

__all__ = ["Tagging"]


class Tagging:
    """``tag``/``untag``/``rollback``/``tags``/``tag_history`` and ``record_event``/``events`` for the bank."""

    if TYPE_CHECKING:
        _catalog: Catalog
        _tags: TagStore
        _events: EventLog

        def resolve(self, ref: str) -> str: ...

    # -- tags ---------------------------------------------------------------------
    def tag(self, name: str, ref: str, *, why: str = "", expect: str | Unset | None = UNSET) -> TagEvent:
        """Point tag ``name`` at ``ref``'s checkpoint (compare-and-swap; history recorded).

        ``expect`` (an id, or None for "no tag yet") makes the move conditional
        on the tag's current target; a concurrent change raises ConcurrentUpdate.

        Example:
            >>> import torch, weightbank as wb
            >>> bank = wb.open("memory://"); cid = bank.save({"w": torch.ones(1)}).id
            >>> bank.tag("prod", cid).new == cid
            True
        """
        check_new_name("tag", name)
        cid = self.resolve(ref)
        if isinstance(expect, str):
            expect = self.resolve(expect)
        return self._tags.update(name, "set", cid, by=who(), why=why, expect=expect)

    def untag(self, name: str, *, why: str = "", force: bool = False) -> TagEvent:
        """Remove a tag (its history stays; ``rollback`` restores it).

        ``force`` also removes a tag whose record is damaged (CorruptObject
        otherwise): the damaged bytes are kept under ``quarantine/`` and the
        tag starts a new history, whose first entry says so.

        Example:
            >>> import torch, weightbank as wb
            >>> bank = wb.open("memory://"); _ = bank.save({"w": torch.ones(1)}, tags=["prod"])
            >>> bank.untag("prod").action, bank.tags()
            ('untag', [])
        """
        if force:
            check_name("tag", name)
            replaced = self._tags.replace_damaged(name, by=who(), why=why)
            if replaced is not None:
                return replaced
        return self._tags.update(name, "untag", None, by=who(), why=why)

    def rollback(self, name: str, steps: int = 1, *, why: str = "") -> TagEvent:
        """Move tag ``name`` back ``steps`` targets (undoing the last moves).

        Example:
            >>> import torch, weightbank as wb
            >>> bank = wb.open("memory://")
            >>> a = bank.save({"w": torch.zeros(1)}, tags=["prod"]).id
            >>> b = bank.save({"w": torch.ones(1)}, tags=["prod"]).id
            >>> bank.rollback("prod").new == a
            True
        """
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise InvalidArgument("steps", steps, "must be a positive int")
        check_name("tag", name)
        current = self._tags.target(name)
        target = self._tags.previous(name, steps)
        if not self._catalog.exists(target):
            raise CheckpointNotFound(
                f"{name}@{{{steps}}}",
                detail=f"its target {target[:12]} was deleted; tag a checkpoint explicitly",
            )
        # expect=current: a tag moved since we looked is a conflict, not a silent double rollback.
        return self._tags.update(name, "rollback", None, by=who(), why=why, steps=steps, expect=current)

    def tags(self, *, include_removed: bool = False) -> list[TagInfo]:
        """Every live tag and its target (and, with ``include_removed``, removed ones with target None)."""
        infos = [self._tags.info(n) for n in self._tags.names()]
        return infos if include_removed else [t for t in infos if t.target is not None or t.problem]

    def tag_history(self, name: str) -> list[TagEvent]:
        """Every change ever made to tag ``name``, oldest first."""
        check_name("tag", name)
        rec, _ = self._tags.read(name)
        if rec is None:
            raise TagNotFound(name, self._tags.names())
        return rec.events()

    # -- run events ---------------------------------------------------------------
    def record_event(
        self,
        run: str,
        kind: str,
        *,
        step: int | None = None,
        checkpoint: str | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> RunEvent:
        """Append an event (e.g. ``"rollback"``) to a run's log; ``log`` shows it beside the checkpoints.

        Example:
            >>> import weightbank as wb
            >>> bank = wb.open("memory://")
            >>> bank.record_event("tts", "rollback", step=5, data={"reason": "nan"}).kind
            'rollback'
        """
        if checkpoint is not None:
            checkpoint = self.resolve(checkpoint)
        return self._events.append(run, kind, by=who(), step=step, checkpoint=checkpoint, data=data)

    def events(self, run: str) -> list[RunEvent]:
        """A run's events, oldest first (empty for a run without any)."""
        return self._events.read(run)
