"""The child side of the SIGKILL resume tests: train (resuming from the bank) and report progress.

``python _train_child.py BANK RUN TOTAL WORKERS NAN_AT SPIKE_AT`` prints one
flushed line per event: ``resumed STEP EPOCH INDEX`` once, ``step S BATCH
IDX,...`` after every step, ``rollback AT TO`` after a rollback and ``done``
at the end, after every save is committed. The parent may SIGKILL it at any
point.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import weightbank as wb
from tests.training.common import build, train


def main() -> None:
    bank_dir, run, total, workers, nan_at, spike_at = sys.argv[1:7]
    model, state, loader = build(workers=int(workers))
    bank = wb.open(bank_dir)
    guard = wb.Guard(spike=20.0, window=20, min_history=5, lr_scale=0.5)
    mgr = wb.CheckpointManager(
        bank, run=run, save=wb.Every(steps=4), keep=[wb.LastN(3)], guard=guard, signals=()
    )

    def report(step: int, batch: int, idx: list[int], out: wb.StepOutcome) -> None:
        print(f"step {step} {batch} {','.join(map(str, idx))}", flush=True)
        if out.rollback is not None:
            print(f"rollback {out.rollback.step} {out.rollback.restored_step}", flush=True)

    step0 = mgr.restore(state)
    print(f"resumed {step0} {loader.epoch} {loader.index}", flush=True)
    done = train(
        mgr,
        state,
        model,
        loader,
        int(total),
        nan_at=int(nan_at),
        spike_at=int(spike_at),
        on_step=report,
        start=step0,
    )
    mgr.save_now(done - 1, state, tags=[f"{run}-final"]).wait()
    mgr.close()
    print("done", flush=True)


if __name__ == "__main__":
    main()
