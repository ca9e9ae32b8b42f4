"""What bit-exact resume needs from PyTorch, set in one call.

Resuming is exact when every source of randomness is in the checkpoint
(TrainingState captures the global generators; ResumableLoader the data order
and worker seeds) *and* every kernel computes the same bits for the same
inputs. :func:`deterministic` arranges the second part:

- ``torch.use_deterministic_algorithms(True)``: ops without a deterministic
  implementation raise instead of silently varying (mostly CUDA: scatter-add,
  index_add, some backward passes);
- ``torch.backends.cudnn.deterministic = True`` and ``benchmark = False``
  (autotuning may pick a different convolution algorithm in a new process);
- ``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless already set (cuBLAS needs it for
  deterministic GEMMs; it must be set before the first cuBLAS call);
- a fixed number of CPU threads (``threads``): parallel CPU reductions split
  work by thread count, so the resumed process must use the same count;
- ``random``, numpy's global generator and torch (all devices) seeded.

Example:
    >>> import torch
    >>> from weightbank.training.determinism import deterministic
    >>> deterministic(0, threads=None); a = torch.rand(2)
    >>> deterministic(0, threads=None); bool((torch.rand(2) == a).all())
    True
    >>> torch.use_deterministic_algorithms(False)
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

__all__ = ["deterministic"]


def deterministic(seed: int, *, threads: int | None = 1) -> None:
    """Seed every global generator and switch PyTorch to deterministic kernels (see the module docstring).

    ``threads=None`` leaves the CPU thread count alone.

    Example:
        >>> deterministic(1234)  # doctest: +SKIP
    """
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    if threads is not None:
        torch.set_num_threads(threads)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
