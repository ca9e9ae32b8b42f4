"""Retries for object stores: which failures are transient, and what every failure becomes.

Transient failures (connection resets, timeouts, 5xx, throttling) are retried
with exponential backoff and full jitter; everything else, and the last
transient failure, is mapped to the :mod:`weightbank.errors` tree by
:func:`translate` (a missing object is :class:`~weightbank.errors.MissingObject`,
a refused login a :class:`~weightbank.errors.StorageError` saying to check the
credentials). Only idempotent operations may be retried.

Example:
    >>> from weightbank.storage.retry import is_transient, retrying
    >>> is_transient(TimeoutError()), is_transient(PermissionError())
    (True, False)
    >>> retrying("read", "s3://bucket", "k", lambda: 42)
    42
"""

from __future__ import annotations

import errno
import random
import time
from collections.abc import Callable
from typing import TypeVar

from ..errors import MissingObject, StorageError, WeightbankError

__all__ = ["DEFAULT_RETRIES", "client_error_code", "is_transient", "retrying", "translate"]

T = TypeVar("T")

#: Attempts per operation unless ``storage_options={"retries": N}`` says otherwise.
DEFAULT_RETRIES = 5

_TRANSIENT_CODES = {
    "InternalError",
    "ServiceUnavailable",
    "SlowDown",
    "RequestTimeout",
    "RequestTimeTooSkewed",
    "Throttling",
    "ThrottlingException",
    "500",
    "502",
    "503",
    "504",
}
# EREMOTEIO exists on Linux only; elsewhere there is simply no such errno to match.
_TRANSIENT_ERRNOS = {
    code
    for code in (
        errno.EAGAIN,
        errno.ETIMEDOUT,
        errno.ECONNRESET,
        errno.ECONNREFUSED,
        errno.ECONNABORTED,
        errno.EPIPE,
        getattr(errno, "EREMOTEIO", None),
        errno.EBUSY,
    )
    if code is not None
}
_TRANSIENT_NAMES = {"ClientPayloadError", "ServerDisconnectedError", "ClientOSError", "IncompleteRead"}


def client_error_code(exc: BaseException) -> str | None:
    """The S3 error code (``"PreconditionFailed"``, ``"503"``...) behind ``exc``, if it came from botocore.

    Example:
        >>> client_error_code(ValueError("not from botocore")) is None
        True
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        response = getattr(e, "response", None)  # botocore's ClientError carries the parsed reply here
        if isinstance(response, dict):
            err = response.get("Error") or {}
            code = err.get("Code")
            status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
            if code:
                return str(code)
            if status:
                return str(status)
        e = e.__cause__ or e.__context__
    return None


def is_transient(exc: BaseException) -> bool:
    """Whether ``exc`` is worth retrying (network trouble, 5xx, throttling) rather than a real answer.

    Example:
        >>> is_transient(ConnectionResetError()), is_transient(FileNotFoundError())
        (True, False)
    """
    if isinstance(exc, WeightbankError | FileNotFoundError | PermissionError | FileExistsError):
        return False
    code = client_error_code(exc)
    if code is not None:
        return code in _TRANSIENT_CODES
    if isinstance(exc, ConnectionError | TimeoutError):
        return True
    if isinstance(exc, OSError) and exc.errno in _TRANSIENT_ERRNOS:
        return True
    name = type(exc).__name__
    return name in _TRANSIENT_NAMES or "Timeout" in name


def translate(exc: BaseException, op: str, url: str, key: str) -> WeightbankError:
    """Map a backend exception to the weightbank error a caller can act on.

    Example:
        >>> type(translate(FileNotFoundError(), "read", "s3://b", "k")).__name__
        'MissingObject'
    """
    if isinstance(exc, WeightbankError):
        return exc
    code = client_error_code(exc)
    if code == "NoSuchBucket":
        return StorageError(f"{url}: the bucket does not exist; create it first")
    if isinstance(exc, FileNotFoundError) or code in ("NoSuchKey", "404", "NotFound"):
        return MissingObject(key)
    if isinstance(exc, PermissionError) or code in (
        "AccessDenied",
        "403",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
    ):
        return StorageError(f"{url}: access denied on {op} of {key!r}; check the credentials and permissions")
    err = StorageError(f"{url}: {op} of {key!r} failed: {type(exc).__name__}: {exc}")
    err.__cause__ = exc
    return err


def retrying(
    op: str,
    url: str,
    key: str,
    fn: Callable[[], T],
    *,
    attempts: int = DEFAULT_RETRIES,
    base_delay: float = 0.1,
    max_delay: float = 5.0,
) -> T:
    """Call ``fn``; retry transient failures with exponential backoff and full jitter.

    Non-transient errors and the last transient one are translated with
    :func:`translate`. Only idempotent operations may be passed here.

    Example:
        >>> retrying("read", "mem://", "k", lambda: 42)
        42
    """
    for attempt in range(max(1, attempts)):
        try:
            return fn()
        except Exception as e:
            if attempt + 1 >= attempts or not is_transient(e):
                raise translate(e, op, url, key) from e
            time.sleep(random.uniform(0, min(max_delay, base_delay * 2**attempt)))
    raise AssertionError("unreachable")  # pragma: no cover
