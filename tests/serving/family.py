"""A model family for serving tests: a base MLP and speaker variants that differ only in the last layer."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

import weightbank as wb
from weightbank.bank.trust import Verify

WIDTH = 32
OUT = 4


class MLP(nn.Module):
    def __init__(self, width: int = WIDTH, depth: int = 3, out: int = OUT) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.relu(layer(x))
        out: torch.Tensor = self.head(x)
        return out


def make_state(variant: int, width: int = WIDTH, depth: int = 3) -> dict[str, torch.Tensor]:
    """Variant 0 is the base; variant k > 0 has the base body and its own head."""
    torch.manual_seed(1234)
    m = MLP(width, depth)
    if variant:
        g = torch.Generator().manual_seed(variant)
        with torch.no_grad():
            m.head.weight.copy_(torch.randn(m.head.weight.shape, generator=g))
            m.head.bias.copy_(torch.randn(m.head.bias.shape, generator=g))
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def build(info: wb.CheckpointInfo) -> nn.Module:
    cfg = info.config
    return MLP(int(cfg.get("width", WIDTH)), int(cfg.get("depth", 3)))


@dataclass
class Family:
    bank: wb.Bank
    ids: list[str]
    states: dict[str, dict[str, torch.Tensor]]
    x: torch.Tensor = field(default_factory=lambda: torch.linspace(-1, 1, 2 * WIDTH).reshape(2, WIDTH))

    @property
    def full_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.states[self.ids[0]].values())

    @property
    def head_bytes(self) -> int:
        s = self.states[self.ids[0]]
        return sum(s[k].numel() * s[k].element_size() for k in ("head.weight", "head.bias"))

    def expected(self, cid: str, x: torch.Tensor | None = None) -> torch.Tensor:
        m = MLP()
        m.load_state_dict(self.states[cid])
        with torch.no_grad():
            out: torch.Tensor = m(self.x if x is None else x)
        return out


def make_family(bank: wb.Bank, n_variants: int = 4, tag_base: str | None = "prod") -> Family:
    ids: list[str] = []
    states: dict[str, dict[str, torch.Tensor]] = {}
    for v in range(n_variants + 1):
        state = make_state(v)
        tags = [tag_base] if (v == 0 and tag_base) else []
        cid = bank.save(
            state, run="base" if v == 0 else f"spk{v}", step=0, config={"width": WIDTH, "depth": 3}, tags=tags
        ).id
        ids.append(cid)
        states[cid] = state
    return Family(bank=bank, ids=ids, states=states)


def patch_load_tensors(bank: wb.Bank, fn: Callable[..., dict[str, torch.Tensor]]) -> None:
    """Route the tensor reads of a cache load from this one bank through ``fn`` (a spy, a gate or a fault).

    A load reads with ``load_tensors`` on the :class:`~weightbank.Checkpoint` that ``bank.checkpoint``
    gives it, once per load: from now on those handles call ``fn(id, names, device=...)`` instead
    (``bank.load_tensors`` itself is untouched, so ``fn`` may call it for the real read).
    """
    opened = wb.Bank.checkpoint

    class Patched(wb.Checkpoint):
        def load_tensors(
            self,
            names: Sequence[str],
            *,
            device: str | torch.device | None = None,
            verify: Verify | None = None,
        ) -> dict[str, torch.Tensor]:
            return fn(self.id, list(names), device=device)

    def checkpoint(ref: str) -> wb.Checkpoint:
        ck = opened(bank, ref)
        return Patched(ck.id, ck.manifest, ck.info, ck.options)

    setattr(bank, "checkpoint", checkpoint)  # noqa: B010 - an instance attribute shadowing the method, on purpose


def counting(bank: wb.Bank) -> Callable[[], list[tuple[str, tuple[str, ...]]]]:
    """Record (id, names) of every tensor read of a cache load from ``bank``; returns the log getter.

    (Tests that need a load to stay in flight gate it on an event, never on a sleep.)
    """
    calls: list[tuple[str, tuple[str, ...]]] = []
    real = bank.load_tensors

    def spy(ref: str, names: list[str], *, device: object = None) -> dict[str, torch.Tensor]:
        calls.append((ref, tuple(names)))
        return real(ref, names, device=device)  # type: ignore[arg-type]

    patch_load_tensors(bank, spy)
    return lambda: list(calls)
