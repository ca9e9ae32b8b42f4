"""DCP's checkpoint ``Metadata`` as JSON, and as it follows from a manifest — never pickled.

DCP's own ``FileSystemWriter`` pickles its ``.metadata`` file; weightbank keeps
it in the manifest as JSON instead, and usually does not need to keep it at
all: what DCP calls the state dict's metadata — each flattened key (fqn),
whether it is a tensor (dtype, global size, the boxes it was saved in) or an
opaque value, and the path of nested keys it came from — is exactly what a
manifest already records in its tree and tensor table. So a checkpoint saved
through :class:`weightbank.dcp.Writer` stores only ``meta["dcp"] = {"version":
..., "world_size": N}``, and :func:`metadata_of` rebuilds the ``Metadata``
from the manifest. That is also why any checkpoint in a bank — one made by
``bank.save`` too — can be loaded with ``dcp.load`` and resharded.

When a custom planner makes metadata the manifest cannot reproduce (its own
``planner_data``, keys that are not paths of the state), the whole
``Metadata`` is stored as JSON (:func:`metadata_to_json`) with the path of
every key, and read back from there.

The key walk mirrors ``torch.distributed.checkpoint``'s state-dict flattening:
dicts are always entered, lists only when they hold a tensor or a dict, tuples
and other values are leaves.

Example:
    >>> import torch
    >>> from weightbank.format.tree import flatten
    >>> spec, _ = flatten({"model": {"w": torch.ones(2)}, "step": 3, "betas": (0.9, 0.99)})
    >>> [(fqn, kind) for fqn, _, kind, _ in dcp_entries(spec)]
    [('model.w', 'tensor'), ('step', 'value'), ('betas', 'value')]
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    TensorProperties,
    TensorStorageMetadata,
)

from ..errors import IncompatibleState, InvalidState
from ..format.dtypes import dtype_from_name, dtype_name
from ..format.manifest import Manifest
from ..format.tree import child, dict_items, flatten, node_kind, seq_items, tensor_index, unflatten

__all__ = [
    "Entry",
    "dcp_entries",
    "metadata_from_json",
    "metadata_of",
    "metadata_to_json",
    "node_at",
    "same_metadata",
]

Path = tuple[str | int, ...]
Entry = tuple[str, Path, str, dict[str, Any]]
"""(fqn, path of keys, ``"tensor"`` or ``"value"``, the tree node)."""


def _terminal(node: dict[str, Any]) -> bool:
    """DCP's rule: a dict is never a leaf; a list is one unless it holds a tensor or a non-leaf container."""
    kind = node_kind(node)
    if kind == "d":
        return False
    if kind == "l":
        for entry in seq_items(node) or []:
            if node_kind(entry) == "T":
                return False
            if node_kind(entry) in "dl" and not _terminal(entry):
                return False
    return True


def _walk(path: Path, node: dict[str, Any]) -> Iterator[tuple[Path, dict[str, Any]]]:
    items = dict_items(node)
    if items is not None:
        for key, sub in items:
            yield from _walk((*path, str(key)), sub)
    elif _terminal(node):
        yield path, node
    else:
        for i, sub in enumerate(seq_items(node) or []):
            yield from _walk((*path, i), sub)


def dcp_entries(tree: dict[str, Any]) -> list[Entry]:
    """The keys DCP sees in a state with this tree, in order (IncompatibleState if DCP could not hold it)."""
    if "d" not in tree:
        raise IncompatibleState("a checkpoint loaded through DCP must hold a dict at its root")
    out: list[Entry] = []
    seen: set[str] = set()
    for path, node in _walk((), tree):
        fqn = ".".join(map(str, path))
        if fqn in seen:
            raise IncompatibleState(f"two entries of the checkpoint flatten to the DCP key {fqn!r}", [fqn])
        seen.add(fqn)
        out.append((fqn, path, "tensor" if node_kind(node) == "T" else "value", node))
    return out


def node_at(tree: dict[str, Any], path: Path) -> dict[str, Any]:
    """The tree node at ``path`` (dict keys compared as DCP does, by ``str``); IncompatibleState if none."""
    node: dict[str, Any] | None = tree
    for key in path:
        node = child(node, key) if node is not None else None
    if node is None:
        raise IncompatibleState(f"the checkpoint holds nothing at the DCP path {list(path)[:8]}")
    return node


def _tensor_md(m: Manifest, index: int) -> TensorStorageMetadata:
    rec = m.tensors[index]
    base = m.tensors[rec.alias_of] if rec.alias_of is not None else rec
    boxes = [(s.offsets, s.shape) for s in base.shards] or [((0,) * len(rec.shape), rec.shape)]
    return TensorStorageMetadata(
        properties=TensorProperties(dtype=dtype_from_name(rec.dtype)),
        size=torch.Size(rec.shape),
        chunks=[ChunkStorageMetadata(offsets=torch.Size(o), sizes=torch.Size(s)) for o, s in boxes],
    )


def metadata_of(m: Manifest) -> tuple[Metadata, dict[str, Path]]:
    """DCP's ``Metadata`` for a manifest, and the tree path of every key.

    Stored JSON metadata is used when the checkpoint has some; otherwise it
    follows from the tree and tensor table.
    """
    dcp = m.decoded_meta().get("dcp")
    stored = dcp.get("metadata") if isinstance(dcp, dict) else None
    version = dcp.get("version") if isinstance(dcp, dict) else None
    if stored is not None and isinstance(dcp, dict):
        md = metadata_from_json(stored)
        paths = {str(k): tuple(v) for k, v in dict(dcp.get("paths", {})).items()}
        return md, paths
    entries = dcp_entries(m.tree)
    sd: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
    for fqn, _, kind, node in entries:
        index = tensor_index(node)
        sd[fqn] = _tensor_md(m, index) if kind == "tensor" and index is not None else BytesStorageMetadata()
    paths = {fqn: path for fqn, path, _, _ in entries}
    return Metadata(state_dict_metadata=sd, planner_data=dict(paths), version=version), paths


def metadata_to_json(md: Metadata) -> dict[str, Any]:
    """A JSON-safe form of DCP ``Metadata`` (``storage_data`` and ``storage_meta`` are not kept).

    ``planner_data`` must be JSON-safe (tuples and int keys survive); anything
    else is refused with InvalidState rather than pickled.

    Example:
        >>> from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata
        >>> md = Metadata({"step": BytesStorageMetadata()}, planner_data={"step": ("step",)}, version="1")
        >>> metadata_from_json(metadata_to_json(md)) == md
        True
    """
    sd: dict[str, Any] = {}
    for fqn, item in md.state_dict_metadata.items():
        if isinstance(item, TensorStorageMetadata):
            sd[fqn] = {
                "dtype": dtype_name(item.properties.dtype, fqn),
                "size": list(item.size),
                "chunks": [[list(c.offsets), list(c.sizes)] for c in item.chunks],
            }
        elif isinstance(item, BytesStorageMetadata):
            sd[fqn] = {}
        else:
            raise InvalidState(fqn, f"unknown DCP storage metadata {type(item).__name__}")
    planner, leaves = flatten(md.planner_data)
    if leaves:
        raise InvalidState("planner_data", "the planner's data holds tensors; it must be JSON-safe")
    return {"version": md.version, "state_dict_metadata": sd, "planner_data": planner}


def metadata_from_json(obj: Any) -> Metadata:
    """Inverse of :func:`metadata_to_json` (IncompatibleState if malformed)."""
    try:
        sd: dict[str, TensorStorageMetadata | BytesStorageMetadata] = {}
        for fqn, item in dict(obj["state_dict_metadata"]).items():
            if not item:
                sd[str(fqn)] = BytesStorageMetadata()
                continue
            sd[str(fqn)] = TensorStorageMetadata(
                properties=TensorProperties(dtype=dtype_from_name(str(item["dtype"]))),
                size=torch.Size(int(d) for d in item["size"]),
                chunks=[
                    ChunkStorageMetadata(torch.Size(int(x) for x in o), torch.Size(int(x) for x in s))
                    for o, s in item["chunks"]
                ],
            )
        version = obj.get("version")
        return Metadata(
            state_dict_metadata=sd,
            planner_data=unflatten(obj["planner_data"], []),
            version=None if version is None else str(version),
        )
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise IncompatibleState(
            f"the checkpoint's DCP metadata is malformed ({type(e).__name__}: {e})"
        ) from None


def same_metadata(a: Metadata, b: Metadata) -> bool:
    """Whether two ``Metadata`` describe the same keys, tensors, boxes and planner data (ids aside)."""
    if set(a.state_dict_metadata) != set(b.state_dict_metadata) or a.planner_data != b.planner_data:
        return False
    for fqn, x in a.state_dict_metadata.items():
        y = b.state_dict_metadata[fqn]
        if isinstance(x, BytesStorageMetadata) or isinstance(y, BytesStorageMetadata):
            if type(x) is not type(y):
                return False
            continue
        if not isinstance(y, TensorStorageMetadata) or (x.properties.dtype, x.size) != (
            y.properties.dtype,
            y.size,
        ):
            return False
        boxes_x = sorted((tuple(c.offsets), tuple(c.sizes)) for c in x.chunks)
        boxes_y = sorted((tuple(c.offsets), tuple(c.sizes)) for c in y.chunks)
        if boxes_x != boxes_y:
            return False
    return True
