"""The consistency checks of a :class:`~weightbank.bank.parts.SavePart`: what makes one safe to commit.

A part may come from another process, through any channel (its JSON), so a
commit trusts none of it: keys must be the keys a save makes, every record
must point inside its tables, and each tensor's chunks must add up to its
bytes. A part that passes makes a manifest that every reader accepts (the
chunk bytes themselves are checked by their hashes when read).

Example:
    >>> import torch, weightbank as wb
    >>> from weightbank.bank.part_checks import part_problem
    >>> part_problem(wb.open("memory://").save_part({"b": torch.ones(3)})) is None
    True
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

from ..format.codecs import CODECS
from ..format.delta import DELTA
from ..format.dtypes import SUPPORTED
from ..format.hashing import is_digest
from .layout import is_pack_key

if TYPE_CHECKING:
    from .parts import SavePart

__all__ = ["part_problem"]

#: What ``write_part`` names a save (and so a lease and its packs): hex digits, in practice.
_SAVE_ID = re.compile(r"[0-9A-Za-z_-]{1,128}")


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def part_problem(part: SavePart) -> str | None:
    """What is inconsistent in ``part``, or None.

    Example:
        >>> import torch, weightbank as wb
        >>> part = wb.open("memory://").save_part({"b": torch.ones(3)})
        >>> part_problem(part) is None
        True
    """
    if not isinstance(part.save_id, str) or not _SAVE_ID.fullmatch(part.save_id):
        return f"save id {part.save_id!r} is not one a save makes"
    size = part.chunk_size
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
        return f"chunk_size {size!r} is not a positive int"
    bad = [k for k in part.packs if not isinstance(k, str) or not is_pack_key(k)]
    if bad:
        return f"{bad[0]!r} is not a pack key"
    hashes = {c.hash for c in part.chunks}
    for c in part.chunks:
        if not is_digest(c.hash) or c.codec not in CODECS:
            return f"chunk {c.hash[:12]!r} has a malformed hash or an unknown codec {c.codec!r}"
        if not 0 <= c.pack < len(part.packs) or min(c.offset, c.raw_len, c.stored_len) < 0:
            return f"chunk {c.hash[:12]} points outside its pack table"
        if c.codec == DELTA and (c.args is None or c.args.base not in hashes):
            return f"delta chunk {c.hash[:12]} does not list its base in the part"
    for t in part.tensors:
        if t.dtype not in SUPPORTED:
            return f"tensor {t.name!r} has dtype {t.dtype!r}, which this torch build does not have"
        if any(d < 0 for d in t.shape) or any(not 0 <= c < len(part.chunks) for c in t.chunks):
            return f"tensor {t.name!r} has a negative dimension or a chunk index out of range"
        if t.alias_of is not None:
            if t.chunks or t.offsets is not None:
                return f"tensor {t.name!r} shares memory with {t.alias_of!r} but has chunks or a box"
            continue
        if (t.offsets is None) != (t.whole is None):
            return f"tensor {t.name!r} has offsets without a whole shape, or the reverse"
        if t.offsets is not None and t.whole is not None:
            dims = {len(t.offsets), len(t.whole), len(t.shape)}
            if len(dims) != 1 or any(
                o < 0 or w < 0 or o + n > w for o, n, w in zip(t.offsets, t.shape, t.whole, strict=True)
            ):
                return f"a box {list(t.shape)} at {list(t.offsets)} lies outside {t.name!r} {list(t.whole)}"
        got = sum(part.chunks[c].raw_len for c in t.chunks)
        want = _numel(t.shape) * SUPPORTED[t.dtype].itemsize
        if got != want:
            return f"the chunks of {t.name!r} hold {got} bytes, its shape and dtype {want}"
    return _stats_problem(part)


def _stats_problem(part: SavePart) -> str | None:
    """What is wrong with the part's lossy summaries or save stats (a commit adds them up), or None."""
    names = {t.name for t in part.tensors}
    for name, sums in part.lossy.items():
        numbers = [sums.max_abs, sums.sq_err, sums.sq_ref]
        if name not in names or not all(0 <= x < math.inf for x in numbers):
            return f"the lossy summary of {name!r} is not one a save makes"
    s = part.stats
    counts = [s.written_bytes, s.reused_bytes, s.new_chunks, s.reused_chunks, s.packs, *s.per_codec.values()]
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in counts) or not (
        isinstance(s.seconds, (int, float)) and 0 <= s.seconds < math.inf
    ):
        return "its save stats are not counts"
    return None
