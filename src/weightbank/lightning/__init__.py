"""Lightning on a bank: ``Trainer(plugins=[wb.lightning.BankIO(bank, run="r")])``.

``pip install 'weightbank[lightning]'``. :class:`BankIO` is a Lightning
``CheckpointIO``: every checkpoint Lightning saves (``ModelCheckpoint``'s
top-k and ``last``, ``trainer.save_checkpoint``) goes into the bank as a
checkpoint of ``run`` — deduplicated and hash-verified like any other, with
the monitored metric recorded so ``run@best:val_loss`` resolves — and the
path Lightning asked for receives a small JSON *pointer file* naming it::

    {"weightbank": 1, "bank": "/data/bank", "id": "3f9c…", "run": "r", "step": 120}

Lightning keeps working on paths as it always does (top-k bookkeeping,
``save_last``, ``ckpt_path="last"`` finds the newest ``last*.ckpt``), while the
bytes live in the bank: ``remove_checkpoint`` deletes the pointer and the
checkpoint it names (``gc`` frees the data later) unless another pointer or a
tag still names it, and ``ModelCheckpoint``'s best checkpoint is kept tagged
``<run>.best.<monitor>``. ``ckpt_path`` may also be a ref:
``trainer.fit(model, ckpt_path="wb://r@best:val_loss")``.

Values that are not tensors or JSON (a ``Namespace`` of hyper-parameters,
dataclasses, enums, paths, ...) are stored with the explicit JSON encoding of
:mod:`weightbank.lightning.encoding`; anything else is refused with an error
naming its key. Nothing is pickled, and a pointer file holds no data: a
``torch.load`` of one fails rather than running code.

Example:
    >>> import weightbank as wb
    >>> import weightbank.lightning
    >>> io = wb.lightning.BankIO(wb.open("memory://"), run="r")
    >>> io.run
    'r'
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import threading
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

try:
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
    from lightning.pytorch.callbacks import Callback
except ImportError as e:  # pragma: no cover - exercised only without the extra
    from ..errors import MissingDependency

    raise MissingDependency("weightbank.lightning", "lightning", "lightning") from e

from ..bank.bank import Bank
from ..bank.bank import open as open_bank
from ..errors import CheckpointNotFound, IncompatibleState, InvalidArgument, InvalidRef, WeightbankError
from ..training.rng import capture_rng, check_rng, restore_rng
from .encoding import DecodeWarning, decode, encode

__all__ = ["POINTER_VERSION", "BankIO", "DecodeWarning", "ExactResume", "read_pointer"]

#: The ``"weightbank"`` field of a pointer file this code writes and reads.
POINTER_VERSION = 1
_REF_PREFIX = "wb://"
_POINTER_MAX = 64 << 10  # a pointer is ~200 bytes; a bigger file is not one


def read_pointer(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The fields of the pointer file at ``path``; IncompatibleState if it is not one.

    Example:
        >>> import tempfile, json, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "last.ckpt"
        >>> _ = p.write_text(json.dumps({"weightbank": 1, "id": "ab" * 32, "run": "r", "step": 3}))
        >>> read_pointer(p)["step"]
        3
    """
    p = Path(path)
    try:
        with p.open("rb") as f:
            raw = f.read(_POINTER_MAX + 1)
    except FileNotFoundError:
        raise CheckpointNotFound(str(path)) from None
    except OSError as e:  # a directory, no permission: not a pointer this can read
        raise IncompatibleState(f"{path} is not a readable weightbank pointer file ({e})") from None
    try:
        doc = json.loads(raw) if len(raw) <= _POINTER_MAX else None
    except (ValueError, RecursionError):  # not UTF-8, not JSON, nested past the parser's depth
        doc = None
    version = doc.get("weightbank") if isinstance(doc, dict) else None
    if not isinstance(doc, dict) or type(version) is not int or version != POINTER_VERSION:
        raise IncompatibleState(
            f"{path} is not a weightbank pointer file (a Lightning .ckpt written without BankIO?);"
            " bring it into the bank with `weightbank import`, or pass a ref as ckpt_path='wb://run@latest'"
        )
    cid = doc.get("id")
    if not isinstance(cid, str) or not re.fullmatch(r"[0-9a-f]{64}", cid):
        raise IncompatibleState(f"{path}: a weightbank pointer file with a malformed id {cid!r}")
    return doc


def _model_checkpoints(checkpoint: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """(monitor, state) of every ``ModelCheckpoint`` callback state with a monitor in ``checkpoint``."""
    callbacks = checkpoint.get("callbacks")
    if not isinstance(callbacks, Mapping):
        return []
    return [
        (state["monitor"], state)
        for key, state in callbacks.items()
        if isinstance(key, str)
        and key.startswith("ModelCheckpoint")
        and isinstance(state, Mapping)
        and isinstance(state.get("monitor"), str)
    ]


def _metrics(checkpoint: Mapping[str, Any], path: str) -> dict[str, float]:
    """The monitored score of this checkpoint, for each ``ModelCheckpoint`` that holds it as a top-k.

    Read from the callback's ``best_k_models[path]``: ``current_score`` is the
    score of the last top-k candidate, which a ``last.ckpt`` or a
    ``trainer.save_checkpoint`` of a later state would wrongly claim as theirs.
    """
    out: dict[str, float] = {}
    here = os.path.abspath(path)
    for monitor, state in _model_checkpoints(checkpoint):
        best_k = state.get("best_k_models")
        if not isinstance(best_k, Mapping):
            continue
        scores = [v for k, v in best_k.items() if isinstance(k, str) and os.path.abspath(k) == here]
        score = scores[0] if scores else None
        if isinstance(score, torch.Tensor) and score.numel() == 1:
            score = score.item()
        if isinstance(score, (int, float)) and not isinstance(score, bool):
            out[monitor] = float(score)
    return out


def _best_paths(checkpoint: Mapping[str, Any]) -> dict[str, str]:
    """monitor → the best model path each ``ModelCheckpoint`` holds after this save."""
    return {
        monitor: state["best_model_path"]
        for monitor, state in _model_checkpoints(checkpoint)
        if isinstance(state.get("best_model_path"), str) and state["best_model_path"]
    }


class BankIO(CheckpointIO):
    """A Lightning ``CheckpointIO`` that stores checkpoints in a bank (see the module docstring).

    Args:
        bank: a :class:`~weightbank.Bank` or a bank URL / directory (opened, created if missing).
        run: the run every checkpoint is saved into.
        codec: the bank codec (``"raw"``: the fastest save; ``"auto"``: compressed, deltas).
        best_tags: keep ``<run>.best.<monitor>`` on ``ModelCheckpoint``'s best checkpoint.

    Works under ``AsyncCheckpointIO`` (saves from its thread; a bank is thread-safe). A path
    removed before its queued save landed is removed as soon as it lands.

    Example:
        >>> import weightbank as wb
        >>> bank = wb.open("memory://")
        >>> io = wb.lightning.BankIO(bank, run="r")
        >>> import tempfile, os
        >>> path = os.path.join(tempfile.mkdtemp(), "epoch=0.ckpt")
        >>> io.save_checkpoint({"state_dict": {"w": __import__("torch").ones(2)}, "global_step": 5}, path)
        >>> io.load_checkpoint(path)["global_step"], bank.info("r@5").step
        (5, 5)
    """

    def __init__(
        self,
        bank: Bank | str | os.PathLike[str],
        run: str = "main",
        *,
        codec: str = "raw",
        best_tags: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(run, str) or not run:
            raise InvalidArgument("run", run, "a run name")
        self.bank = bank if isinstance(bank, Bank) else open_bank(bank)
        self.run = run
        self.codec = codec
        self.best_tags = best_tags
        # Paths removed before their save finished (AsyncCheckpointIO queues saves, but calls
        # remove_checkpoint at once): the save, when it lands, is removed too.
        self._removed_early: set[str] = set()
        # Checkpoints Lightning removed that a tag kept (the best): deleted once the tag moves off.
        self._kept_by_tag: set[str] = set()
        self._lock = threading.Lock()

    # -- saving ---------------------------------------------------------------------------------

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        """Save ``checkpoint`` into the bank, then write the pointer file at ``path`` (atomically)."""
        if storage_options is not None:
            raise TypeError(
                "BankIO.save_checkpoint takes no storage_options (Lightning passes None unless you do)"
            )
        tree = encode(dict(checkpoint))
        # A pointer overwritten (``last.ckpt``): its checkpoint goes, as a file would.
        replaced: str | None = None
        with contextlib.suppress(WeightbankError, OSError):
            replaced = str(read_pointer(path)["id"])
        step = checkpoint.get("global_step")
        step = step if isinstance(step, int) and not isinstance(step, bool) and step >= 0 else None
        meta = {"lightning": {"path": os.fspath(path), "epoch": checkpoint.get("epoch")}}
        info = self.bank.save(
            tree,
            run=self.run,
            step=step,
            metrics=_metrics(checkpoint, os.fspath(path)),
            meta=meta,
            codec=self.codec,
        )
        pointer = {
            "weightbank": POINTER_VERSION,
            "bank": self.bank.url,
            "id": info.id,
            "run": self.run,
            "step": step,
        }
        with self._lock:  # with remove_checkpoint's check: a removal lands before or after, never between
            _write_atomic(Path(path), json.dumps(pointer, indent=1).encode() + b"\n")
            early = os.path.abspath(path) in self._removed_early
            self._removed_early.discard(os.path.abspath(path))
        if replaced is not None and replaced != info.id:
            self._forget(Path(path).parent, replaced, f"Lightning overwrote {Path(path).name}")
        if early:
            self.remove_checkpoint(path)
        elif self.best_tags:
            self._tag_best(checkpoint, os.fspath(path), info.id)

    def _tag_best(self, checkpoint: Mapping[str, Any], path: str, cid: str) -> None:
        for monitor, best in _best_paths(checkpoint).items():
            target = cid if os.path.abspath(best) == os.path.abspath(path) else None
            if target is None:
                with contextlib.suppress(WeightbankError, OSError):
                    target = read_pointer(best)["id"]
            if target is None:
                continue
            name = f"{self.run}.best.{re.sub(r'[^A-Za-z0-9_.-]', '_', monitor)}"
            previous: str | None = None
            with contextlib.suppress(CheckpointNotFound):
                previous = self.bank.resolve(name)
            if previous == target:
                continue
            self.bank.tag(name, target, why=f"Lightning ModelCheckpoint best {monitor}")
            with self._lock:
                was_kept = previous in self._kept_by_tag
                self._kept_by_tag.discard(previous or "")
            if previous is not None and was_kept:  # removed while it was the best: it goes now
                self._forget(
                    Path(path).parent, previous, f"Lightning removed it; no longer the best {monitor}"
                )

    # -- loading --------------------------------------------------------------------------------

    def resolve(self, path: Any) -> str:
        """The checkpoint id ``path`` names: a ``wb://REF`` or a pointer file."""
        text = os.fspath(path)
        if text.startswith(_REF_PREFIX):
            ref = text[len(_REF_PREFIX) :]
            if not ref:
                raise InvalidRef(text, "wb://REF needs a ref, e.g. wb://run@latest")
            return self.bank.resolve(ref)
        return str(read_pointer(text)["id"])

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """The checkpoint dict ``path`` names, hash-verified, with every encoded value decoded.

        ``map_location``: a device, a device string, or a mapping / callable as
        ``torch.load`` takes it (applied to every tensor); None leaves them on CPU.
        ``weights_only`` is accepted for Lightning's sake: nothing is unpickled either way.
        """
        del weights_only  # no pickle: every load is as safe as weights_only=True, and complete
        state = decode(self.bank.load(self.resolve(path)))
        if not isinstance(state, dict):
            raise IncompatibleState(
                f"{os.fspath(path)} names a checkpoint that is not a Lightning checkpoint dict"
            )
        moved: dict[str, Any] = _map_location(state, map_location)
        return moved

    # -- removing -------------------------------------------------------------------------------

    def remove_checkpoint(self, path: Any) -> None:
        """Delete the pointer at ``path`` and, unless something else names it, its checkpoint."""
        p = Path(os.fspath(path))
        if p.is_dir():  # not ours (a sharded strategy's directory): removed as Lightning's own IO would
            shutil.rmtree(p, ignore_errors=True)
            return
        with self._lock:  # a save of the same path writes its pointer under it too
            try:
                cid = str(read_pointer(p)["id"])
            except CheckpointNotFound:
                # Its save may still be queued (AsyncCheckpointIO): it is removed when it lands.
                self._removed_early.add(os.path.abspath(p))
                return
            except IncompatibleState:  # a file of Lightning's own (saved before BankIO): removed as asked
                p.unlink(missing_ok=True)
                return
            p.unlink(missing_ok=True)
        self._forget(p.parent, cid, f"Lightning removed {p.name}")

    def _forget(self, directory: Path, cid: str, why: str) -> None:
        """Delete checkpoint ``cid`` unless a pointer in ``directory`` or a tag still names it."""
        if self._still_named(directory, cid):
            return
        try:
            self.bank.delete(cid, why=why)
        except CheckpointNotFound:
            pass  # deleted already (by hand, or by a prune)
        except IncompatibleState:  # tagged (the best, a release): the tag keeps it
            with self._lock:
                self._kept_by_tag.add(cid)

    def _still_named(self, directory: Path, cid: str) -> bool:
        """Whether another pointer file in ``directory`` names ``cid`` (``save_last="link"`` copies one)."""
        try:
            entries = list(directory.iterdir())
        except OSError:
            return False
        for entry in entries:
            if entry.suffix != ".ckpt" or not entry.is_file():
                continue
            with contextlib.suppress(WeightbankError, OSError):
                if read_pointer(entry)["id"] == cid:
                    return True
        return False

    def teardown(self) -> None:
        """Nothing to release: the bank stays open for the caller."""


class ExactResume(Callback):
    """Save every global RNG with each checkpoint and restore it on resume (a Lightning callback).

    Lightning's checkpoint holds no RNG state, so after a resume dropout,
    random augmentation and anything else drawing from ``torch``, ``numpy``
    or ``random`` take different values than the uninterrupted run would.
    This callback's state (captured on the training thread when Lightning
    builds the checkpoint, so ``AsyncCheckpointIO`` saves the right one) is
    Python's, numpy's, torch's CPU and every initialized CUDA generator;
    ``load_state_dict`` puts them back. With a loader whose position is in
    the checkpoint too (``wb.ResumableLoader``: Lightning saves and restores a
    loader that has ``state_dict``), a resume mid-epoch continues bit for bit.

    Example:
        >>> import torch, weightbank.lightning as wl
        >>> cb = wl.ExactResume()
        >>> saved = cb.state_dict()
        >>> a = torch.rand(1)
        >>> cb.load_state_dict(saved)
        >>> torch.equal(torch.rand(1), a)
        True
    """

    def __init__(self) -> None:
        super().__init__()
        self._warned = False

    def state_dict(self) -> dict[str, Any]:
        """Every global generator's state, as a tree of tensors, arrays and JSON values."""
        dist = torch.distributed
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 and not self._warned:
            self._warned = True  # Lightning saves rank 0's callback state only
            warnings.warn(
                "ExactResume saves rank 0's RNG state only: after a resume every rank starts from it,"
                " so a multi-process resume is not bit-exact (single-process runs are)",
                stacklevel=2,
            )
        return {"rng": capture_rng()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the generators; IncompatibleState (and nothing changed) if the state is malformed."""
        rng = state_dict.get("rng") if isinstance(state_dict, Mapping) else None
        if not isinstance(rng, Mapping):
            raise IncompatibleState("ExactResume: the checkpoint's callback state holds no RNG state")
        check_rng(rng)
        restore_rng(rng)


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _map_location(state: Any, where: Any) -> Any:
    """``state`` with every tensor moved as ``torch.load(map_location=where)`` would (None: as it is)."""
    if where is None:
        return state
    call: Any = where if callable(where) and not isinstance(where, (str, torch.device)) else None
    if isinstance(where, Mapping):
        device: torch.device | None = torch.device(where.get("cpu", "cpu"))
    else:
        device = None if call is not None else torch.device(where)

    def move(t: torch.Tensor) -> Any:
        return call(t, "cpu") if call is not None else t.to(device)  # torch.load's (storage, location)

    def walk(node: Any) -> Any:
        if isinstance(node, torch.Tensor):
            return move(node)
        if isinstance(node, dict):
            for k in list(node):
                node[k] = walk(node[k])
            return node
        if isinstance(node, list):
            return [walk(v) for v in node]
        if isinstance(node, tuple):
            return tuple(walk(v) for v in node)
        return node

    return walk(state)
