"""How tests/data/legacy_v1_bank was made: run once with weightbank at commit a235bb4 (bank format 1).

Kept to document the fixture, not run by the suite (it would write today's format). It holds two
runs, a delta chain, a deleted checkpoint (in trash), a moved and a removed tag, an event, and a
two-part (sharded, manifest format 2) checkpoint; ``expected.json`` records what must resolve.

    python tests/data/make_legacy_bank.py tests/data/legacy_v1_bank
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

import weightbank as wb


def main(out: str) -> None:
    path = Path(out)
    shutil.rmtree(path, ignore_errors=True)
    bank = wb.open(path)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, generator=g)
    expected: dict[str, object] = {"steps": {}}
    for step in range(4):
        w = w + 0.01 * torch.randn(64, 32, generator=g)
        info = bank.save(
            {"w": w, "b": torch.arange(8, dtype=torch.int64) + step, "step": step},
            run="tts",
            step=step,
            metrics={"val_loss": [0.9, 0.5, 0.7, 0.6][step]},
            tags=["candidate"],
        )
        expected["steps"][str(step)] = info.id  # type: ignore[index]
    bank.tag("prod", "tts@1")
    bank.tag("prod", "tts@3")
    bank.tag("gone", "tts@0")
    bank.untag("gone")
    ft = bank.save({"w": w * 2, "b": torch.zeros(8, dtype=torch.int64)}, run="ft", step=10, parent=None)
    doomed = bank.save({"w": w * 3}, run="ft", step=11)
    bank.delete(doomed.id, why="fixture")
    bank.record_event("tts", "note", step=1, data={"what": "fixture"})
    parts = [
        bank.save_part({"s": wb.TensorShard(torch.ones(2, 4), offsets=(0, 0), shape=(4, 4))}),
        bank.save_part({"s": wb.TensorShard(torch.zeros(2, 4), offsets=(2, 0), shape=(4, 4))}),
    ]
    sharded = bank.commit(parts, run="dist", step=5)
    expected.update(
        ft=ft.id,
        deleted=doomed.id,
        sharded=sharded.id,
        prod=bank.resolve("prod"),
        prod_prev=bank.resolve("prod@{1}"),
        best=bank.resolve("tts@best:val_loss"),
        latest_w=bank.load("tts@latest")["w"].tolist(),
    )
    bank.close()
    (path.parent / "legacy_v1_expected.json").write_text(json.dumps(expected, indent=1))


if __name__ == "__main__":
    main(sys.argv[1])
