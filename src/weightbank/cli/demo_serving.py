"""The serving demo: one server, a base model and speaker variants, an A/B route, promote, roll back.

It saves a small "speaker" model family into the bank (a shared body, one
head per speaker — each variant differs from the base in a few percent of its
bytes), serves it in-process through the HTTP app (FastAPI's TestClient, no
network), sends traffic through a 90/10 route, promotes the canary to prod,
rolls it back, and prints what the cache holds and how it got there. It runs
offline in a few seconds.

Example:
    >>> import weightbank as wb
    >>> from weightbank.cli.demo_serving import run
    >>> from weightbank.cli.render import make_console
    >>> run(wb.open("memory://"), make_console())  # doctest: +SKIP
"""

from __future__ import annotations

import secrets
from collections import Counter

import torch
from fastapi.testclient import TestClient
from rich.console import Console
from rich.table import Table
from rich.text import Text
from torch import nn

from ..bank.bank import Bank
from ..bank.results import CheckpointInfo
from ..http import create_app
from ..serving import ModelService, TensorHandler
from ..serving.budget import format_bytes

__all__ = ["SpeakerNet", "run"]

FEATURES = 64
SPEAKERS = ("ana", "ben", "chen", "dara")
REQUESTS = 200
PROD, CANARY = "tts-prod", "tts-canary"  # own tags: the bank may hold a "prod" already


class SpeakerNet(nn.Module):
    """A small acoustic-model stand-in: a shared body and a per-speaker output head."""

    def __init__(self, width: int = 256, depth: int = 4) -> None:
        super().__init__()
        self.inp = nn.Linear(FEATURES, width)
        self.body = nn.ModuleList(nn.Linear(width, width) for _ in range(depth))
        self.head = nn.Linear(width, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.inp(x))
        for layer in self.body:
            x = x + torch.tanh(layer(x))
        out: torch.Tensor = self.head(x)
        return out


def _build(info: CheckpointInfo) -> nn.Module:
    return SpeakerNet(int(info.config.get("width", 256)), int(info.config.get("depth", 4)))


def _save_family(bank: Bank) -> dict[str, str]:
    """Save the base and one fine-tuned head per speaker; returns name → checkpoint id."""
    gen = torch.random.get_rng_state()
    try:
        torch.manual_seed(0)
        base = SpeakerNet()
        ids = {"base": bank.save(base.state_dict(), run="tts-base", step=0, config={"width": 256}).id}
        for k, name in enumerate(SPEAKERS, start=1):
            torch.manual_seed(k)
            variant = SpeakerNet()
            variant.load_state_dict(base.state_dict())
            nn.init.normal_(variant.head.weight, std=0.05)
            info = bank.save(
                variant.state_dict(), run=f"tts-{name}", step=0, config={"width": 256}, parent=ids["base"]
            )
            ids[name] = info.id
    finally:
        torch.random.set_rng_state(gen)
    return ids


def _header(console: Console, n: int, title: str) -> None:
    console.print()
    console.rule(Text(f"{n} · {title}", style="bold"), align="left")


def _models_table(models: list[dict[str, object]], names: dict[str, str]) -> Table:
    table = Table(box=None, pad_edge=False)
    for col in ("checkpoint", "name", "tier", "bytes", "unique bytes", "pinned"):
        table.add_column(col, justify="right" if "bytes" in col else "left")
    for m in models:
        cid = str(m["checkpoint"])
        table.add_row(
            cid[:12],
            names.get(cid, "?"),
            str(m["tier"]),
            format_bytes(int(str(m["nbytes"]))),
            format_bytes(int(str(m["unique_bytes"]))),
            "yes" if m["pinned"] else "",
        )
    return table


def _traffic(client: TestClient, x: list[list[float]], names: dict[str, str]) -> Counter[str]:
    seen: Counter[str] = Counter()
    for i in range(REQUESTS):
        r = client.post("/v1/predict", json={"route": "tts", "key": f"listener-{i}", "input": x})
        r.raise_for_status()
        seen[f"{r.json()['arm']} → {names[r.json()['checkpoint']]}"] += 1
    return seen


def run(bank: Bank, console: Console) -> None:
    """Run the serving demo on ``bank`` (it adds a small model family to it), printing as it goes."""
    ids = _save_family(bank)
    names = {cid: name for name, cid in ids.items()}
    full = bank.info(ids["base"]).nbytes
    budget = int(full * 1.25)
    token = secrets.token_hex(16)
    auth = {"Authorization": f"Bearer {token}"}
    x = torch.linspace(-1, 1, 2 * FEATURES).reshape(2, FEATURES).tolist()
    bank.tag(PROD, ids["base"], why="demo: base model")
    bank.tag(CANARY, ids["ana"], why="demo: ana's fine-tune")

    service = ModelService(
        bank, TensorHandler(_build, input_shape=(None, FEATURES)), poll=0, budget={"device": budget}
    )
    try:
        with TestClient(create_app(service, token=token)) as client:
            _header(console, 1, "one server, five checkpoints, a budget of 1.25 models")
            console.print(
                f"Each checkpoint is {format_bytes(full)}; the speakers share the base's body and differ in"
                f" their heads. Device budget: {format_bytes(budget)}."
            )
            for name in ("base", *SPEAKERS):
                client.post(f"/v1/models/{ids[name]}:load", headers=auth).raise_for_status()
            listed = client.get("/v1/models", headers=auth).json()
            console.print(_models_table(listed["models"], names))
            used = listed["stats"]["tiers"]["device"]["used"]
            console.print(
                f"{len(listed['models'])} checkpoints resident in {format_bytes(used)}"
                f" — {len(listed['models']) * full / used:.1f}x what full copies would need."
            )

            _header(console, 2, "an A/B route: prod 90 · canary 10, sticky by listener")
            client.put(
                "/v1/routes/tts", json={"arms": {PROD: 90, CANARY: 10}}, headers=auth
            ).raise_for_status()
            for arm, n in sorted(_traffic(client, x, names).items()):
                console.print(f"  {arm:<20} {n:>4} requests")
            again = {
                client.post("/v1/predict", json={"route": "tts", "key": "listener-7", "input": x}).json()[
                    "arm"
                ]
                for _ in range(5)
            }
            console.print(f"listener-7 asked 5 more times and always got {again.pop()} (sticky).")

            _header(console, 3, "promote the canary to prod (warmed first, then traffic flips)")
            r = client.put(f"/v1/tags/{PROD}", json={"ref": CANARY, "why": "demo: canary won"}, headers=auth)
            r.raise_for_status()
            console.print(f"prod now serves {names[r.json()['served']]} ({r.json()['served'][:12]})")
            for arm, n in sorted(_traffic(client, x, names).items()):
                console.print(f"  {arm:<20} {n:>4} requests")

            _header(console, 4, "roll back")
            r = client.post(
                f"/v1/tags/{PROD}:rollback", json={"why": "demo: listeners preferred the base"}, headers=auth
            )
            r.raise_for_status()
            console.print(f"prod serves {names[r.json()['served']]} again — no restart, no reload")
            check = client.post("/v1/predict", json={"ref": PROD, "input": x}).json()
            console.print(f"a request to prod is answered by checkpoint {check['checkpoint'][:12]}")

            _header(console, 5, "cache statistics")
            stats = client.get("/v1/models", headers=auth).json()["stats"]
            table = Table(box=None, pad_edge=False)
            table.add_column("")
            table.add_column("value", justify="right")
            dev = stats["tiers"]["device"]
            table.add_row(
                "requests (device hits / misses)", f"{stats['hits']['device']} / {stats['misses']['device']}"
            )
            table.add_row("hit rate", f"{stats['hit_rate']:.1%}")
            table.add_row("loads", str(stats["loads"]))
            table.add_row("bytes read from the bank", format_bytes(stats["bytes_loaded"]["bank"]))
            table.add_row("bytes reused (already resident)", format_bytes(stats["bytes_reused"]))
            table.add_row(
                "device bytes (now / peak / budget)",
                f"{format_bytes(dev['used'])} / {format_bytes(dev['peak'])} / {format_bytes(dev['budget'])}",
            )
            table.add_row(
                "evictions", ", ".join(f"{k}: {v}" for k, v in stats["evictions"].items()) or "none"
            )
            console.print(table)
            metric_lines = [
                line
                for line in client.get("/metrics").text.splitlines()
                if line.startswith(("weightbank_cache_hits_total", "weightbank_bytes{"))
            ]
            console.print("GET /metrics (excerpt):")
            for line in metric_lines:
                console.print(f"  {line}")
    finally:
        service.close()
