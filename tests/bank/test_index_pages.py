"""The catalog's page parser refuses a crafted pack key wherever it sits in a page."""

from __future__ import annotations

from typing import Any

import pytest

from weightbank.bank.index.pages import run_page_rows
from weightbank.bank.index.records import CatalogRecord
from weightbank.bank.index.store import IndexDamaged
from weightbank.bank.layout import pack_key


def _record(i: int, packs: list[Any]) -> dict[str, Any]:
    return CatalogRecord(
        id=f"{i:064x}", run="r", step=i, parent=None, created=float(i), format=3, packs=()
    ).to_json() | {"packs": packs}


GOOD = [pack_key(f"{i:02x}save", 0) for i in range(3)]


def test_a_page_whose_records_share_packs_reads_back_every_record() -> None:
    rows = run_page_rows({"records": [_record(i, GOOD) for i in range(5)]})
    assert [r.step for r in rows] == list(range(5))
    assert all(r.packs == tuple(GOOD) for r in rows)


@pytest.mark.parametrize(
    "bad",
    ["packs/../../etc/passwd", "manifests/ab/x.json", 7, ["packs/ab/ab-0.pack"], None],
)
@pytest.mark.parametrize("where", [0, 3])
def test_a_bad_pack_key_in_any_record_of_a_page_is_refused(bad: Any, where: int) -> None:
    records = [_record(i, GOOD) for i in range(5)]
    records[where]["packs"] = [*GOOD[:2], bad]
    with pytest.raises(IndexDamaged, match="malformed page"):
        run_page_rows({"records": records}, "index/pages/x")
