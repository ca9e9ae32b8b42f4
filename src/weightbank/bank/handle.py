"""A resolved checkpoint: the public door for integrations (DCP, training, serving) into one checkpoint.

(Being written for #12: ``Bank.info`` and ``Bank.checkpoint``.)
"""

from __future__ import annotations

__all__ = ["Handles"]


class Handles:
    """``info`` / ``checkpoint`` for :class:`~weightbank.Bank`."""
