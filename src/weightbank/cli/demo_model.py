"""The demo's model and data: a tiny byte-level transformer language model and a built-in text.

Small enough to train for a few steps on a laptop CPU in seconds, large enough
(about 7 MiB of float32 weights) that what the bank saves is worth measuring.
Everything is deterministic given the seed, and nothing is downloaded.

Example:
    >>> import torch
    >>> from weightbank.cli.demo_model import PRETRAIN_TEXT, TinyLM, batches
    >>> model = TinyLM(seed=0)
    >>> x, y = next(batches(PRETRAIN_TEXT, seed=0))
    >>> tuple(model(x).shape) == (x.shape[0], x.shape[1], 256)
    True
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["FINETUNE_TEXT", "PRETRAIN_TEXT", "TinyLM", "batches", "evaluate"]

PRETRAIN_TEXT = (
    "A checkpoint is a photograph of a model in the middle of learning. Most of it looks like the "
    "photograph before: the same embedding, the same lower layers, a few weights nudged a little. "
    "A bank that stores every checkpoint in full pays for the same bytes again and again; a bank "
    "that cuts each tensor into chunks and names every chunk by the hash of its bytes stores each "
    "chunk once, however many checkpoints share it. Tags give checkpoints names that can move: prod "
    "points here today, there tomorrow, and back again in one call when tomorrow goes badly. "
) * 4

FINETUNE_TEXT = (
    "Fine-tuning starts from a good checkpoint and teaches it one more thing. The lower layers stay "
    "as they were; only the top of the network learns the new style, so the new checkpoints share "
    "most of their bytes with the one they started from. "
) * 6


class _Block(nn.Module):
    """Pre-norm transformer block: causal self-attention, then a 4x MLP."""

    def __init__(self, d_model: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1 = nn.LayerNorm(d_model)
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)
        self.ln2 = nn.LayerNorm(d_model)
        self.up = nn.Linear(d_model, 4 * d_model)
        self.down = nn.Linear(4 * d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        att = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        out: torch.Tensor = x + self.down(nn.functional.gelu(self.up(self.ln2(x))))
        return out


class TinyLM(nn.Module):
    """A byte-level language model: embedding, ``n_layers`` blocks, a head tied to the embedding.

    Example:
        >>> sum(p.numel() for p in TinyLM(seed=0).parameters()) > 1_000_000
        True
    """

    def __init__(
        self, *, d_model: int = 192, n_layers: int = 4, n_heads: int = 4, context: int = 64, seed: int = 0
    ) -> None:
        super().__init__()
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            self.embed = nn.Embedding(256, d_model)
            self.pos = nn.Embedding(context, d_model)
            self.blocks = nn.ModuleList(_Block(d_model, n_heads) for _ in range(n_layers))
            self.norm = nn.LayerNorm(d_model)
            self.head = nn.Linear(d_model, 256, bias=False)
            self.head.weight = self.embed.weight
            # Small embeddings: with the tied head, N(0, 1) would start the loss far above ln(256).
            nn.init.normal_(self.embed.weight, std=0.02)
            nn.init.normal_(self.pos.weight, std=0.02)
        finally:
            # Building the demo model must not disturb the caller's random stream.
            torch.random.set_rng_state(gen_state)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.pos(positions)
        for block in self.blocks:
            x = block(x)
        logits: torch.Tensor = self.head(self.norm(x))
        return logits


def batches(
    text: str, *, batch: int = 8, context: int = 32, seed: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (input, next-byte target) batches of random windows of ``text``."""
    data = torch.tensor(list(text.encode()), dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    while True:
        starts = torch.randint(0, len(data) - context - 1, (batch,), generator=gen)
        x = torch.stack([data[s : s + context] for s in starts.tolist()])
        y = torch.stack([data[s + 1 : s + context + 1] for s in starts.tolist()])
        yield x, y


@torch.no_grad()
def evaluate(model: TinyLM, text: str, *, seed: int = 1234) -> float:
    """Mean next-byte cross-entropy on a fixed set of windows of ``text``."""
    x, y = next(batches(text, batch=16, seed=seed))
    was_training = model.training
    model.eval()
    loss = nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
    model.train(was_training)
    return float(loss)
