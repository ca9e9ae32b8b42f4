"""Every error weightbank raises, in one tree.

Each class also inherits the built-in exception a caller would naturally catch,
so ``except KeyError`` keeps working for a missing checkpoint and
``except OSError`` for a damaged object::

    WeightbankError
    ├── CheckpointNotFound      (KeyError)     unknown ref; carries close matches
    │   └── TagNotFound                        unknown tag
    ├── AmbiguousRef            (ValueError)   id prefix matching several checkpoints
    ├── InvalidRef              (ValueError)   ref that does not parse
    ├── InvalidName             (ValueError)   bad tag / run name
    ├── InvalidArgument         (ValueError)   an argument out of range or of the wrong kind
    │   └── NotMovable                         a format-1/2 checkpoint asked to move to another bank
    ├── InvalidState            (TypeError)    a leaf that cannot be stored (no pickle)
    ├── IncompatibleState       (ValueError)   shape/dtype/key mismatch on load into=
    ├── ExternalFileError       (ValueError)   a file to import/export is unreadable or unknown
    │   ├── ExternalFileNotFound (FileNotFoundError) the file to import does not exist
    │   └── TargetExists        (FileExistsError)   export would overwrite a file
    ├── NoHistory               (LookupError)  rollback past a tag's first target
    ├── AlreadyClosed           (ValueError)   a manager or saver used after close()
    ├── ConcurrentUpdate        (RuntimeError) a compare-and-swap lost a race
    ├── DeviceError             (RuntimeError) requested device not available
    ├── TrainingDiverged        (RuntimeError) training kept diverging after automatic rollbacks
    ├── BudgetExceeded          (MemoryError)  a serving load or pin that cannot fit its byte budget
    ├── InvalidRequest          (ValueError)   a serving request that does not fit the model or handler
    ├── NonFiniteOutput         (ArithmeticError) a served model answered a request with NaN/inf
    ├── HandlerError            (RuntimeError) a serving handler or model failed on a request (a server fault)
    ├── RouteNotFound           (KeyError)     unknown serving route
    ├── MissingDependency       (ImportError)  a backend's package (s3fs, gcsfs...) is not installed
    └── StorageError            (OSError)      a backend could not do its job
        ├── NotABank                           path exists but holds no bank
        ├── UnsupportedFormat                  bank written by a newer weightbank
        ├── MissingObject       (FileNotFoundError) object referenced but absent
        └── CorruptObject                      bytes do not match their hash
            └── IndexDamaged                   the catalog index cannot be trusted (the bank lists manifests instead)

Example:
    >>> import weightbank as wb
    >>> try:
    ...     wb.open("memory://").load("nope")
    ... except KeyError as e:          # CheckpointNotFound is a KeyError too
    ...     print(type(e).__name__)
    CheckpointNotFound
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = [
    "AlreadyClosed",
    "AmbiguousRef",
    "BudgetExceeded",
    "CheckpointNotFound",
    "ConcurrentUpdate",
    "CorruptObject",
    "DeviceError",
    "ExternalFileError",
    "ExternalFileNotFound",
    "HandlerError",
    "IncompatibleState",
    "IndexDamaged",
    "InvalidArgument",
    "InvalidName",
    "InvalidRef",
    "InvalidRequest",
    "InvalidState",
    "MissingDependency",
    "MissingObject",
    "NoHistory",
    "NonFiniteOutput",
    "NotABank",
    "NotMovable",
    "RouteNotFound",
    "StorageError",
    "TagNotFound",
    "TargetExists",
    "TrainingDiverged",
    "UnsupportedFormat",
    "WeightbankError",
]


class WeightbankError(Exception):
    """Root of every error raised by weightbank."""

    def __str__(self) -> str:
        # KeyError quotes its message; we want plain text everywhere.
        return str(self.args[0]) if self.args else self.__class__.__name__

    def __reduce__(self) -> tuple[Any, ...]:
        # Rebuilt from the message and fields, not through __init__ (whose arguments differ per
        # class): torch.distributed.checkpoint gathers a failed rank's exception to the coordinator
        # by pickling it, and an error that cannot be rebuilt there hangs every other rank.
        return _rebuild, (type(self), self.args, dict(vars(self)))


def _rebuild(cls: type[WeightbankError], args: tuple[Any, ...], fields: dict[str, Any]) -> WeightbankError:
    # The built-in exception whose __new__ allocates ``cls`` (as ``cls(...)`` would), without __init__.
    base: type = cls
    while base.__module__ != "builtins" and base.__base__ is not None:
        base = base.__base__
    error: WeightbankError = base.__new__(cls, *args)
    error.args = args
    vars(error).update(fields)
    return error


class CheckpointNotFound(WeightbankError, KeyError):
    """A ref (id, prefix, tag, run@step, ...) names no checkpoint.

    Attributes:
        ref: the ref as the caller wrote it.
        suggestions: close matches that do exist (tags, runs, ids).
    """

    def __init__(self, ref: str, suggestions: Sequence[str] = (), detail: str = "") -> None:
        self.ref = ref
        self.suggestions = list(suggestions)
        msg = f"no checkpoint matches {ref!r}"
        if detail:
            msg += f": {detail}"
        if self.suggestions:
            msg += "; did you mean " + ", ".join(repr(s) for s in self.suggestions) + "?"
        else:
            msg += " (see `weightbank log` and `weightbank tags`)"
        super().__init__(msg)


class TagNotFound(CheckpointNotFound):
    """A tag that does not exist (or was removed) was named."""

    def __init__(self, tag: str, suggestions: Sequence[str] = ()) -> None:
        super().__init__(tag, suggestions, detail="no such tag")
        self.tag = tag


class AmbiguousRef(WeightbankError, ValueError):
    """An id prefix matches more than one checkpoint."""

    def __init__(self, ref: str, matches: Sequence[str]) -> None:
        self.ref = ref
        self.matches = list(matches)
        shown = ", ".join(m[:16] for m in self.matches[:10])
        more = f" (+{len(self.matches) - 10} more)" if len(self.matches) > 10 else ""
        super().__init__(f"id prefix {ref!r} is ambiguous: matches {shown}{more}; use more characters")


class InvalidRef(WeightbankError, ValueError):
    """A ref string does not parse (e.g. ``run@``, ``tag~x``, a prefix under 6 characters)."""

    def __init__(self, ref: str, reason: str) -> None:
        self.ref = ref
        self.reason = reason
        super().__init__(f"invalid ref {ref!r}: {reason}")


class InvalidName(WeightbankError, ValueError):
    """A tag or run name is not allowed (path separators, ``..``, control characters, ...)."""

    def __init__(self, kind: str, name: str, reason: str) -> None:
        self.kind = kind
        self.name = name
        self.reason = reason
        super().__init__(f"invalid {kind} name {name!r}: {reason}")


class InvalidArgument(WeightbankError, ValueError):
    """An argument a caller passed is out of range or of the wrong kind (``steps=0``, ``mode="mean"``...).

    Attributes:
        name: the argument at fault.
        value: what was passed.
    """

    def __init__(self, name: str, value: object, reason: str) -> None:
        self.name = name
        self.value = value
        self.reason = reason
        super().__init__(f"{name}={value!r}: {reason}")


class NotMovable(InvalidArgument):
    """A checkpoint written before format 3 asked to move to another bank: its id covers where its
    chunks lie, so it cannot keep its id elsewhere (``Bank.copy_to``).

    Attributes:
        checkpoint: its id.
    """

    def __init__(self, checkpoint: str, ref: str | None = None) -> None:
        self.checkpoint = checkpoint
        super().__init__(
            "ref",
            ref or checkpoint[:12],
            f"checkpoint {checkpoint[:12]} is of format 1 or 2 (an older checkpoint's id covers where"
            " its chunks lie, so it cannot move to another bank)",
        )


class InvalidState(WeightbankError, TypeError):
    """A state holds something that cannot be stored without pickle.

    Attributes:
        path: the key path of the offending leaf, e.g. ``"optim.param_groups.0.fn"``.
    """

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        where = path if path else "<root>"
        super().__init__(f"cannot store {where}: {reason}")


class IncompatibleState(WeightbankError, ValueError):
    """A checkpoint does not fit the module or tensors it is loaded into."""

    def __init__(self, message: str, keys: Sequence[str] = ()) -> None:
        self.keys = list(keys)
        super().__init__(message)


class ExternalFileError(WeightbankError, ValueError):
    """A file outside the bank (import source, export target) is unreadable, malformed or of an unknown kind.

    Attributes:
        path: the file in question.
        keys: tensor names involved, if any.
    """

    def __init__(self, path: object, message: str, keys: Sequence[str] = ()) -> None:
        self.path = str(path)
        self.keys = list(keys)
        super().__init__(message)


class ExternalFileNotFound(ExternalFileError, FileNotFoundError):
    """The file or directory to import does not exist."""


class TargetExists(ExternalFileError, FileExistsError):
    """An export would replace an existing file (pass ``overwrite=True``)."""


class NoHistory(WeightbankError, LookupError):
    """A tag has no earlier target to go back to."""

    def __init__(self, tag: str, steps: int, available: int) -> None:
        self.tag = tag
        self.steps = steps
        self.available = available
        super().__init__(
            f"tag {tag!r} has {available} earlier target(s); cannot go back {steps}"
            " (see `weightbank tags --history`)"
        )


class AlreadyClosed(WeightbankError, ValueError):
    """An object was used after its ``close()`` (a checkpoint manager, its saver).

    Attributes:
        what: the object, in words.
    """

    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(f"the {what} is closed; make a new one to go on")


class ConcurrentUpdate(WeightbankError, RuntimeError):
    """Another writer changed a ref between our read and our write (compare-and-swap lost)."""

    def __init__(self, key: str, detail: str = "") -> None:
        self.key = key
        msg = f"{key} was changed concurrently by another writer"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg + "; re-read and retry")


class DeviceError(WeightbankError, RuntimeError):
    """A requested device (e.g. ``cuda:0``) is not available in this process."""


class BudgetExceeded(WeightbankError, MemoryError):
    """A serving load or pin cannot fit its tier's byte budget; the budget was not broken.

    ``transient`` is True when room may appear later (everything resident was
    leased, pinned or too recently loaded to evict), False when the request
    can never fit (a checkpoint bigger than the budget, pins beyond it).

    Attributes:
        tier: ``"device"`` or ``"host"``.
        needed, used, budget: bytes.
        ref: the checkpoint (ref or id) that did not fit.
    """

    def __init__(
        self,
        tier: str,
        *,
        needed: int,
        used: int,
        budget: int,
        ref: str = "",
        transient: bool,
        detail: str = "",
    ) -> None:
        self.tier = tier
        self.needed = needed
        self.used = used
        self.budget = budget
        self.ref = ref
        self.transient = transient
        what = f"checkpoint {ref[:12]}" if ref else "the request"
        msg = f"{what} needs {needed} more bytes on {tier}, which holds {used} of its {budget}-byte budget"
        if detail:
            msg += f" ({detail})"
        hint = "retry later, or raise the budget" if transient else "raise the budget or unpin checkpoints"
        super().__init__(f"{msg}; {hint}")


class InvalidRequest(WeightbankError, ValueError):
    """A serving request is malformed or does not fit the model (missing field, wrong tensor shape, ...).

    Attributes:
        field: the part of the request at fault (``"input"``, ``"ref"``, ...), if known.
    """

    def __init__(self, message: str, field: str = "") -> None:
        self.field = field
        super().__init__(message)


class NonFiniteOutput(WeightbankError, ArithmeticError):
    """A served model's output for a request holds NaN or infinities; the reply is refused, never ``null``.

    Usually the input drove the model out of range (an HTTP 422); if every input
    does it, the checkpoint itself is suspect (``weightbank verify``, its metrics).

    Attributes:
        count: how many output values are not finite.
        checkpoint: the checkpoint that answered.
    """

    def __init__(self, count: int, checkpoint: str = "") -> None:
        self.count = count
        self.checkpoint = checkpoint
        who = f"checkpoint {checkpoint[:12]}" if checkpoint else "the model"
        super().__init__(
            f"{who} produced {count} non-finite output value(s) (NaN or infinity) for this input;"
            " scale the input into the model's range, or check the checkpoint if every input does this"
        )


class HandlerError(WeightbankError, RuntimeError):
    """A serving handler or its model raised an error that is not the request's fault (an HTTP 500).

    ``transient`` is True when a retry may succeed (the device ran out of memory
    under concurrent requests); the HTTP reply then is a 503 with ``Retry-After``.

    Attributes:
        stage: ``"decode"``, ``"predict"`` or ``"encode"``.
        cause: the original error's class name.
        checkpoint: the checkpoint the request ran on (if it got that far).
    """

    def __init__(
        self, stage: str, cause: str, message: str, *, checkpoint: str = "", transient: bool = False
    ) -> None:
        self.stage = stage
        self.cause = cause
        self.checkpoint = checkpoint
        self.transient = transient
        where = f" on checkpoint {checkpoint[:12]}" if checkpoint else ""
        hint = "retry later" if transient else "see the server log; fix the handler or the model"
        super().__init__(f"the handler failed in {stage}{where}: {cause}: {message}; {hint}")


class RouteNotFound(WeightbankError, KeyError):
    """A serving route that does not exist was named."""

    def __init__(self, name: str, known: Sequence[str] = ()) -> None:
        self.name = name
        self.known = list(known)
        listed = ", ".join(repr(k) for k in self.known[:10]) or "none"
        super().__init__(f"no route named {name!r} (routes: {listed}); create it with PUT /v1/routes/{name}")


class TrainingDiverged(WeightbankError, RuntimeError):
    """Training diverged (NaN/Inf or a loss spike) and automatic rollback could not, or may no longer, fix it.

    Attributes:
        step: the step at which the last divergence was seen.
        reason: what the guard saw (``"loss is nan"``, ``"loss 9.1 > 5×median 1.2"``...).
        rollbacks: steps of the rollbacks already done within the guard's window.
    """

    def __init__(self, step: int, reason: str, rollbacks: Sequence[int] = (), detail: str = "") -> None:
        self.step = step
        self.reason = reason
        self.rollbacks = list(rollbacks)
        msg = f"training diverged at step {step} ({reason})"
        if detail:
            msg += f": {detail}"
        super().__init__(
            msg + "; lower the learning rate, inspect the data near that step, or resume from an earlier"
            " checkpoint (`weightbank log`)"
        )


class MissingDependency(WeightbankError, ImportError):
    """An optional package needed for what was asked (e.g. ``s3fs`` for ``s3://`` banks) is not installed."""

    def __init__(self, what: str, package: str, extra: str = "") -> None:
        self.package = package
        hint = f"pip install 'weightbank[{extra}]'" if extra else f"pip install {package}"
        super().__init__(f"{what} needs the {package!r} package, which is not installed; {hint}")


class StorageError(WeightbankError, OSError):
    """A storage backend failed, or found something it cannot accept."""


class NotABank(StorageError):
    """A location exists but does not hold a weightbank bank."""

    def __init__(self, url: str, detail: str = "") -> None:
        self.url = url
        msg = f"{url} is not a weightbank bank"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg + "; use `weightbank init` on an empty or new directory")


class UnsupportedFormat(StorageError):
    """The bank (or an object in it) uses a format this weightbank cannot read."""

    def __init__(self, url: str, found: object, supported: object) -> None:
        self.url = url
        self.found = found
        self.supported = supported
        super().__init__(
            f"{url} uses format version {found}, this weightbank reads up to {supported};"
            " upgrade with `pip install -U weightbank`"
        )


class MissingObject(StorageError, FileNotFoundError):
    """An object the bank references is not in storage."""

    def __init__(self, key: str, detail: str = "") -> None:
        self.key = key
        msg = f"object {key} is missing"
        if detail:
            msg += f" ({detail})"
        super().__init__(msg + "; run `weightbank verify` to see what is affected")


class CorruptObject(StorageError):
    """Bytes read from storage do not match their content hash.

    Attributes:
        key: the storage object that holds the bad bytes.
        checkpoint: checkpoint id being read (if known).
        tensor: tensor name being read (if known).
        expected, actual: hex digests.
        detail: what is wrong, in words.
    """

    def __init__(
        self,
        key: str,
        *,
        expected: str = "",
        actual: str = "",
        checkpoint: str = "",
        tensor: str = "",
        detail: str = "",
    ) -> None:
        self.key = key
        self.expected = expected
        self.actual = actual
        self.checkpoint = checkpoint
        self.tensor = tensor
        self.detail = detail
        parts = [f"corrupt object {key}"]
        if checkpoint:
            parts.append(f"checkpoint {checkpoint[:12]}")
        if tensor:
            parts.append(f"tensor {tensor!r}")
        msg = ", ".join(parts)
        if expected:
            msg += f": expected hash {expected[:16]}…, got {actual[:16]}…"
        if detail:
            msg += f": {detail}"
        super().__init__(msg + "; the data was not returned; run `weightbank verify`")


class IndexDamaged(CorruptObject):
    """An object of the catalog index is damaged, malformed or missing: the index cannot be trusted now.

    The bank never answers from a damaged index: it lists the manifests
    instead (slower, still exact), ``verify`` reports the damage and
    ``weightbank repair-index`` rebuilds the index from the manifests.

    Example:
        >>> IndexDamaged("index/roots/000000000001.json", "does not match its digest").detail
        'does not match its digest'
    """

    def __init__(self, key: str, detail: str) -> None:
        super().__init__(key, detail=detail)
