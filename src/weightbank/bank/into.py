"""Checking a checkpoint against the tensors it is loaded ``into=``, before any byte is written.

Every mismatch (missing or unexpected key, shape, dtype without an explicit
``dtype=``) is collected and raised together as IncompatibleState, so the
target is never left half-loaded by a check that fails late. Targets that share
storage (tied weights) are written once.

Example:
    >>> import torch
    >>> from weightbank.format.manifest import Manifest, TensorRecord
    >>> m = Manifest(run="r", step=0, parent=None, created=0.0, tensors=(TensorRecord("w", "float32", (2,)),))
    >>> write, loaded, skipped = plan_into("x" * 64, m, {"w": torch.zeros(2)}, [0])
    >>> list(write), loaded
    ([0], ('w',))
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..errors import IncompatibleState
from ..format.manifest import Manifest

__all__ = ["plan_into"]


def plan_into(
    cid: str,
    m: Manifest,
    target: Mapping[str, torch.Tensor],
    chosen: Sequence[int],
    *,
    selected: bool = False,
    dtype: torch.dtype | None = None,
    strict: bool = True,
    prefix: str = "",
) -> tuple[dict[int, torch.Tensor], tuple[str, ...], tuple[str, ...]]:
    """Map checkpoint tensor indices to target tensors; return (to write, loaded names, skipped names)."""
    by_key: dict[str, int] = {}
    for i in chosen:
        name = m.tensors[i].name
        if prefix and not name.startswith(prefix):
            continue
        by_key[name[len(prefix) :]] = i
    problems = []
    missing = [k for k in target if k not in by_key] if (strict and not selected) else []
    unexpected = [k for k in by_key if k not in target]
    if missing:
        problems.append(f"missing in checkpoint: {', '.join(missing[:8])}{' …' if len(missing) > 8 else ''}")
    if unexpected and (strict or selected):
        problems.append(f"not in target: {', '.join(unexpected[:8])}{' …' if len(unexpected) > 8 else ''}")
    into_idx: dict[int, torch.Tensor] = {}
    for key, i in by_key.items():
        if key not in target:
            continue
        rec, dest = m.tensors[i], target[key]
        if tuple(dest.shape) != rec.shape:
            problems.append(f"{key}: checkpoint shape {list(rec.shape)} != target {list(dest.shape)}")
        elif str(dest.dtype).removeprefix("torch.") != rec.dtype and dtype is None:
            problems.append(
                f"{key}: checkpoint dtype {rec.dtype} != target {dest.dtype} (pass dtype= to convert)"
            )
        else:
            into_idx[i] = dest
    if problems:
        raise IncompatibleState(
            f"checkpoint {cid[:12]} does not fit the target: " + "; ".join(problems), missing + unexpected
        )
    # Tied targets (one storage under two names) are written once.
    seen_ptr: dict[tuple[int, torch.device], int] = {}
    write: dict[int, torch.Tensor] = {}
    for i, dest in into_idx.items():
        key_ptr = (dest.data_ptr(), dest.device)
        if dest.numel() and key_ptr in seen_ptr and m.tensors[i].alias_of is not None:
            continue
        seen_ptr.setdefault(key_ptr, i)
        write[i] = dest
    loaded = tuple(m.tensors[i].name[len(prefix) :] for i in into_idx)
    return write, loaded, tuple(unexpected)
