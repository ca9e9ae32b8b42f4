"""Planners that hand non-tensor values to weightbank as objects, never as pickled bytes.

DCP's default planners turn every non-tensor value (a step counter, the
optimizer's ``param_groups``, a scheduler's state) into ``torch.save`` bytes
on save and ``torch.load`` them (pickle) on load. weightbank stores such values
as JSON in the manifest instead, so it needs the objects themselves:

* on save, :func:`value_of` asks the planner for the object: a planner's
  ``resolve_value(write_item)`` if it has one (:class:`SavePlanner`), else
  ``lookup_object`` (every ``DefaultSavePlanner`` has it) — never
  ``resolve_data``, which pickles;
* on load, :func:`set_value` gives the planner the object: a planner's
  ``load_value(read_item, value)`` if it has one (:class:`LoadPlanner`), else,
  for DCP's own ``DefaultLoadPlanner``, the object is put where its
  ``load_bytes`` would have put the unpickled one.

A planner that offers neither (a custom ``load_bytes`` that expects pickled
bytes, a planner without ``lookup_object``) is refused with InvalidState
naming the key — there is no pickle fallback.

Example:
    >>> import torch.distributed.checkpoint as dcp
    >>> from weightbank.dcp import LoadPlanner, SavePlanner
    >>> isinstance(SavePlanner(), dcp.DefaultSavePlanner), isinstance(LoadPlanner(), dcp.DefaultLoadPlanner)
    (True, True)
"""

from __future__ import annotations

import io
from typing import Any

from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.planner import LoadPlanner as _DcpLoadPlanner
from torch.distributed.checkpoint.planner import ReadItem, WriteItem
from torch.distributed.checkpoint.planner import SavePlanner as _DcpSavePlanner

from ..errors import InvalidState

__all__ = ["LoadPlanner", "SavePlanner", "set_value", "value_of"]


class SavePlanner(DefaultSavePlanner):
    """DCP's default save planner, plus ``resolve_value``: a non-tensor value as the object itself.

    Subclass it and override ``resolve_value`` to change what is stored for a
    value (the default stores what is in the state dict).

    Example:
        >>> SavePlanner().resolve_value.__name__
        'resolve_value'
    """

    def resolve_value(self, write_item: WriteItem) -> Any:
        """The object to store for a ``BYTE_IO`` write item (kept as JSON, never pickled)."""
        return self.lookup_object(write_item.index)


class LoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, plus ``load_value``: a non-tensor value is set as an object.

    Its ``load_bytes`` refuses: weightbank never hands out bytes to unpickle.

    Example:
        >>> LoadPlanner(allow_partial_load=True).allow_partial_load
        True
    """

    def load_value(self, read_item: ReadItem, value: Any) -> None:
        """Put ``value`` (read from the manifest's JSON) where the state dict's key ``read_item`` points."""
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], value)
        else:
            # DCP sets only its flattened copy here, which is not the caller's dict: set both.
            self.state_dict[fqn] = value
            self.original_state_dict[fqn] = value

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        raise InvalidState(
            read_item.dest_index.fqn, "weightbank never unpickles; values are set with load_value()"
        )


def value_of(planner: _DcpSavePlanner, item: WriteItem) -> Any:
    """The object behind a ``BYTE_IO`` write item, from the planner (see the module docstring)."""
    resolve = getattr(planner, "resolve_value", None)
    if callable(resolve):
        return resolve(item)
    lookup = getattr(planner, "lookup_object", None)
    if callable(lookup):
        return lookup(item.index)
    raise InvalidState(
        item.index.fqn,
        f"the save planner {type(planner).__name__} gives non-tensor values only as pickled bytes;"
        " use weightbank.dcp.SavePlanner or give it a resolve_value(write_item) method",
    )


def set_value(planner: _DcpLoadPlanner, item: ReadItem, value: Any) -> None:
    """Hand a value read from the manifest to the planner (see the module docstring)."""
    load_value = getattr(planner, "load_value", None)
    if callable(load_value):
        load_value(item, value)
        return
    if isinstance(planner, DefaultLoadPlanner) and type(planner).load_bytes is DefaultLoadPlanner.load_bytes:
        LoadPlanner.load_value(planner, item, value)  # type: ignore[arg-type]
        return
    raise InvalidState(
        item.dest_index.fqn,
        f"the load planner {type(planner).__name__} reads non-tensor values with load_bytes (pickle),"
        " which weightbank never feeds; use weightbank.dcp.LoadPlanner or give it a"
        " load_value(read_item, value) method",
    )
