"""XOR delta chains: decoding a chunk stored as XOR against its parent's chunk.

A ``delta`` chunk's payload is a plane payload (:mod:`.planes`) of its words
XOR the base chunk's words; its manifest args are a
:class:`~weightbank.format.schema.DeltaArgs`: the ``base`` (another chunk
listed in the same manifest), ``depth`` (the delta links above the chain's
keyframe, a chunk in any standalone codec), the chain's decode ``cost`` and
``gen``. The writer bounds them, so a restore reads at most
``keyframe_every`` links.

Because rotating and splitting words into planes is a bit permutation, XOR
commutes with it: a chain is decoded in plane space — the keyframe's planes,
then each link's planes XORed in (a sparse link touches only its changed
words) — and merged back into words once. Only the final bytes need hashing:
any damaged link changes them, so the chunk hash catches it.

Example:
    >>> import numpy as np
    >>> from weightbank.format.delta import chain_planes, decode_chain
    >>> from weightbank.format.planes import layout_for, encode_xor, split
    >>> lay = layout_for("float32")
    >>> a = np.arange(256, dtype=np.float32); b = a + 1
    >>> link = encode_xor(memoryview(b.tobytes()), split(memoryview(a.tobytes()), lay), lay)
    >>> out = bytearray(1024); decode_chain([("raw", memoryview(a.tobytes())), ("delta", memoryview(link))], lay, memoryview(out))
    >>> bytes(out) == b.tobytes()
    True
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ..errors import CorruptObject
from .codecs import get_codec
from .planes import WordLayout, decode_planes_into, decode_scratch, merge, read_layout, split

__all__ = ["DELTA", "chain_planes", "decode_chain", "delta_layout"]

#: The codec name of XOR delta chunks.
DELTA = "delta"

Link = tuple[str, memoryview]
"""(codec name, stored payload) of one chain link; the keyframe first."""


def delta_layout(links: Sequence[Link]) -> WordLayout:
    """The word layout the chain's delta links were coded with (all must agree)."""
    lays = {read_layout(payload)[0] for codec, payload in links[1:] if codec == DELTA}
    if len(lays) != 1:
        raise CorruptObject("<chunk>", detail=f"delta chain links disagree on their word layout ({lays})")
    return lays.pop()


def chain_planes(
    links: Sequence[Link], lay: WordLayout, raw_len: int, acc: np.ndarray | None = None
) -> np.ndarray:
    """The planes of the chunk at the end of ``links`` (keyframe first, then delta links, oldest first).

    ``acc``: a ``(itemsize, words)`` uint8 array to build them in (else a fresh one).
    """
    if not links:
        raise ValueError("a chain has at least its keyframe")
    words = raw_len // lay.itemsize
    codec, payload = links[0]
    if codec == DELTA:
        raise CorruptObject("<chunk>", detail="delta chain does not start at a keyframe")
    if acc is None:
        acc = np.empty((lay.itemsize, words), dtype=np.uint8)
    if codec in ("planes", "sparse") and read_layout(payload)[0] == lay:
        decode_planes_into(payload, acc, lay, xor=False)
    else:
        scratch = bytearray(raw_len)
        get_codec(codec).decode(payload, memoryview(scratch))
        split(memoryview(scratch), lay, acc)
    for codec, payload in links[1:]:
        if codec != DELTA:
            raise CorruptObject("<chunk>", detail=f"delta chain has a {codec!r} link above its keyframe")
        decode_planes_into(payload, acc, lay, xor=True)
    return acc


def decode_chain(links: Sequence[Link], lay: WordLayout | None, out: memoryview) -> None:
    """Decode the chunk at the end of ``links`` into ``out`` (the caller verifies its hash)."""
    if len(links) == 1:
        codec, payload = links[0]
        get_codec(codec).decode(payload, out)
        return
    lay = lay or delta_layout(links)
    if len(out) % lay.itemsize:
        raise CorruptObject("<chunk>", detail=f"{len(out)} bytes are not whole {lay.itemsize}-byte words")
    merge(chain_planes(links, lay, len(out), decode_scratch(lay, len(out))), lay, out)
