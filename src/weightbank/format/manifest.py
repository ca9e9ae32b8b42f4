"""The manifest: one immutable JSON document per checkpoint.

A checkpoint's id is the BLAKE3 hash of its manifest bytes, so a manifest is
verified by its own name, and two manifests never collide. It records who made
the checkpoint and why (run, step, parent, metrics, config, message, meta, env),
the state's structure (the JSON tree of :mod:`weightbank.format.tree`), each
tensor (name, dtype, shape, which chunks), and where every chunk lives::

    chunks: [[hash, raw_len, codec, pack_index, offset, stored_len, args?], ...]

``args`` is the codec's slot for its parameters (a delta's ``base`` hash, its
chain ``depth`` in links, its decode ``cost`` and ``gen``, the generations since
its keyframe), so new codecs need no format change. A delta's base chain is
always listed in the same table. ``lossy`` (present only for a checkpoint
saved with a lossy codec) maps each quantized tensor to its codec and measured
``max_abs`` and relative L2 error ``rel_err``. ``format`` is bumped only for
changes an older reader would misread; such readers refuse with
UnsupportedFormat.

Example:
    >>> from weightbank.format.manifest import Manifest
    >>> m = Manifest(run="r", step=1, parent=None, created=0.0)
    >>> Manifest.from_bytes(m.to_bytes(), "x").run
    'r'
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import blake3

from ..errors import CorruptObject, UnsupportedFormat
from .chunking import DEFAULT_CHUNK_SIZE
from .dtypes import itemsize
from .jsonsafe import decode

__all__ = ["FORMAT_VERSION", "ChunkRecord", "Manifest", "TensorRecord"]

#: Version of the manifest and bank layout this code writes and the newest it reads.
FORMAT_VERSION = 1


@dataclass(frozen=True)
class ChunkRecord:
    """Where one chunk lives and how it is coded."""

    hash: str
    raw_len: int
    codec: str
    pack: int
    offset: int
    stored_len: int
    args: dict[str, Any] | None = None

    def to_json(self) -> list[Any]:
        row: list[Any] = [self.hash, self.raw_len, self.codec, self.pack, self.offset, self.stored_len]
        if self.args:
            row.append(self.args)
        return row


@dataclass(frozen=True)
class TensorRecord:
    """One tensor of the state: name, dtype, shape and its chunks (indices into ``Manifest.chunks``)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    chunks: tuple[int, ...] = ()
    alias_of: int | None = None
    numpy: bool = False

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * itemsize(self.dtype)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}
        if self.alias_of is not None:
            out["alias_of"] = self.alias_of
        else:
            out["chunks"] = list(self.chunks)
        if self.numpy:
            out["numpy"] = True
        return out


@dataclass(frozen=True)
class Manifest:
    """Everything about one checkpoint except the tensor bytes themselves."""

    run: str
    step: int | None
    parent: str | None
    created: float
    message: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    env: dict[str, Any] = field(default_factory=dict)
    tree: dict[str, Any] = field(default_factory=lambda: {"d": []})
    tensors: tuple[TensorRecord, ...] = ()
    chunk_size: int = DEFAULT_CHUNK_SIZE
    packs: tuple[str, ...] = ()
    chunks: tuple[ChunkRecord, ...] = ()
    lossy: dict[str, Any] = field(default_factory=dict)
    format: int = FORMAT_VERSION

    # -- derived -----------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Logical bytes of every tensor (aliases counted once)."""
        return sum(t.nbytes for t in self.tensors if t.alias_of is None)

    @property
    def stored_bytes(self) -> int:
        """Bytes this checkpoint's chunks occupy in packs (shared chunks counted in full)."""
        return sum(c.stored_len for c in self.chunks)

    def content_key(self, index: int) -> str:
        """A key equal for two tensors exactly when their dtype, shape and bytes are equal.

        Derived from chunk hashes, so it costs no I/O: the serving pool keys
        resident tensors by it to hold shared tensors once.
        """
        t = self.tensors[index]
        base = self.tensors[t.alias_of] if t.alias_of is not None else t
        parts = [t.dtype, ",".join(map(str, t.shape)), *(self.chunks[c].hash for c in base.chunks)]
        return blake3.blake3("|".join(parts).encode()).hexdigest()

    def decoded_metrics(self) -> dict[str, Any]:
        return dict(decode(self.metrics))

    def decoded_config(self) -> dict[str, Any]:
        return dict(decode(self.config))

    def decoded_meta(self) -> dict[str, Any]:
        return dict(decode(self.meta))

    # -- bytes -------------------------------------------------------------
    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": self.format,
            "run": self.run,
            "step": self.step,
            "parent": self.parent,
            "created": self.created,
            "message": self.message,
            "metrics": self.metrics,
            "config": self.config,
            "meta": self.meta,
            "env": self.env,
            "tree": self.tree,
            "chunk_size": self.chunk_size,
            "tensors": [t.to_json() for t in self.tensors],
            "packs": list(self.packs),
            "chunks": [c.to_json() for c in self.chunks],
        }
        if self.lossy:
            out["lossy"] = self.lossy
        return out

    def to_bytes(self) -> bytes:
        return json.dumps(self.to_json(), separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode()

    @classmethod
    def from_bytes(cls, data: bytes, key: str) -> Manifest:
        """Parse and validate; CorruptObject for anything malformed, UnsupportedFormat if too new."""
        try:
            obj = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptObject(key, detail=f"manifest is not valid JSON ({e})") from None
        if not isinstance(obj, dict):
            raise CorruptObject(key, detail="manifest is not a JSON object")
        fmt = obj.get("format")
        if isinstance(fmt, int) and not isinstance(fmt, bool) and fmt > FORMAT_VERSION:
            raise UnsupportedFormat(key, fmt, FORMAT_VERSION)
        try:
            return cls._parse(obj)
        except (KeyError, TypeError, ValueError, IndexError) as e:
            raise CorruptObject(key, detail=f"manifest is malformed ({type(e).__name__}: {e})") from None

    @classmethod
    def _parse(cls, obj: dict[str, Any]) -> Manifest:
        def typed(value: Any, kind: type | tuple[type, ...], what: str) -> Any:
            if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
                raise TypeError(f"{what} has the wrong type")
            return value

        chunks = []
        for row in typed(obj["chunks"], list, "chunks"):
            typed(row, list, "chunk")
            if len(row) not in (6, 7):
                raise ValueError("chunk rows have 6 or 7 fields")
            chunks.append(
                ChunkRecord(
                    hash=typed(row[0], str, "chunk hash"),
                    raw_len=typed(row[1], int, "raw_len"),
                    codec=typed(row[2], str, "codec"),
                    pack=typed(row[3], int, "pack"),
                    offset=typed(row[4], int, "offset"),
                    stored_len=typed(row[5], int, "stored_len"),
                    args=typed(row[6], dict, "codec args") if len(row) == 7 else None,
                )
            )
        packs = tuple(typed(p, str, "pack") for p in typed(obj["packs"], list, "packs"))
        for c in chunks:
            if not 0 <= c.pack < len(packs) or c.offset < 0 or c.stored_len < 0 or c.raw_len < 0:
                raise ValueError(f"chunk {c.hash[:12]} points outside its pack table")
        tensors = []
        for i, t in enumerate(typed(obj["tensors"], list, "tensors")):
            typed(t, dict, "tensor")
            shape = tuple(typed(d, int, "shape") for d in typed(t["shape"], list, "shape"))
            if any(d < 0 for d in shape):
                raise ValueError("negative dimension")
            alias = t.get("alias_of")
            if alias is not None and not (0 <= typed(alias, int, "alias_of") < i):
                raise ValueError("alias_of must name an earlier tensor")
            idx = tuple(typed(c, int, "chunk index") for c in t.get("chunks", []))
            if any(not 0 <= c < len(chunks) for c in idx):
                raise ValueError("chunk index out of range")
            rec = TensorRecord(
                name=typed(t["name"], str, "name"),
                dtype=typed(t["dtype"], str, "dtype"),
                shape=shape,
                chunks=idx,
                alias_of=alias,
                numpy=bool(t.get("numpy", False)),
            )
            if alias is None and sum(chunks[c].raw_len for c in idx) != rec.nbytes:
                raise ValueError(f"chunks of {rec.name!r} do not add up to its size")
            tensors.append(rec)
        step = obj.get("step")
        return cls(
            format=typed(obj["format"], int, "format"),
            run=typed(obj["run"], str, "run"),
            step=None if step is None else typed(step, int, "step"),
            parent=None if obj.get("parent") is None else typed(obj["parent"], str, "parent"),
            created=float(typed(obj["created"], (int, float), "created")),
            message=typed(obj.get("message", ""), str, "message"),
            metrics=typed(obj.get("metrics", {}), dict, "metrics"),
            config=typed(obj.get("config", {}), dict, "config"),
            meta=typed(obj.get("meta", {}), dict, "meta"),
            env=typed(obj.get("env", {}), dict, "env"),
            tree=typed(obj["tree"], dict, "tree"),
            chunk_size=typed(obj["chunk_size"], int, "chunk_size"),
            tensors=tuple(tensors),
            packs=packs,
            chunks=tuple(chunks),
            lossy=typed(obj.get("lossy", {}), dict, "lossy"),
        )
