"""The Bank: one content-addressed store for every checkpoint of a model family.

Example:
    >>> import torch, weightbank as wb
    >>> bank = wb.open("memory://")
    >>> info = bank.save({"w": torch.ones(2)}, run="tts", step=1, metrics={"loss": 0.5}, tags=["candidate"])
    >>> bank.load("candidate")["w"].tolist(), bank.resolve("tts@latest") == info.id
    ([1.0, 1.0], True)
"""

from __future__ import annotations

import fnmatch
import itertools
import os
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar, overload

import torch

from ..errors import (
    CheckpointNotFound,
    ConcurrentUpdate,
    IncompatibleState,
    InvalidArgument,
    MissingObject,
    UnsupportedFormat,
)
from ..format.manifest import Manifest
from ..format.tree import flatten, unflatten
from ..storage import open_storage
from ..storage.base import Storage
from . import caching, marker
from .catalog import Catalog
from .checkpoint import relocated
from .copying import Copying
from .diff import diff_manifests
from .environment import warm_up, who
from .events import EventLog
from .handle import Handles
from .index.records import CatalogRecord
from .indexing import Indexing
from .into import plan_into
from .layout import check_name, check_new_name
from .marker import init_storage
from .reader import check_device
from .refs import resolve
from .results import (
    CheckpointDetail,
    CheckpointInfo,
    DiffResult,
    LoadResult,
    PrefetchReport,
    SaveResult,
    TensorInfo,
)
from .shards import read_assembled
from .tagging import Tagging
from .tags import TagStore
from .trust import Verify, check_verify
from .twophase import AUTO, Auto, TwoPhase, checkpoint_header
from .upkeep import Upkeep
from .writer import DEFAULT_KEYFRAME_EVERY, SaveOptions, write_checkpoint

__all__ = ["AUTO", "Auto", "Bank", "CheckpointDetail", "open"]

_T = TypeVar("_T")


#: Load threads of a remote bank: its reads mostly wait on the network.
REMOTE_LOAD_WORKERS = 16


def open(
    url: str | os.PathLike[str] = "./bank",
    *,
    create: bool = True,
    workers: int | None = None,
    storage_options: Mapping[str, Any] | None = None,
    cache: caching.CacheSpec = None,
    cache_size: int | str | None = None,
    verify: Verify = "always",
) -> Bank:
    """Open the bank at ``url``, creating it if asked.

    ``url`` is a directory, ``file://``, ``memory://[name]``, or an object
    store: ``s3://bucket/prefix`` (with ``s3fs``; ``storage_options`` such as
    ``{"endpoint_url": ..., "key": ..., "secret": ...}`` go to its client, or
    come from ``$WEIGHTBANK_STORAGE_OPTIONS`` as JSON), ``gs://``/``az://``
    through fsspec. The bucket must exist.

    Raises NotABank for a non-empty location without a bank (or a file),
    UnsupportedFormat for a bank written by a newer weightbank, and
    MissingDependency when the object store's package is not installed.

    A remote bank keeps the chunks it loads in a local disk cache (``cache``:
    None picks ``$WEIGHTBANK_CACHE`` or ``~/.cache/weightbank``, a path picks
    that directory, False turns it off; ``cache_size`` defaults to 20 GiB).

    ``verify`` is how loads check chunks: ``"always"`` hashes every chunk;
    ``"once"`` trusts a chunk this process verified from the same local files,
    unchanged since (a serving process reloading shared tensors); ``"never"``
    hashes nothing and is unsafe (benchmarks, trusted read-only replicas).
    ``load(..., verify=)`` overrides it per call.

    Example:
        >>> import weightbank as wb
        >>> wb.open("memory://").url
        'memory://'
    """
    storage = open_storage(url, storage_options)
    version = init_storage(storage, create=create)
    return Bank(storage, workers=workers, cache=cache, cache_size=cache_size, version=version, verify=verify)


def _select(names: Sequence[str], select: str | Sequence[str] | None) -> list[int]:
    if select is None:
        return list(range(len(names)))
    patterns = [select] if isinstance(select, str) else list(select)
    return [i for i, n in enumerate(names) if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


class Bank(Handles, Indexing, Tagging, TwoPhase, Upkeep, Copying):
    """A checkpoint bank on one storage backend. Create with :func:`weightbank.open`.

    Thread-safe: several threads may save and load at once; several processes
    (and machines, on object stores) may share one bank. ``cache`` is the local
    disk cache loads read first (None: loads read storage; see :func:`open`);
    ``verify`` how loads check chunks (``read_verify``; see :func:`open`).
    """

    def __init__(
        self,
        storage: Storage,
        *,
        workers: int | None = None,
        cache: caching.CacheSpec = None,
        cache_size: int | str | None = None,
        version: int | None = None,
        verify: Verify = "always",
    ) -> None:
        self.read_verify: Verify = check_verify(verify)
        self.storage = storage
        self.cache = caching.choose_cache(storage, cache, cache_size)
        # Remote reads mostly wait on the network: more of them in flight, not more cores.
        cpu_bound = min(4, max(2, os.cpu_count() or 2))
        self.workers = workers or (REMOTE_LOAD_WORKERS if caching.is_remote(storage) else cpu_bound)
        # A storage handed over directly may have no marker yet: it is treated as a new bank.
        layout = marker.bank_version(storage, missing=marker.BANK_VERSION) if version is None else version
        if layout > marker.BANK_VERSION:
            raise UnsupportedFormat(storage.url, layout, marker.BANK_VERSION)
        self._catalog = Catalog(
            storage, indexed=layout >= marker.INDEXED_VERSION, compact=layout >= marker.COMPACT_VERSION
        )
        self._tags = TagStore(storage)
        self._events = EventLog(storage)
        self._pool_lock = threading.Lock()
        self._load_pool: ThreadPoolExecutor | None = None
        warm_up()  # git is probed here, on the opening thread, never first from a save thread

    @property
    def url(self) -> str:
        """Where the bank lives (a path or URL)."""
        return self.storage.url

    def __repr__(self) -> str:
        return f"Bank({self.url!r})"

    def _pool(self) -> ThreadPoolExecutor:
        """The bank's load workers, started on first use and kept (a swap pays no thread start-up)."""
        with self._pool_lock:
            if self._load_pool is None:
                self._load_pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="wb-load")
            return self._load_pool

    def _read(self, cid: str, m: Manifest, idx: Sequence[int], **kw: Any) -> dict[int, torch.Tensor]:
        """``read_tensors`` (sharded tensors assembled) with this bank's storage, workers, pool and disk cache."""
        pool, cache = self._pool(), self.cache
        kw["verify"] = self.read_verify if kw.get("verify") is None else check_verify(kw["verify"])
        return self._following(
            cid,
            m,
            lambda mm: read_assembled(
                self.storage, cid, mm, idx, workers=self.workers, pool=pool, cache=cache, **kw
            ),
        )

    def _following(self, cid: str, m: Manifest, read: Callable[[Manifest], _T]) -> _T:
        """``read(m)``; once more with the manifest as stored now if a repack moved its chunks since ``m``
        was read (and gc freed the old packs)."""
        try:
            return read(m)
        except MissingObject as e:
            moved = relocated(cid, m, e, self._catalog.fresh)
            if moved is None:
                raise
            return read(moved)

    def close(self) -> None:
        """Release the backend's resources and worker threads (reopen with :func:`open`)."""
        with self._pool_lock:
            pool, self._load_pool = self._load_pool, None
        if pool is not None:
            pool.shutdown(wait=True)
        self.storage.close()

    def __enter__(self) -> Bank:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- naming ------------------------------------------------------------------
    def resolve(self, ref: str) -> str:
        """The full id of the checkpoint ``ref`` names.

        Example:
            >>> import torch, weightbank as wb
            >>> bank = wb.open("memory://"); cid = bank.save({"w": torch.ones(1)}, run="r", step=7).id
            >>> bank.resolve("r@7") == bank.resolve(cid[:8]) == cid
            True
        """
        self._catalog.invalidate()  # a ref that needs the catalog takes a fresh picture; a tag needs none
        return resolve(ref, self._catalog, self._tags)

    def _manifest(self, ref: str) -> tuple[str, Manifest]:
        cid = self.resolve(ref)
        try:
            return cid, self._catalog.get(cid)
        except FileNotFoundError:
            raise CheckpointNotFound(ref, detail=f"{cid[:12]} was deleted") from None

    def _info(
        self, cid: str, m: Manifest, tags_by_target: Mapping[str, list[str]] | None = None
    ) -> CheckpointInfo:
        if tags_by_target is None:
            tags_by_target = self._tags_by_target()
        # One way from a manifest to its info: through the record the catalog index keeps of it.
        return CatalogRecord.of(cid, m).info(tuple(sorted(tags_by_target.get(cid, []))))

    def _tags_by_target(self, *, strict: bool = False) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for name, target in self._tags.live(strict=strict).items():
            out.setdefault(target, []).append(name)
        return out

    # -- save / load --------------------------------------------------------------
    def save(
        self,
        state: object,
        *,
        run: str = "main",
        step: int | None = None,
        metrics: Mapping[str, Any] | None = None,
        config: Mapping[str, Any] | None = None,
        tags: Iterable[str] = (),
        message: str = "",
        meta: Mapping[str, Any] | None = None,
        parent: str | Auto | None = AUTO,
        codec: str = "auto",
        chunk_size: int | None = None,
        keyframe_every: int = DEFAULT_KEYFRAME_EVERY,
        lossy: str | None = None,
    ) -> SaveResult:
        """Store ``state`` as a new immutable checkpoint and return its info.

        ``state`` is any nesting of dict/list/tuple with tensor or JSON-safe
        leaves. Everything is validated before a byte is written; chunks the
        bank already holds are not written again. ``parent`` defaults to the
        run's newest checkpoint; pass a ref (e.g. another run's checkpoint) or
        None for a root.

        ``codec``: ``"auto"`` (default) codes floats as byte planes, losslessly,
        and a chunk as an XOR delta against the parent's chunk at the same
        place when that is smaller, with a standalone keyframe at least every
        ``keyframe_every`` generations (so a load reads at most that many
        links); ``"planes"`` never deltas; ``"zstd"``; ``"raw"`` stores bytes
        as they are (a serving copy that must load at disk speed). ``lossy``
        (``"int8"`` or ``"fp8"``, never chosen automatically) quantizes float
        tensors of 2+ dims with per-channel scales; the info's ``lossy`` then
        lists each one with its measured ``max_abs`` and ``rel_err``.

        Example:
            >>> import torch, weightbank as wb
            >>> bank = wb.open("memory://")
            >>> a = bank.save({"w": torch.ones(1000)}, run="r", step=1)
            >>> b = bank.save({"w": torch.ones(1000)}, run="r", step=2)
            >>> b.parent == a.id, b.save_stats.written_bytes
            (True, 0)
        """
        self._check_run(run)
        tag_names = [check_new_name("tag", t) for t in ([tags] if isinstance(tags, str) else tags)]
        if tag_names:
            self._tags.check_writable()  # a store that cannot move tags fails before any data is written
        self._catalog.writable()  # a format-1 bank gets its index before any data is written
        header = checkpoint_header(
            run=run, step=step, metrics=metrics, config=config, message=message, meta=meta
        )
        options = SaveOptions(
            codec=codec,
            workers=self.workers,
            keyframe_every=keyframe_every,
            lossy=lossy,
            **({"chunk_size": chunk_size} if chunk_size else {}),
        )  # validates the codec choices before anything is written
        spec, leaves = flatten(state)
        header["parent"] = self._parent_of(run, parent)
        header["created"] = time.time()
        cid, manifest, stats = write_checkpoint(
            self.storage, self._catalog, spec=spec, leaves=leaves, header=header, options=options
        )
        for name in tag_names:
            self._move_tag_retrying(
                name, cid, why=f"saved {run}@{step}" if step is not None else f"saved {run}"
            )
        # A new checkpoint carries exactly the tags this save moved to it: no tag scan per save.
        info = self._info(cid, manifest, {cid: tag_names})
        return SaveResult(**info.__dict__, save_stats=stats)

    def _move_tag_retrying(self, name: str, cid: str, why: str) -> None:
        for attempt in range(8):
            try:
                self._tags.update(name, "set", cid, by=who(), why=why)
                return
            except ConcurrentUpdate:
                if attempt == 7:
                    raise
                time.sleep(0.01 * (attempt + 1))

    @overload
    def load(
        self,
        ref: str,
        *,
        into: None = None,
        select: str | Sequence[str] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        strict: bool = True,
        prefix: str = "",
        verify: Verify | None = None,
    ) -> Any: ...

    @overload
    def load(
        self,
        ref: str,
        *,
        into: torch.nn.Module | Mapping[str, torch.Tensor],
        select: str | Sequence[str] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        strict: bool = True,
        prefix: str = "",
        verify: Verify | None = None,
    ) -> LoadResult: ...

    def load(
        self,
        ref: str,
        *,
        into: torch.nn.Module | Mapping[str, torch.Tensor] | None = None,
        select: str | Sequence[str] | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        strict: bool = True,
        prefix: str = "",
        verify: Verify | None = None,
    ) -> Any:
        """Load a checkpoint: the saved state, or (``into=``) copy it into a module in place.

        ``select`` keeps tensors whose names match a glob (``"decoder.*"``);
        ``device`` places tensors (``"cuda:0"``); ``dtype`` casts floating
        tensors only when asked — with ``into=``, a dtype mismatch is an error
        unless ``dtype`` says what to convert to. With ``into=`` the checkpoint
        names (minus ``prefix``) must match the module's state_dict keys
        (``strict``: all of them when nothing is selected); tied parameters stay
        tied, and nothing is written into the module until all checks pass.
        ``verify`` overrides the bank's read verification for this load
        (``"always"``, ``"once"``, ``"never"``; see :func:`open`).

        Example:
            >>> import torch, weightbank as wb
            >>> bank = wb.open("memory://"); lin = torch.nn.Linear(2, 2)
            >>> _ = bank.save(lin.state_dict(), tags=["v1"])
            >>> bank.load("v1", into=torch.nn.Linear(2, 2)).loaded
            ('weight', 'bias')
        """
        t0 = time.perf_counter()
        mode = None if verify is None else check_verify(verify)
        cid, m = self._manifest(ref)
        dev = check_device(device)
        names = [t.name for t in m.tensors]
        chosen = _select(names, select)
        if select is not None and not chosen:
            raise IncompatibleState(f"select {select!r} matches no tensor of {cid[:12]}", names[:20])
        if into is not None:
            return self._load_into(cid, m, into, chosen, select is not None, dtype, strict, prefix, t0, mode)
        loaded = self._read(cid, m, chosen, device=dev, verify=mode)
        if dtype is not None:
            loaded = {i: (t.to(dtype) if t.is_floating_point() else t) for i, t in loaded.items()}
        tensors: list[torch.Tensor | None] = [loaded.get(i) for i in range(len(m.tensors))]
        return unflatten(m.tree, tensors)

    def _load_into(
        self,
        cid: str,
        m: Manifest,
        into: torch.nn.Module | Mapping[str, torch.Tensor],
        chosen: list[int],
        selected: bool,
        dtype: torch.dtype | None,
        strict: bool,
        prefix: str,
        t0: float,
        verify: Verify | None = None,
    ) -> LoadResult:
        target = into.state_dict(keep_vars=False) if isinstance(into, torch.nn.Module) else dict(into)
        write, loaded, skipped = plan_into(
            cid, m, target, chosen, selected=selected, dtype=dtype, strict=strict, prefix=prefix
        )
        self._read(cid, m, list(write), into=write, verify=verify)
        info = self._info(cid, m)
        return LoadResult(checkpoint=info, loaded=loaded, skipped=skipped, seconds=time.perf_counter() - t0)

    def prefetch(self, ref: str, *, select: str | Sequence[str] | None = None) -> PrefetchReport:
        """Download and verify ``ref``'s chunks (of tensors ``select`` matches) into the disk cache; make no tensor.

        A later load of them reads only local files. Without a disk cache (local and memory
        banks by default) there is nothing to warm: the report says ``enabled=False``.

        Example:
            >>> import tempfile, torch, weightbank as wb
            >>> bank = wb.open("memory://", cache=tempfile.mkdtemp()); cid = bank.save({"w": torch.ones(4)}).id
            >>> bank.prefetch(cid).fetched_bytes, bank.prefetch(cid).cached_bytes
            (16, 16)
        """
        cid, m = self._manifest(ref)
        chosen = _select([t.name for t in m.tensors], select)
        return self._following(
            cid, m, lambda mm: caching.prefetch(self.storage, self.cache, cid, mm, chosen, self._pool())
        )

    # -- inspection ---------------------------------------------------------------
    def log(self, run: str | None = None, *, limit: int | None = None) -> list[CheckpointInfo]:
        """Checkpoints (of ``run``, or all), newest first; only the ``limit`` newest when given.

        Reads the catalog index — with ``limit``, only as much of it as the
        newest ``limit`` need — and never a manifest.

        Example:
            >>> import torch, weightbank as wb
            >>> bank = wb.open("memory://")
            >>> for s in (1, 2, 3): _ = bank.save({"w": torch.ones(1)}, run="r", step=s)
            >>> [c.step for c in bank.log("r")], [c.step for c in bank.log(limit=2)]
            ([3, 2, 1], [3, 2])
        """
        if run is not None:
            check_name("run", run)
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
            raise InvalidArgument("limit", limit, "limit must be an int >= 0 or None")
        self._catalog.refresh()
        view = self._catalog.view()
        if run is not None and view.latest(run) is None:
            names = view.run_names()
            raise CheckpointNotFound(
                f"{run}@latest", [r for r in names if r.startswith(run[:3])], detail=f"no run {run!r}"
            )
        if run is not None:
            records = list(itertools.islice(view.newest(run), limit))
        elif limit is not None:
            records = view.recent(limit)
        else:
            records = sorted(view.everything(), key=lambda r: (r.created, r.id), reverse=True)
        by_target = self._tags_by_target()
        return [r.info(tuple(sorted(by_target.get(r.id, [])))) for r in records]

    def runs(self) -> list[str]:
        """Names of every run in the bank (from the catalog index).

        Example:
            >>> import torch, weightbank as wb
            >>> bank = wb.open("memory://"); _ = bank.save({"w": torch.ones(1)}, run="tts")
            >>> bank.runs()
            ['tts']
        """
        self._catalog.refresh()
        return self._catalog.view().run_names()

    def show(self, ref: str) -> CheckpointDetail:
        """Metadata, metrics and the per-tensor table of one checkpoint."""
        cid, m = self._manifest(ref)
        rows = []
        for i, t in enumerate(m.tensors):
            base = m.tensors[t.alias_of] if t.alias_of is not None else t
            chunks = [m.chunks[c] for c in base.chunks]
            rows.append(
                TensorInfo(
                    name=t.name,
                    dtype=t.dtype,
                    shape=t.shape,
                    nbytes=t.nbytes,
                    chunks=len(chunks),
                    stored_bytes=0 if t.alias_of is not None else sum(c.stored_len for c in chunks),
                    alias_of=base.name if t.alias_of is not None else None,
                    codecs=tuple(sorted({c.codec for c in chunks})),
                    content_key=m.content_key(i),
                    lossy=m.lossy[base.name].to_json() if base.name in m.lossy else {},
                )
            )
        return CheckpointDetail(info=self._info(cid, m), tensors=tuple(rows), packs=m.packs)

    def load_tensors(
        self,
        ref: str,
        names: Sequence[str],
        *,
        device: str | torch.device | None = None,
        verify: Verify | None = None,
    ) -> dict[str, torch.Tensor]:
        """Load exactly the named tensors of a checkpoint (no glob matching), verified like every load.

        Tensors that alias each other come back as one tensor. Unknown names
        raise IncompatibleState listing them.

        Example:
            >>> import torch, weightbank as wb
            >>> bank = wb.open("memory://"); cid = bank.save({"a[0]": torch.ones(1), "b": torch.zeros(1)}).id
            >>> list(bank.load_tensors(cid, ["a[0]"]))
            ['a[0]']
        """
        mode = None if verify is None else check_verify(verify)
        cid, m = self._manifest(ref)
        dev = check_device(device)
        index = {t.name: i for i, t in enumerate(m.tensors)}
        unknown = [n for n in names if n not in index]
        if unknown:
            raise IncompatibleState(
                f"checkpoint {cid[:12]} has no tensor(s) {', '.join(map(repr, unknown[:8]))}", unknown
            )
        loaded = self._read(cid, m, [index[n] for n in names], device=dev, verify=mode)
        return {n: loaded[index[n]] for n in names}

    def diff(self, a: str, b: str) -> DiffResult:
        """Per-tensor changes from checkpoint ``a`` to ``b`` (same / changed / added / removed)."""
        a_id, ma = self._manifest(a)
        b_id, mb = self._manifest(b)
        return diff_manifests(a_id, ma, b_id, mb, self._read)
