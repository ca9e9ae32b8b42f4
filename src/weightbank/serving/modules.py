"""Building a checkpoint's module and filling it with pooled tensors, without copying them.

The factory builds the empty module under ``torch.device("meta")`` (no memory,
no random init) by default; every parameter and buffer in its state_dict is
then *assigned* the pooled tensor of the same name (``load_state_dict(...,
assign=True)``), so modules of checkpoints that share a tensor share its
storage, and dropping the module and the pool's slot frees it. Names, shapes
and leftovers are checked before anything is assigned. Gradients are off and
the module is in eval mode: a served module is read-only, because its tensors
may be shared with other resident checkpoints.

Example:
    >>> import torch
    >>> from weightbank.serving.modules import build_module
    >>> w = {"weight": torch.ones(2, 2), "bias": torch.zeros(2)}
    >>> lin = build_module(lambda: torch.nn.Linear(2, 2), w, torch.device("cpu"))
    >>> lin.weight.data_ptr() == w["weight"].data_ptr(), lin.training
    (True, False)
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping

import torch
from torch import nn

from ..errors import IncompatibleState

__all__ = ["build_module"]


def build_module(
    factory: Callable[[], nn.Module],
    tensors: Mapping[str, torch.Tensor],
    device: torch.device,
    *,
    build_on: str = "meta",
    what: str = "checkpoint",
) -> nn.Module:
    """Call ``factory`` (under ``build_on``) and assign ``tensors`` as its state; IncompatibleState on mismatch."""
    with torch.device(build_on):
        module = factory()
    if not isinstance(module, nn.Module):
        raise IncompatibleState(f"the model factory returned {type(module).__name__}, not a torch.nn.Module")
    expected = module.state_dict(keep_vars=True)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [
        f"{n}: {tuple(tensors[n].shape)} vs {tuple(expected[n].shape)}"
        for n in expected
        if n in tensors and tuple(tensors[n].shape) != tuple(expected[n].shape)
    ]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"module expects {', '.join(missing[:5])} which {what} lacks")
        if unexpected:
            parts.append(f"{what} has {', '.join(unexpected[:5])} which the module lacks")
        if wrong:
            parts.append("shape mismatch " + "; ".join(wrong[:5]))
        raise IncompatibleState(
            f"{what} does not fit the module the factory built: " + "; ".join(parts),
            missing + unexpected,
        )
    module.load_state_dict(dict(tensors), strict=True, assign=True)
    for name, buf in list(module.named_buffers()):
        if buf.device != device and not buf.is_meta:
            # A non-persistent buffer the factory created: not in the checkpoint, so move it.
            owner, _, leaf = name.rpartition(".")
            module.get_submodule(owner)._buffers[leaf] = buf.to(device)
    left = [n for n, t in itertools.chain(module.named_parameters(), module.named_buffers()) if t.is_meta]
    if left:
        raise IncompatibleState(
            f"{', '.join(left[:5])} of the module are not in {what} (non-persistent buffers?);"
            ' build the module for real with build_on="cpu"',
            left,
        )
    module.requires_grad_(False)
    module.eval()
    return module
