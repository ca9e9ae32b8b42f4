"""Choosing each chunk's codec: smallest lossless coding that pays off, delta when it wins.

Policy (every threshold measured on real fine-tune checkpoints, see
``benchmarks/RESULTS.md``):

* chunks under :data:`MIN_CODED` bytes, and any chunk whose coding would not
  save :data:`~.planes.MIN_SAVING` of its size, are stored ``raw`` — no decode
  cost, and local loads map them;
* words of 2+ bytes (floats, wide ints) get byte planes (``planes``, or
  ``sparse`` when mostly zero words); 1-byte data gets plain ``zstd``;
* given a base chunk (the parent checkpoint's chunk at the same place, or the
  keyframe of its chain — the writer picks), the XOR delta is coded too and
  kept when it is at most :data:`DELTA_GAIN` of the standalone size — a chain
  link must pay for the decode time it adds — and when the chain's decode cost
  stays within :data:`CHAIN_BUDGET`.

Chain cost: decoding a delta link costs about its stored bytes (zstd's
Huffman decoding dominates; merging and hashing are paid once per chain) plus
a fixed overhead, and loading the chunk as a keyframe costs its raw bytes plus
about the same fixed overhead (a read, a record, headers, the hash, the copy
out: measured 110-150 µs per chunk and per link alike, see
``benchmarks/RESULTS.md``, "Delta chains"). So a link's cost, in keyframe
loads of its chunk, is ``(stored + LINK_OVERHEAD) / (raw + KEY_OVERHEAD)``
and a chain's is the sum over its links. Charging the fixed cost on both
sides prices a link of a tiny tensor at about one keyframe load of it (what
it costs), not at dozens (what charging it against the raw bytes alone
said, which re-keyframed every small tensor at every save). The budget
bounds what a chain-end load costs over a keyframe load whatever the data:
tiny bf16 deltas make long chains, fp32 deltas (a third to half of the
chunk) short ones. Across a whole checkpoint the same units add up in
absolute terms (:func:`weightbank.bank.recode.chain_cost`), which is how a
rekey bounds its blocks.

For the checkpoint people load most — the newest, to resume or deploy —
forward chains are the wrong way round: it sits at the end of the longest
chain. :meth:`weightbank.Bank.rekey` (``CheckpointManager(rekey=True)``)
turns each save around: the new checkpoint becomes the keyframe, its parent a
reverse delta against it, so every delta is against the adjacent checkpoint
(no star deltas growing with drift) and the chain cost falls on older
checkpoints, bounded per block. When another
link would break the budget, the writer codes the chunk against its chain's
keyframe instead (a two-link chain; measured on MiniLM fp32, that delta is
5-15% larger than one against the parent and still over 2× smaller than a
keyframe). ``keyframe_every`` caps the generations since
the keyframe on top of it.

Example:
    >>> import numpy as np
    >>> from weightbank.format.planner import plan_chunk
    >>> plan_chunk(memoryview(np.zeros(4096, np.float32).tobytes()), "float32").codec
    'sparse'
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .codecs import ZstdCodec
from .delta import DELTA
from .planes import MIN_SAVING, encode_planes, encode_xor, is_sparse, layout_for
from .schema import DeltaArgs

__all__ = [
    "CHAIN_BUDGET",
    "DELTA_GAIN",
    "KEY_OVERHEAD",
    "LINK_OVERHEAD",
    "MIN_CODED",
    "MODES",
    "Base",
    "Encoded",
    "link_cost",
    "plan_chunk",
]

#: Codec choices a caller can make for a save (``auto`` = planes + deltas).
MODES = ("auto", "planes", "zstd", "raw")
#: Chunks smaller than this are stored raw: headers and call overhead would eat the gain.
MIN_CODED = 256
#: A delta is kept when at most this fraction of the standalone coding.
DELTA_GAIN = 0.95
#: A delta this small (fraction of the raw size) is kept without trying the standalone coding.
DELTA_SURE = 0.25
#: Most a chain's delta links may cost to decode, in raw-chunk units (see above).
#: Measured on 10-step MiniLM fine-tunes (benchmarks/RESULTS.md, "chain budget
#: sweep"; fp32 / bf16 weights, × smaller than safetensors, chain-end load vs
#: keyframe load): 0.35 → 1.9× / 5.6×, chain ends 1.2× / 1.05×; 1.0 → 2.5× / 11.5×,
#: 1.4-1.7× / 1.6×; unbounded → 2.7× / 12×, 4-6× / 2.3×. 1.0 keeps every size
#: target of issue #3 with the smallest chain-end cost that does.
CHAIN_BUDGET = 1.0
#: Fixed cost of decoding one more link (a read, headers, a few zstd frames, the
#: sparse positions), in bytes of stored payload: measured 80-140 µs per link
#: and chunk for chunks of 2 KiB to 64 KiB, what ~128 KiB of decoding takes.
LINK_OVERHEAD = 128 << 10
#: Fixed cost of loading one chunk as a keyframe (a read, its record, the hash,
#: the copy into the tensor), in the same units: measured 110-150 µs per chunk.
KEY_OVERHEAD = 128 << 10


def link_cost(stored: int, raw: int) -> float:
    """Decode cost of one delta link of ``stored`` bytes for a ``raw``-byte chunk, in keyframe loads of it.

    Example:
        >>> round(link_cost(1 << 20, 4 << 20), 3), round(link_cost(1 << 10, 2 << 10), 3)
        (0.273, 0.992)
    """
    return (stored + LINK_OVERHEAD) / (max(0, raw) + KEY_OVERHEAD)


_zstd = ZstdCodec(level=3, min_saving=MIN_SAVING)


@dataclass(frozen=True)
class Base:
    """A chunk to code a delta against: its hash, chain depth, cost and generation, and its planes."""

    hash: str
    depth: int
    planes: np.ndarray
    cost: float = 0.0
    gen: int = 0  # generations since the chain's keyframe (a star delta skips some)


@dataclass(frozen=True)
class Encoded:
    """How one chunk will be stored: codec, payload (the raw bytes for ``raw``) and codec args."""

    codec: str
    payload: bytes | memoryview
    args: DeltaArgs | None = None


def _standalone(raw: memoryview, dtype: str, mode: str) -> Encoded:
    limit = len(raw) * (1.0 - MIN_SAVING)
    lay = layout_for(dtype)
    if mode == "zstd" or (mode in ("auto", "planes") and lay.itemsize == 1):
        z = _zstd.encode(raw)
        return Encoded("raw", raw) if z is None else Encoded("zstd", z)
    payload = encode_planes(raw, lay)
    if len(payload) > limit:
        return Encoded("raw", raw)
    return Encoded("sparse" if is_sparse(payload) else "planes", payload)


def plan_chunk(
    raw: memoryview,
    dtype: str,
    mode: str = "auto",
    base: Base | None = None,
    budget: float = CHAIN_BUDGET,
) -> Encoded:
    """The coding of one chunk of a ``dtype`` tensor (``base``: the parent's chunk, for a delta).

    ``mode`` is one of :data:`MODES`; deltas are tried only in ``auto`` mode,
    and kept only while the chain's cost stays within ``budget``.
    """
    if mode not in MODES:
        raise ValueError(f"codec mode must be one of {MODES}, not {mode!r}")
    if mode == "raw" or len(raw) < MIN_CODED:
        return Encoded("raw", raw)
    delta: Encoded | None = None
    if mode == "auto" and base is not None:
        payload = encode_xor(raw, base.planes, layout_for(dtype))
        cost = round(base.cost + link_cost(len(payload), len(raw)), 4)
        if cost <= budget:
            args = DeltaArgs(base=base.hash, depth=base.depth + 1, cost=cost, gen=base.gen + 1)
            delta = Encoded(DELTA, payload, args)
            if len(payload) <= len(raw) * DELTA_SURE:
                return delta
    alone = _standalone(raw, dtype, mode)
    if delta is not None and len(delta.payload) <= len(alone.payload) * DELTA_GAIN:
        return delta
    return alone
