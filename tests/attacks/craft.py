"""Crafting hostile stored objects, and the checks every attack must pass.

An attack plants bytes a damaged disk or a hostile writer could leave in a
bank — with a valid hash where the object is named by one — and then asserts
two things: the call that needs the object raises a typed weightbank error,
and every call that does not need it still works (the rest of the bank is
untouched and usable).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import weightbank as wb
from weightbank.bank.layout import manifest_key
from weightbank.bank.listing import read_manifest
from weightbank.format.hashing import digest


@dataclass
class Sample:
    """A local bank holding a small run (two checkpoints, a tag) whose calls an attack must not break."""

    bank: wb.Bank
    root: Path
    first: str
    second: str
    state: dict[str, torch.Tensor]


def sample_bank(root: Path) -> Sample:
    """A fresh local bank: run ``r`` at steps 1 and 2, tag ``prod`` on step 2."""
    bank = wb.open(str(root))
    state = {"w": torch.arange(64, dtype=torch.float32).reshape(8, 8), "b": torch.ones(8)}
    first = bank.save(state, run="r", step=1, metrics={"val": 1.0}).id
    state2 = {"w": state["w"] + 1, "b": state["b"]}
    second = bank.save(state2, run="r", step=2, metrics={"val": 0.5}, tags=["prod"]).id
    return Sample(bank, root, first, second, state2)


def good_manifest(sample: Sample) -> dict[str, Any]:
    """The sample's newest manifest as a one-document (format 1) manifest, to mutate into an attack.

    The bank stores it as format 3 (content and locations apart); format-1/2
    documents stay readable forever, so their parser faces the attacks here
    (tests/attacks/test_compact.py attacks the format-3 objects).
    """
    obj: dict[str, Any] = read_manifest(sample.bank.storage, sample.second).to_json()
    obj["format"] = 1
    del obj["segments"]
    return obj


def plant_manifest(root: Path, data: bytes | dict[str, Any]) -> str:
    """Write ``data`` (bytes, or a JSON object) as a manifest named by its own hash; return that id."""
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    cid = digest(raw)
    path = root / manifest_key(cid)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(raw)
    return cid


def still_usable(sample: Sample, *, bad_refs: tuple[str, ...] = ()) -> None:
    """The sample's own checkpoints, tags and runs work as before an attack (in a fresh process view too)."""
    for bank in (sample.bank, wb.open(str(sample.root), create=False)):
        loaded = bank.load("prod")
        assert torch.equal(loaded["w"], sample.state["w"])
        assert bank.resolve("r@latest") == sample.second
        assert bank.resolve("r@best:val") == sample.second
        assert bank.resolve("r@1") == sample.first
        assert {c.id for c in bank.log("r")} >= {sample.first, sample.second}
        assert bank.show("prod").info.metrics == {"val": 0.5}
        assert [t.name for t in bank.diff(sample.first, sample.second).by_status("changed")] == ["w"]
        assert [t.name for t in bank.tags() if t.target] == ["prod"]
        assert bank.tag_history("prod")[-1].new == sample.second
        bank.events("r")
        bank.du()
        assert bank.verify(sample.second).ok
        for ref in bad_refs:
            assert ref not in {c.id for c in bank.log()}
    # A save still works (the writer reads the catalog too), and loads back.
    info = sample.bank.save({"w": torch.zeros(4)}, run="other", step=1)
    assert torch.equal(sample.bank.load(info.id)["w"], torch.zeros(4))
