"""A Lightning run for the SIGKILL resume test: ``lit_child.py BANK CKPT_DIR EPOCHS KILL_AT RESUME ASYNC``.

Trains a small model with dropout on a shuffled ``wb.ResumableLoader``, saving through ``BankIO``
every 3 steps (plus ``last``); KILL_AT >= 0 SIGKILLs the process right after that optimizer step;
RESUME=1 fits with ``ckpt_path="last"``. The final weights go to CKPT_DIR/final.safetensors.
"""

from __future__ import annotations

import os
import signal
import sys
import warnings
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from safetensors.torch import save_file

import weightbank as wb
import weightbank.lightning
from weightbank.training.data import ResumableLoader


class Tiny(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.1), torch.nn.Linear(8, 1))

    def training_step(self, batch: Any, _: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> Any:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class Kill(pl.Callback):
    def __init__(self, at: int) -> None:
        self.at = at

    def on_train_batch_end(self, trainer: pl.Trainer, *_: Any) -> None:
        if trainer.global_step == self.at:
            os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    warnings.simplefilter("ignore")  # Lightning's advice about workers and loggers
    bank_dir, ckpt_dir, epochs, kill_at, resume, use_async = sys.argv[1:7]
    pl.seed_everything(0, verbose=False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(40, 4, generator=g)
    data = ResumableLoader(
        torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4, shuffle=True
    )
    callbacks: list[pl.Callback] = [
        ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=3, save_top_k=-1, save_last=True),
        wb.lightning.ExactResume(),
    ]
    if int(kill_at) >= 0:
        callbacks.append(Kill(int(kill_at)))
    io: Any = wb.lightning.BankIO(wb.open(bank_dir), run="r")
    trainer = pl.Trainer(
        max_epochs=int(epochs),
        plugins=[AsyncCheckpointIO(io) if use_async == "1" else io],
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        deterministic=True,
    )
    model = Tiny()
    trainer.fit(model, data, ckpt_path="last" if resume == "1" else None)
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        os.path.join(ckpt_dir, "final.safetensors"),
    )


if __name__ == "__main__":
    main()
