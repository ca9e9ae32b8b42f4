"""A DataLoader wrapper whose position is part of the checkpoint: resume mid-epoch at the next batch.

``ResumableLoader`` owns the order of the data: epoch ``e`` visits the dataset
in the permutation drawn from a generator seeded with ``(seed, e)`` (the
global RNG is never consumed), cut into batches. Its state is ``epoch``,
``index`` (batches of the epoch already handed out) and ``seed``. Restoring
it starts the next iteration at batch ``index`` of epoch ``epoch`` directly:
earlier batches are not produced and thrown away.

Workers: with ``num_workers > 0`` the batches are loaded by a
``torch.utils.data.DataLoader`` built for the remaining batches of the epoch.
Each sample is fetched in a worker with Python ``random``, numpy's global
generator and torch's generator seeded from ``(seed, epoch, position in the
epoch)``, so random augmentation gives the same sample whichever worker
loads it and however often the loader was restarted — the property bit-exact
resume needs. With ``num_workers=0`` samples are fetched in the training
process with its own (checkpointed) generators. The loader's own generator
(worker base seeds) is derived from the same triple. Workers are forked while
the checkpoint manager's writer thread may be running; the manager makes sure
that thread starts no subprocess, but a dataset that can be pickled may pass
``multiprocessing_context="forkserver"`` to avoid fork-with-threads hazards
altogether (at the cost of slower worker start-up, once per epoch).

Ranks: with ``rank`` and ``world_size`` (a ``torch.distributed`` job) every rank
draws the same permutation and visits every ``world_size``-th sample of it,
starting at its ``rank`` — ``DistributedSampler``'s split, the order padded by
wrapping around so every rank gets as many batches. The position counts this
rank's batches, which is the same number on every rank. A position saved at
another world size is converted through the samples the whole job consumed
(``index * batch_size * world_size``), rounded down to a batch: a few samples
may be seen twice, none skipped.

Changing the position (``load_state_dict``) while a ``for`` loop is iterating
takes effect at the loop's next batch: the loop continues from the new
position (this is how a rollback skips batches).

Example:
    >>> import torch
    >>> from weightbank.training.data import ResumableLoader
    >>> loader = ResumableLoader(list(range(10)), batch_size=4, shuffle=True, seed=1)
    >>> it = iter(loader); first = next(it); pos = loader.state_dict()
    >>> rest = [b.tolist() for b in it]
    >>> loader.load_state_dict(pos); [b.tolist() for b in loader] == rest
    True
"""

from __future__ import annotations

import hashlib
import random
import struct
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, get_worker_info

from ..errors import InvalidArgument

__all__ = ["DataPositionWarning", "ResumableLoader", "mix_seed", "warn_no_position"]


class DataPositionWarning(UserWarning):
    """A run resumed mid-way without a data position: it will not see the batches an uninterrupted run would."""


def warn_no_position(run: str, done: int, stacklevel: int = 2) -> None:
    """Warn (DataPositionWarning) that ``run`` resumes at step ``done`` with no data position to restore."""
    warnings.warn(
        DataPositionWarning(
            f"run {run!r} resumes at step {done} without a data position: the TrainingState has no data="
            " object, so the data starts over and, unless that step ended an epoch, the run trains on other"
            " batches than an uninterrupted one would. Pass a weightbank.ResumableLoader (or any loader with"
            " state_dict()/load_state_dict(), the Stateful protocol) as TrainingState(data=...) for an exact"
            " resume."
        ),
        stacklevel=stacklevel + 1,
    )


def mix_seed(*parts: int) -> int:
    """A 63-bit seed derived from integers (stable across processes and platforms).

    Example:
        >>> mix_seed(1, 2) == mix_seed(1, 2) != mix_seed(2, 1)
        True
    """
    raw = b"".join(struct.pack("<q", int(p) & 0x7FFFFFFFFFFFFFFF) for p in parts)
    return int.from_bytes(hashlib.blake2b(raw, digest_size=8).digest(), "little") & 0x7FFFFFFFFFFFFFFF


class _Keyed(torch.utils.data.Dataset[Any]):
    """Fetches ``dataset[idx]`` for a key ``(epoch, pos, idx)``; in a worker, seeds every RNG from the key."""

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int, int]) -> Any:
        epoch, pos, idx = key
        if get_worker_info() is not None:
            s = mix_seed(self.seed, epoch, pos)
            random.seed(s)
            np.random.seed(s & 0xFFFFFFFF)
            torch.manual_seed(s)
        return self.dataset[idx]


class _Batches:
    """The batch keys of one epoch from batch ``start`` on (a batch sampler).

    ``visits`` are (position in the epoch's global order, dataset index) pairs.
    """

    def __init__(
        self, visits: list[tuple[int, int]], epoch: int, start: int, batch_size: int, n_batches: int
    ) -> None:
        self.visits, self.epoch, self.start = visits, epoch, start
        self.batch_size, self.n_batches = batch_size, n_batches

    def __len__(self) -> int:
        return self.n_batches - self.start

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        bs = self.batch_size
        for b in range(self.start, self.n_batches):
            yield [(self.epoch, p, i) for p, i in self.visits[b * bs : (b + 1) * bs]]


class ResumableLoader:
    """A map-style dataset loader with a checkpointable position (see the module docstring).

    Iterating yields the rest of the current epoch; when the epoch is
    exhausted the position moves to the start of the next one. ``seed``
    defaults to ``torch.initial_seed()`` (so ``torch.manual_seed`` fixes it)
    and is saved in the state. ``rank`` and ``world_size`` give this rank its
    share of every epoch (see the module docstring). Other keyword arguments
    (``collate_fn``, ``pin_memory``, ``timeout``, ``prefetch_factor``,
    ``multiprocessing_context``, ...) go to ``DataLoader``.

    Example:
        >>> from weightbank.training.data import ResumableLoader
        >>> loader = ResumableLoader(list(range(6)), batch_size=2)
        >>> len(loader), [b.tolist() for b in loader], loader.state_dict()["epoch"]
        (3, [[0, 1], [2, 3], [4, 5]], 1)
    """

    def __init__(
        self,
        dataset: Any,
        batch_size: int = 1,
        *,
        shuffle: bool = False,
        drop_last: bool = False,
        seed: int | None = None,
        num_workers: int = 0,
        collate_fn: Callable[[list[Any]], Any] | None = None,
        rank: int = 0,
        world_size: int = 1,
        **loader_kwargs: Any,
    ) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise InvalidArgument("batch_size", batch_size, "must be a positive int")
        if not (isinstance(world_size, int) and isinstance(rank, int) and 0 <= rank < world_size):
            raise InvalidArgument("rank", rank, f"need 0 <= rank < world_size (world_size={world_size!r})")
        for bad in ("sampler", "batch_sampler", "shuffle", "generator", "worker_init_fn"):
            if bad in loader_kwargs:
                raise InvalidArgument(
                    bad, loader_kwargs[bad], "ResumableLoader decides it itself (it owns the data order)"
                )
        self.dataset = dataset
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = int(torch.initial_seed() if seed is None else seed) & 0x7FFFFFFFFFFFFFFF
        self.num_workers = num_workers
        self.collate_fn = collate_fn
        self.loader_kwargs = loader_kwargs
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self.index = 0
        self._generation = 0
        self._order: tuple[int, list[int]] | None = None

    def __len__(self) -> int:
        """Batches per epoch (of this rank)."""
        n = -(-len(self.dataset) // self.world_size)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def order(self, epoch: int) -> list[int]:
        """The dataset indices of ``epoch`` in the order they are visited."""
        if self._order is None or self._order[0] != epoch:
            n = len(self.dataset)
            if self.shuffle:
                g = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
                perm: list[int] = torch.randperm(n, generator=g).tolist()
            else:
                perm = list(range(n))
            self._order = (epoch, perm)
        return self._order[1]

    def visits(self, epoch: int) -> list[tuple[int, int]]:
        """(position in the epoch's order, dataset index) of the samples this rank visits, in order."""
        order = self.order(epoch)
        if self.world_size == 1:
            return list(enumerate(order))
        n = len(order)
        total = -(-n // self.world_size) * self.world_size
        return [(p, order[p % n]) for p in range(self.rank, total, self.world_size)]

    def batch_indices(self, epoch: int, index: int) -> list[int]:
        """The dataset indices of this rank's batch ``index`` of ``epoch`` (what a position refers to)."""
        visits = self.visits(epoch)[index * self.batch_size : (index + 1) * self.batch_size]
        return [i for _, i in visits]

    # -- position --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The position: epoch, batches already handed out in it, the seed, and the layout it assumes."""
        return {
            "epoch": self.epoch,
            "index": self.index,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "shuffle": self.shuffle,
            "batches_per_epoch": len(self),
            "rank": self.rank,
            "world_size": self.world_size,
        }

    @staticmethod
    def parse_position(state: Any) -> tuple[int, int, int, int]:
        """(epoch, index, seed, saved world size) of a position; InvalidArgument if it is not one.

        Example:
            >>> ResumableLoader.parse_position({"epoch": 1, "index": 2, "seed": 3})
            (1, 2, 3, 1)
        """
        try:
            epoch, index, seed = int(state["epoch"]), int(state["index"]), int(state["seed"])
            world = int(state.get("world_size", 1))
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise InvalidArgument("state", state, f"not a ResumableLoader state ({e!r})") from None
        if epoch < 0 or index < 0:
            raise InvalidArgument("state", state, f"bad loader position epoch={epoch} index={index}")
        return epoch, index, seed, world

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Move to a saved position; a loop iterating right now continues from it."""
        epoch, index, seed, saved_world = self.parse_position(state)
        if saved_world != self.world_size and saved_world > 0:
            # Same samples consumed by the whole job, in this world size's batches (rounded down).
            index = index * saved_world // self.world_size
        self.epoch, self.index, self.seed = epoch, index, seed
        self._order = None
        self._generation += 1

    # -- iteration ---------------------------------------------------------------------
    def _dataloader(self, epoch: int, start: int) -> DataLoader[Any]:
        batches = _Batches(self.visits(epoch), epoch, start, self.batch_size, len(self))
        return DataLoader(
            _Keyed(self.dataset, self.seed),
            batch_sampler=batches,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            generator=torch.Generator().manual_seed(mix_seed(self.seed, epoch, start, 1)),
            **self.loader_kwargs,
        )

    def __iter__(self) -> Iterator[Any]:
        if self.index >= len(self):
            self.epoch, self.index = self.epoch + 1, 0
        while True:
            generation, epoch = self._generation, self.epoch
            moved = False
            for batch in self._dataloader(epoch, self.index):
                if self._generation != generation:
                    moved = True
                    break
                self.index += 1
                yield batch
                if self._generation != generation:
                    moved = True
                    break
            if not moved:
                self.epoch, self.index = epoch + 1, 0
                return
            # The position was moved while iterating: go on from there (same epoch or not).
            if self.index >= len(self):
                self.epoch, self.index = self.epoch + 1, 0
