"""Laying out the lineage graph of checkpoints for ``weightbank log --graph``.

Every checkpoint has at most one parent, possibly in another run (a fine-tune
started from a pre-training checkpoint), so the lineage is a forest. It is drawn
newest first, one lane per line of descent, the way ``git log --graph`` draws
history: a child is always printed above its parent, and where several children
share a parent their lanes join just above it.

Example:
    >>> from weightbank.cli.graph import layout
    >>> nodes = [("c", "a", 3.0), ("b", "a", 2.0), ("a", None, 1.0)]
    >>> [(prefix, cid) for prefix, cid in layout(nodes)]
    [('●', 'c'), ('│ ●', 'b'), ('├─┘', None), ('●', 'a')]
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

__all__ = ["layout"]

Node = tuple[str, "str | None", float]
"""(id, parent id or None, creation time)."""


def _order(nodes: Sequence[Node]) -> list[Node]:
    """Newest first, but never a parent above one of its children (whatever the clocks said)."""
    by_id = {n[0]: n for n in nodes}
    children: dict[str, int] = dict.fromkeys(by_id, 0)
    for _, parent, _ in nodes:
        if parent in children:
            children[parent] += 1
    ready = [(-created, cid) for cid, _, created in nodes if children[cid] == 0]
    heapq.heapify(ready)
    out: list[Node] = []
    while ready:
        _, cid = heapq.heappop(ready)
        node = by_id[cid]
        out.append(node)
        parent = node[1]
        if parent in children:
            children[parent] -= 1
            if children[parent] == 0:
                heapq.heappush(ready, (-by_id[parent][2], parent))
    return out


def _join_row(lanes: list[str | None], joined: list[int]) -> str:
    first, last = joined[0], joined[-1]
    cells: list[str] = []
    for j, lane in enumerate(lanes):
        if j == first:
            ch = "├"
        elif j in joined:
            ch = "┘" if j == last else "┴"
        elif first < j < last:
            ch = "┼" if lane is not None else "─"
        else:
            ch = "│" if lane is not None else " "
        cells.append(ch)
        if j < len(lanes) - 1:
            cells.append("─" if first <= j < last else " ")
    return "".join(cells).rstrip()


def _node_row(lanes: list[str | None], at: int) -> str:
    return " ".join(
        "●" if j == at else ("│" if lane is not None else " ") for j, lane in enumerate(lanes)
    ).rstrip()


def layout(nodes: Sequence[Node]) -> list[tuple[str, str | None]]:
    """Rows of the graph: ``(prefix, id)`` for a checkpoint, ``(prefix, None)`` where lanes join.

    A parent that is not among ``nodes`` (another run when the log is filtered,
    or a deleted checkpoint) simply ends its lane.
    """
    present = {n[0] for n in nodes}
    lanes: list[str | None] = []  # the id each lane waits for next
    rows: list[tuple[str, str | None]] = []
    for cid, parent, _ in _order(nodes):
        waiting = [j for j, lane in enumerate(lanes) if lane == cid]
        if len(waiting) > 1:
            rows.append((_join_row(lanes, waiting), None))
            for j in waiting[1:]:
                lanes[j] = None
        if waiting:
            at = waiting[0]
        elif None in lanes:
            at = lanes.index(None)
        else:
            lanes.append(None)
            at = len(lanes) - 1
        lanes[at] = cid
        rows.append((_node_row(lanes, at), cid))
        lanes[at] = parent if parent in present else None
        while lanes and lanes[-1] is None:
            lanes.pop()
    return rows
