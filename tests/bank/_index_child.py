"""The child-process side of ``test_index_crash.py``: ``_child.py``'s modes, the index scenarios, and one more mode.

Run as ``python _index_child.py MODE ARGS...``. Every mode of ``_child.py``
works here, and ``sweep`` also knows :data:`INDEX_SCENARIOS` (registered into
the shared ``SCENARIOS`` before it runs). The extra mode:

``compacting-saver BANK RUN STEPS``
    After ``go`` on stdin, save each step (comma-separated) of RUN and compact
    the catalog after every save, printing ``saved ID RUN STEP`` and
    ``compacted GEN`` — two of these at once race their compactions.
"""

from __future__ import annotations

import dataclasses
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import weightbank as wb
from tests.bank import _child
from tests.bank.faults import CHUNK, SCENARIOS, build_base, make_state
from weightbank.bank import catalog as catalog_module
from weightbank.bank.index import gc as index_gc
from weightbank.bank.layout import LEASES, manifest_key
from weightbank.format.hashing import digest

__all__ = ["DEAD_SAVE", "INDEX_SCENARIOS", "build_index_base"]

#: The save id of the dead lease ``build_base`` leaves behind; the dangling add entry names it.
DEAD_SAVE = "0dead" + "0" * 19


def build_index_base(path: str | os.PathLike[str]) -> dict[str, Any]:
    """``build_base``'s bank (run r steps 0-3, prod, latest, an orphan pack, a dead lease), then an index
    three roots deep (r@4 saved, r@0 deleted between them: the next compaction retires the first root,
    whose pages gc then sweeps) with work waiting: r@5 saved since; the add entry of a save that died
    before its manifest (its lease is the dead one); and the delete entry of a delete of r@1 that died
    before removing the manifest. Returns the ids, the dangling id and the deleted ids.
    """
    ids = build_base(path)
    with wb.open(path) as bank:
        bank.compact()
        ids.append(bank.save(make_state("r", 4), run="r", step=4, chunk_size=CHUNK).id)
        bank.compact()
        bank.delete(ids[0], why="base")
        bank.compact()
        ids.append(bank.save(make_state("r", 5), run="r", step=5, chunk_size=CHUNK).id)
        m = dataclasses.replace(bank._catalog.get(ids[3]), step=99, created=time.time(), message="died")
        dangling = digest(m.to_bytes())
        bank._catalog.intend(dangling, m, [DEAD_SAVE], [])
        bank._catalog.tombstone(ids[1])
        lease = json.loads(bank.storage.read(f"{LEASES}{DEAD_SAVE}.json"))
        assert lease["pid"] != os.getpid() and lease["host"] == socket.gethostname()
        assert not bank.storage.exists(manifest_key(dangling))
    return {"ids": ids, "dangling": dangling, "deleted": [ids[0]]}


def _save_that_compacts(bank: wb.Bank) -> None:
    """A save whose commit finds enough entries waiting, so it compacts too."""
    catalog_module.COMPACT_EVERY = 2
    bank.save(make_state("r", 6), run="r", step=6, tags=["prod"], chunk_size=CHUNK, metrics={"x": 1})


def _compact(bank: wb.Bank) -> None:
    bank.compact()


def _delete_prune_gc(bank: wb.Bank) -> None:
    """A delete, a prune that compacts after it, and a gc that sweeps the pages the compaction replaced
    (one process: no compaction is in flight, so the hour gc spares young pages for is waived)."""
    catalog_module.COMPACT_EVERY = 2
    index_gc.PAGE_GRACE = 0.0
    bank.delete("r@2", why="drop")
    bank.prune(run="r", keep_last=1)  # keeps r@5 and the tagged r@1, r@3: r@4 goes
    bank.gc(grace=0)


INDEX_SCENARIOS = {
    "index-save": _save_that_compacts,
    "index-compact": _compact,
    "index-gc": _delete_prune_gc,
}


def compacting_saver(bank_dir: str, run: str, steps: str) -> None:
    bank = wb.open(bank_dir, create=False)
    _child.wait_go()
    for step in (int(s) for s in steps.split(",")):
        info = bank.save(make_state(run, step), run=run, step=step, chunk_size=CHUNK)
        _child.say("saved", info.id, run, step)
        _child.say("compacted", bank.compact().gen)


def main() -> None:
    SCENARIOS.update(INDEX_SCENARIOS)
    if sys.argv[1] == "compacting-saver":
        compacting_saver(*sys.argv[2:])
    else:
        _child.main()


if __name__ == "__main__":
    main()
