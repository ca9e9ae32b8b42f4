"""weightbank as the storage of PyTorch Distributed Checkpoint (DCP): sharded saves, resharding loads.

Every rank writes its own shards into one bank, in parallel; rank 0 commits
the checkpoint once every rank's data is durable, so a rank that dies means
no checkpoint, never a partial one. Loading reshards: a checkpoint saved at
world size 4 loads at 2 or 1 and back. Users of DCP get the bank's dedup
(an unchanged tensor costs nothing), compression and delta coding, tags,
rollback, ``diff``, ``verify`` and ``gc``, and ``bank.load`` of a sharded
checkpoint returns whole tensors — no ``torch.distributed`` needed.

No pickle: the checkpoint metadata and non-tensor values are JSON in the
manifest, and the planners here hand values over as objects. DCP's own
collectives between ranks (its gather of plans and write results, its
broadcast of the metadata) pickle what they carry; that is DCP's protocol and
outside this package's control. What the :class:`Writer` puts in them is
plain data (dicts, lists, str, int).

A save that fails on some rank commits nothing, but the ranks that wrote a
part hold its lease, which keeps ``gc`` from its packs (and from what was
deleted since) until it goes stale. Give the part up when ``dcp.save``
raises — use the writer as a context manager, or::

    writer = wb.dcp.Writer(bank, run="r", step=10)
    try:
        dcp.save(state, storage_writer=writer)
    except BaseException as e:
        writer.abort(e)
        raise

:meth:`Writer.abort` never gives up a part the coordinator may have committed.

This package calls only the bank and format layers (through the bank's
two-phase save, :meth:`Bank.save_part <weightbank.Bank.save_part>` and
:meth:`Bank.commit <weightbank.Bank.commit>`); the distributed
:class:`~weightbank.CheckpointManager` uses it. ``import weightbank`` does not
import it (nor torch.distributed.checkpoint) until ``weightbank.dcp`` is used.

Example:
    >>> import torch, warnings, weightbank as wb
    >>> import torch.distributed.checkpoint as dcp
    >>> bank = wb.open("memory://")
    >>> state = {"model": {"w": torch.arange(6.0)}, "epoch": 2}
    >>> with warnings.catch_warnings():
    ...     warnings.simplefilter("ignore")  # single process: DCP warns that no process group runs
    ...     md = dcp.save(state, storage_writer=wb.dcp.Writer(bank, run="r", step=10, tags=["latest-good"]))
    ...     fresh = {"model": {"w": torch.zeros(6)}, "epoch": 0}
    ...     dcp.load(fresh, storage_reader=wb.dcp.Reader(bank, "latest-good"))
    >>> fresh["model"]["w"].tolist() == state["model"]["w"].tolist(), fresh["epoch"]
    (True, 2)
"""

from __future__ import annotations

from .metadata import metadata_from_json, metadata_of, metadata_to_json
from .planners import LoadPlanner, SavePlanner
from .reader import Reader
from .writer import Writer, saved_id

__all__ = [
    "LoadPlanner",
    "Reader",
    "SavePlanner",
    "Writer",
    "metadata_from_json",
    "metadata_of",
    "metadata_to_json",
    "saved_id",
]
