"""Capturing and restoring every global random number generator training depends on.

Covered: Python's ``random``, numpy's global (legacy) generator, torch's CPU
generator and the generator of every CUDA device (only when CUDA is already
initialized: capturing must never be the thing that creates a CUDA context).
The captured state is a plain tree of tensors, numpy arrays and JSON values,
so it goes into a checkpoint without pickle. Private ``torch.Generator``
objects are the caller's: put them in ``TrainingState(extra=...)``.

Example:
    >>> import random, torch
    >>> from weightbank.training.rng import capture_rng, restore_rng
    >>> saved = capture_rng()
    >>> a = (random.random(), torch.rand(1).item())
    >>> restore_rng(saved)
    >>> (random.random(), torch.rand(1).item()) == a
    True
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from ..errors import IncompatibleState

__all__ = ["capture_rng", "check_rng", "restore_rng"]


def capture_rng() -> dict[str, Any]:
    """The state of every global generator, as a checkpoint-safe tree.

    Example:
        >>> sorted(capture_rng())
        ['cuda', 'numpy', 'python', 'torch']
    """
    version, words, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    cuda: list[torch.Tensor] = []
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        cuda = list(torch.cuda.get_rng_state_all())
    return {
        "python": {"version": int(version), "state": torch.tensor(words, dtype=torch.int64), "gauss": gauss},
        "numpy": {
            "kind": str(kind),
            "keys": np.array(keys, dtype=np.uint32, copy=True),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": cuda,
    }


def _parsed(state: Mapping[str, Any]) -> tuple[Any, Any, torch.Tensor, list[torch.Tensor]]:
    """Every generator's state from ``state``, checked; IncompatibleState if any part is malformed."""
    try:
        py = state["python"]
        words = tuple(int(w) for w in torch.as_tensor(py["state"]).tolist())
        gauss = py["gauss"]
        py_state = (int(py["version"]), words, None if gauss is None else float(gauss))
        npy = state["numpy"]
        keys = np.asarray(npy["keys"], dtype=np.uint32)
        np_state = (str(npy["kind"]), keys, int(npy["pos"]), int(npy["has_gauss"]), float(npy["cached"]))
        cpu = torch.as_tensor(state["torch"], dtype=torch.uint8).clone()
        if cpu.shape != torch.get_rng_state().shape:
            raise ValueError(f"torch generator state of {cpu.numel()} bytes")
        cuda = [torch.as_tensor(c, dtype=torch.uint8).clone() for c in list(state.get("cuda") or [])]
        if len(words) != len(random.getstate()[1]) or keys.shape != (624,):
            raise ValueError("python or numpy generator state of the wrong size")
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
        raise IncompatibleState(f"the checkpoint's RNG state is malformed ({e})", ["rng"]) from None
    return py_state, np_state, cpu, cuda


def check_rng(state: Mapping[str, Any]) -> None:
    """Raise IncompatibleState if :func:`restore_rng` would fail on ``state``; change nothing.

    Example:
        >>> check_rng(capture_rng())
    """
    _parsed(state)


def restore_rng(state: Mapping[str, Any]) -> None:
    """Put every global generator back to ``state`` (from :func:`capture_rng`).

    The whole state is checked first, so a malformed one changes no generator.
    CUDA states are restored for the devices both the checkpoint and this
    process have (a GPU checkpoint can be inspected on a CPU-only machine).

    Example:
        >>> import numpy as np
        >>> s = capture_rng(); x = np.random.rand(); restore_rng(s); np.random.rand() == x
        True
    """
    py_state, np_state, cpu, cuda = _parsed(state)
    random.setstate(py_state)
    np.random.set_state(np_state)
    torch.set_rng_state(cpu)
    if cuda and torch.cuda.is_available():
        for i in range(min(len(cuda), torch.cuda.device_count())):
            torch.cuda.set_rng_state(cuda[i], i)
