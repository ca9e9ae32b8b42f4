"""Re-encoding delta chains: a checkpoint becomes its chain's keyframe, the ones behind it reverse deltas.

A save codes a chunk as an XOR delta against its parent's chunk at the same
place, so along a run the *oldest* checkpoint of each chain holds the full
chunks and the newest — the one a resume or a deploy loads — sits at the end
of the longest chain. :func:`recode` turns a window of a lineage around: the
chosen checkpoint ``K`` gets every chunk standalone, its parent's chunks
become deltas against ``K``'s, the grandparent's against the parent's, and
so on for up to ``keyframe_every`` checkpoints (each chain still bounded by
the decode budget of :mod:`weightbank.format.planner`, which starts a new
keyframe where a link would break it). Older checkpoints keep the coding
they have.

Nothing but the location heads changes: a format-3 id covers the content
(tree, tensors, chunk hashes), not how a chunk is coded or where it lies
(:mod:`weightbank.format.stored`), so every id, tag and lineage link stays.
Each rewritten head is self-contained — it lists every link of every chain
its chunks need — so a head of either age is valid on its own, and a crash
between two rewrites leaves a mix of old and new heads that all load.

Rules that keep it exact:

* every chunk is decoded from its current coding and hash-checked before it
  is coded again, and a new chain is made of window chunks only, pointing
  from older to newer — no new coding can reach an old one, so no cycle;
* a delta whose base chunk (by hash) is still its base keeps its payload —
  the XOR is against the base's bytes, not its coding — and only its depth,
  cost and generation are recomputed, so turning a lineage around again one
  checkpoint later (a rekey after every save) writes two codings per chunk
  place, the new keyframe and one reverse delta, not the whole window;
* a chunk that is already standalone stays where it is unless a reverse
  delta is smaller (the planner's :data:`~weightbank.format.planner.DELTA_GAIN`
  rule); lossy chunks are never re-coded and never serve as bases;
* a chunk used by checkpoints outside the window is re-coded for the window
  only: the others keep their heads, and the old bytes stay live for them.

The caller (:func:`weightbank.bank.repack.repack`) holds the repack lock and
a lease, writes the release record for the packs the old heads named, and
rewrites the heads.

Example:
    >>> import torch, weightbank as wb
    >>> bank = wb.open("memory://")
    >>> states = [torch.randn(1 << 18)]  # 1 MiB; each step changes a few values
    >>> for s in range(1, 3): states.append(states[-1].clone()); states[-1][:100] += 1
    >>> ids = [bank.save({"w": w}, run="r", step=s).id for s, w in enumerate(states)]
    >>> [c.codec for c in bank.checkpoint("r@latest").manifest.chunks]  # a chain: step 0 holds the keyframe
    ['delta', 'delta', 'planes']
    >>> bank.repack(keyframe="r@latest").recoded
    3
    >>> [[c.codec for c in bank.checkpoint(i).manifest.chunks] for i in ids]  # turned around
    [['delta', 'delta', 'planes'], ['delta', 'planes'], ['planes']]
    >>> all(bank.load(i)["w"].equal(w) for i, w in zip(ids, states)), bank.checkpoint("r@latest").id == ids[-1]
    (True, True)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ..errors import CorruptObject, InvalidArgument, MissingObject
from ..format import planner
from ..format.delta import DELTA
from ..format.hashing import digest
from ..format.lossy import LOSSY_CODECS
from ..format.manifest import COMPACT_FORMAT, ChunkRecord, Manifest
from ..format.planes import layout_for, split
from ..format.planner import Base, link_cost, plan_chunk
from ..format.schema import DeltaArgs
from ..format.stored import is_compact
from ..storage.base import Storage
from .chunks import decode_record, records_by_hash
from .layout import manifest_key, trash_key
from .listing import read_compact

__all__ = ["Recoded", "Window", "chain_cost", "recode", "recoded_manifest", "rekey_window", "window"]

Place = tuple[str, str, tuple[int, ...] | None, tuple[int, ...], int]
"""(tensor name, dtype, shard offsets or None, shape, chunk index): where a chunk sits in a state."""
Append = Callable[[bytes, bool], tuple[str, int]]
"""Writes one payload into the repack's packs (``True``: a coding of the new keyframe, kept apart);
returns (pack key, offset)."""


@dataclass
class _Member:
    cid: str
    manifest: Manifest
    places: dict[Place, int]  # place → index into manifest.chunks
    index: dict[str, ChunkRecord]


@dataclass
class Window:
    """The checkpoints a recode turns around, newest (the new keyframe) first."""

    members: list[_Member] = field(default_factory=list)
    #: Members from this index on keep standalone chunks as they are (a rekey: a reverse delta was
    #: tried against the same base when they were the parent); None: every chunk is tried.
    settled_from: int | None = None
    #: Packs no checkpoint outside the window names (a rekey's: the packs of its block's saves and
    #: rekeys): once the recode moves some chunks out of one, the rest are copied out too, so it
    #: dies whole and gc frees it without a repack.
    replaceable: frozenset[str] = frozenset()

    @property
    def ids(self) -> list[str]:
        return [m.cid for m in self.members]


@dataclass
class Recoded:
    """What :func:`recode` decided: each chunk's new coding (hash → pack key and record), bytes written."""

    coded: dict[str, tuple[str, ChunkRecord]] = field(default_factory=dict)
    written: int = 0
    chunks_written: int = 0


def _places(m: Manifest) -> dict[Place, int]:
    out: dict[Place, int] = {}
    for t in m.tensors:
        if t.alias_of is not None:
            continue
        if t.shards:
            for s in t.shards:
                for j, c in enumerate(s.chunks):
                    out[(t.name, t.dtype, s.offsets, s.shape, j)] = c
        else:
            for j, c in enumerate(t.chunks):
                out[(t.name, t.dtype, None, t.shape, j)] = c
    return out


def window(storage: Storage, cid: str, span: int) -> Window:
    """``cid`` and up to ``span - 1`` of its ancestors (parent links), as long as they are format 3,
    have the same chunk size and are not being deleted."""
    out = Window()
    if not is_compact(storage.read(manifest_key(cid))):
        raise InvalidArgument(
            "keyframe",
            cid[:12],
            "a format-3 checkpoint (an older checkpoint's id covers where its chunks lie, so its coding stays)",
        )
    chunk_size: int | None = None
    nxt: str | None = cid
    while nxt is not None and len(out.members) < span and nxt not in out.ids:
        if storage.exists(trash_key(nxt)):
            break
        try:
            _, m = read_compact(storage, nxt)
        except MissingObject:
            break
        except CorruptObject:
            if nxt == cid:
                raise
            break  # a format-1/2 (or damaged) ancestor: the window ends here
        if m.format < COMPACT_FORMAT or (chunk_size is not None and m.chunk_size != chunk_size):
            break
        chunk_size = m.chunk_size
        out.members.append(_Member(nxt, m, _places(m), records_by_hash(m)))
        nxt = m.parent
    return out


def _content(m: Manifest) -> list[ChunkRecord]:
    return [m.chunks[i] for i in sorted({c for t in m.tensors for c in t.chunks})]


def chain_cost(m: Manifest) -> float:
    """What a load of ``m`` costs over a load of the same chunks as keyframes, in keyframe loads.

    The chains' decode cost summed in absolute terms across the whole
    checkpoint: each chunk's chain cost (in keyframe loads of that chunk,
    :func:`~weightbank.format.planner.link_cost`) times what its keyframe load
    costs (its bytes plus the fixed per-chunk cost), over the whole
    checkpoint's keyframe load. A long chain on a tiny tensor weighs what it
    costs the load, not what it costs relative to the tiny tensor.

    Example:
        >>> import torch, weightbank as wb
        >>> bank = wb.open("memory://")
        >>> _ = bank.save({"w": torch.randn(1 << 18)}, run="r")
        >>> chain_cost(bank.checkpoint("r@latest").manifest)
        0.0
    """
    rows = _content(m)
    total = sum(r.raw_len + planner.KEY_OVERHEAD for r in rows)
    spent = sum(
        r.args.cost * (r.raw_len + planner.KEY_OVERHEAD)
        for r in rows
        if r.codec == DELTA and r.args is not None
    )
    return spent / total if total else 0.0


def _is_keyframe(m: Manifest) -> bool:
    return all(r.codec != DELTA for r in _content(m))


def rekey_window(storage: Storage, cid: str, keyframe_every: int, budget: float) -> Window:
    """The window a rekey of ``cid`` turns around: ``cid`` and its run's open block behind it.

    A rekeyed lineage is a row of blocks, each a keyframe (its newest
    checkpoint) with reverse deltas behind it. The open block is the parent
    (its keyframe) and the reverse deltas behind it, back to the previous
    block's keyframe, which stays. When the block is full — ``keyframe_every``
    checkpoints, or its oldest would cost more than ``budget`` keyframe loads
    (:func:`chain_cost`) with one more link — ``cid`` starts a block of its own
    and the window is ``cid`` alone. A lineage saved with forward deltas is
    turned around whole the first time (up to ``keyframe_every`` checkpoints).
    """
    full = window(storage, cid, keyframe_every + 1)  # one more: where the open block ends
    if not full.members:
        raise InvalidArgument("ref", cid[:12], "a checkpoint that exists and is not being deleted")
    members = full.members[:2]
    rekeyed = len(members) > 1 and _is_keyframe(members[1].manifest)  # else forward deltas
    if not rekeyed and len(members) > 1 and _is_keyframe(members[0].manifest):
        members = members[:1]  # already a keyframe on a forward chain: nothing behind it to turn around
    for mem in full.members[len(members) :] if len(members) > 1 else ():
        if _is_keyframe(mem.manifest):
            if not rekeyed:
                members.append(mem)  # a forward chain ends at its keyframe: it is turned around too
            break  # else the previous block's keyframe: it stays
        members.append(mem)
    link = chain_cost(members[0].manifest)  # about what the parent's reverse link will cost
    if not rekeyed:
        members = members[:keyframe_every]
    elif len(members) > keyframe_every or chain_cost(members[-1].manifest) + link > budget:
        members = members[:1]
    # Packs the checkpoint just past the window names may be named by any older one: they stay.
    beyond = full.members[len(members)].manifest.packs if len(full.members) > len(members) else ()
    named = {p for mem in members for p in mem.manifest.packs}
    return Window(members, settled_from=2 if rekeyed else None, replaceable=frozenset(named - set(beyond)))


def _raw(storage: Storage, mem: _Member, rec: ChunkRecord) -> bytearray:
    """Chunk ``rec`` of ``mem`` decoded from its current coding, hash-checked."""
    out = bytearray(rec.raw_len)
    decode_record(storage, mem.manifest.packs, mem.index, rec, memoryview(out))
    actual = digest(out)
    if actual != rec.hash:
        key = mem.manifest.packs[rec.pack]
        raise CorruptObject(key, expected=rec.hash, actual=actual, checkpoint=mem.cid, detail="recode read")
    return out


@dataclass
class _Prev:
    """The newer window member's chunk at a place: what the next older one is coded against."""

    hash: str
    rec: ChunkRecord  # its new coding
    dtype: str
    raw: bytearray | None
    mem: _Member
    old: ChunkRecord

    def base(self, storage: Storage) -> Base:
        if self.raw is None:
            self.raw = _raw(storage, self.mem, self.old)
        planes: np.ndarray = split(memoryview(self.raw), layout_for(self.dtype))
        return Base(self.hash, self.rec.depth, planes, self.rec.cost, self.rec.gen)


def _kept(out: Recoded, mem: _Member, old: ChunkRecord, base: str) -> bool:
    """Whether ``old`` is a delta on ``base`` and ``base`` keeps the coding ``mem`` lists for it
    (then ``old``'s chain, depth and cost stand as they are: a second recode rewrites nothing)."""
    if old.args is None or old.args.base != base:
        return False
    row, new = mem.index.get(base), out.coded.get(base)
    if row is None or new is None:
        return False
    pkey, rec = new
    return pkey == mem.manifest.packs[row.pack] and dataclasses.replace(rec, pack=row.pack) == row


def _rebased(
    mem: _Member, old: ChunkRecord, cand: _Prev, gen: int, budget: float
) -> tuple[str, ChunkRecord] | None:
    """``old`` as it stands, with its chain position recomputed, if it is a delta on ``cand``'s content.

    A delta's payload is the XOR against its base's *bytes*, whatever coding the
    base has now, so when the base was re-coded (it became a reverse delta or a
    keyframe) only the depth, cost and generation change — nothing is written.
    None when it is not a delta on ``cand`` or its chain would now break the budget.
    """
    if old.codec != DELTA or old.args is None or old.args.base != cand.hash:
        return None
    cost = round(cand.rec.cost + link_cost(old.stored_len, old.raw_len), 4)
    if cost > budget:
        return None
    args = DeltaArgs(base=cand.hash, depth=cand.rec.depth + 1, cost=cost, gen=gen + 1)
    return mem.manifest.packs[old.pack], dataclasses.replace(old, args=args)


def recode(
    storage: Storage,
    win: Window,
    append: Append,
    *,
    keyframe_every: int,
    budget: float | None = None,
) -> Recoded:
    """Code the window's chunks newest first: standalone in the first member, reverse deltas behind it.

    ``budget``: the chains' decode budget (None: the planner's, as a save takes it).
    """
    if budget is None:
        budget = planner.CHAIN_BUDGET
    out = Recoded()
    settled = set() if win.settled_from is None else set(win.ids[win.settled_from :])
    order: dict[Place, None] = {}
    for mem in win.members:
        order.update(dict.fromkeys(mem.places))

    def keep(mem: _Member, rec: ChunkRecord) -> tuple[str, ChunkRecord]:
        return mem.manifest.packs[rec.pack], rec

    def code(
        mem: _Member, place: Place, prev: _Prev | None, root: _Prev | None
    ) -> tuple[_Prev | None, _Prev | None]:
        """Decide the coding of ``mem``'s chunk at ``place`` (``prev``: the newer member's chunk there,
        ``root``: the keyframe of its chain); the (prev, root) the next older member codes against."""
        dtype = place[1]
        idx = mem.places.get(place)
        if idx is None:
            return None, None  # the place is absent here: a chain across the gap would not be shorter
        old = mem.manifest.chunks[idx]
        raw: bytearray | None = None
        if old.hash in out.coded:
            new = out.coded[old.hash]
        elif old.codec in LOSSY_CODECS:
            out.coded[old.hash] = keep(mem, old)
            return None, None
        else:
            # The base a save would pick: the newer chunk here, or its chain's keyframe when
            # another link would break the decode budget (a two-link chain).
            cand, gen = None, 0
            if prev is not None and prev.rec.raw_len == old.raw_len and prev.rec.gen + 1 < keyframe_every:
                cand, gen = prev, prev.rec.gen
                last = link_cost(prev.rec.stored_len, prev.rec.raw_len) if prev.rec.codec == DELTA else 0.0
                if root is not None and prev.rec.cost + last > budget:
                    cand = root
            moved = None if cand is None else _rebased(mem, old, cand, gen, budget)
            if old.codec == DELTA and cand is not None and _kept(out, mem, old, cand.hash):
                new = keep(mem, old)  # already a delta on that base, which keeps its coding
            elif moved is not None:
                new = moved  # a delta on that base's content: the payload stands, its chain moved
            elif old.codec != DELTA and (cand is None or mem.cid in settled):
                # Standalone with no base to try (coding it again would give the same), or tried
                # against this base before, when it was the parent.
                new = keep(mem, old)
            else:
                raw = _raw(storage, mem, old)
                base = None if cand is None else dataclasses.replace(cand.base(storage), gen=gen)
                enc = plan_chunk(memoryview(raw), dtype, "auto", base, budget)
                if enc.codec != DELTA and old.codec != DELTA:
                    new = keep(mem, old)  # already standalone, and no reverse delta pays
                else:
                    payload = bytes(enc.payload)
                    pkey, offset = append(payload, mem is first)
                    out.written += len(payload)
                    out.chunks_written += 1
                    rec = ChunkRecord(old.hash, old.raw_len, enc.codec, -1, offset, len(payload), enc.args)
                    new = (pkey, rec)
            out.coded[old.hash] = new
        if new[1].codec in LOSSY_CODECS:
            return None, None
        prev = _Prev(old.hash, new[1], dtype, raw, mem, old)
        return prev, (prev if new[1].codec != DELTA else root)

    # The keyframe's chunks first, every one standalone: an older member may hold one of them at
    # another place (an alias, a moved tensor), and coding it there first would make it a delta.
    first = win.members[0]
    for place in order:
        if place in first.places:
            code(first, place, None, None)
    for place in order:
        prev: _Prev | None = None
        root: _Prev | None = None
        for mem in win.members:
            prev, root = code(mem, place, prev, root)
    _empty_packs(storage, win, out, append)
    return out


def _empty_packs(storage: Storage, win: Window, out: Recoded, append: Append) -> None:
    """Copy the chunks kept in a replaceable pack the recode moved others out of (see :class:`Window`).

    The copies go with the reverse deltas, not with the new keyframe's codings
    (which the next rekey replaces): a chunk that does not change — a frozen
    backbone under a fine-tuned head — is copied once, not at every rekey.
    """
    kept: dict[str, dict[str, ChunkRecord]] = {}
    emptied: set[str] = set()
    for mem in win.members:
        for rec in mem.manifest.chunks:
            pkey = mem.manifest.packs[rec.pack]
            new = out.coded.get(rec.hash)
            if pkey not in win.replaceable or new is None:
                continue  # a row the recode did not decide keeps its place, and its pack lives
            if new[0] == pkey and new[1].offset == rec.offset:
                kept.setdefault(pkey, {})[rec.hash] = new[1]
            else:
                emptied.add(pkey)
    for pkey in sorted(emptied):
        for h, rec in kept.get(pkey, {}).items():
            payload = storage.read(pkey, rec.offset, rec.stored_len)
            if len(payload) != rec.stored_len:
                raise CorruptObject(
                    pkey, detail=f"pack ends before the chunk at {rec.offset} (+{rec.stored_len})"
                )
            at, offset = append(payload, False)  # with the reverse deltas: the next rekey leaves them
            out.written += len(payload)
            out.chunks_written += 1
            out.coded[h] = (at, dataclasses.replace(rec, pack=-1, offset=offset))


def recoded_manifest(m: Manifest, coded: dict[str, tuple[str, ChunkRecord]]) -> Manifest | None:
    """``m`` with the new codings of its chunks (and every base they name); None if nothing changed.

    Rows the recode did not decide keep their current coding and chains.
    """
    used = sorted({c for t in m.tensors for c in t.chunks})
    n_content = len(used)
    if used != list(range(n_content)):
        raise CorruptObject(manifest_key("?"), detail="manifest chunk table is not in stored order")
    old = records_by_hash(m)
    packs: dict[str, int] = {}
    rows: list[ChunkRecord] = []
    listed: set[str] = set()

    def place(h: str) -> tuple[str, ChunkRecord]:
        if h in coded:
            return coded[h]
        rec = old.get(h)
        if rec is None:
            raise CorruptObject("<recode>", detail=f"delta base {h[:12]} is in no table")
        return m.packs[rec.pack], rec

    def add(pkey: str, rec: ChunkRecord) -> None:
        rows.append(dataclasses.replace(rec, pack=packs.setdefault(pkey, len(packs))))
        listed.add(rec.hash)

    for rec in m.chunks[:n_content]:
        add(*place(rec.hash))
    i = 0
    while i < len(rows):  # close over the chains: every base a listed delta names, once
        args = rows[i].args
        if args is not None and args.base not in listed:
            add(*place(args.base))
        i += 1
    new = dataclasses.replace(m, packs=tuple(packs), chunks=tuple(rows))
    same = new.packs == m.packs and new.chunks == m.chunks
    return None if same else new
