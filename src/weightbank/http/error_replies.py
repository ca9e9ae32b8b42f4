"""How an error becomes a reply: its status, the one JSON shape, the log line, and how OpenAPI declares it.

Every error is a JSON reply of one shape, :class:`~weightbank.http.schemas.ErrorBody`
(``{"detail": str, "error": str}``), and is logged (``weightbank.http``):

* 4xx for what the request caused: a ref or name that does not parse (400), an
  unknown checkpoint, tag or route (404), a conflict with the bank's state
  (409), a body too large (413), a body or input the model cannot take, or a
  model output that is not finite for that input (422);
* 5xx for server faults: damaged or missing stored data, a handler or model
  bug, an unexpected exception (500, never with ``Retry-After``: retrying does
  not mend them); a storage outage, a transient budget shortage or a device
  out of memory (503 with ``Retry-After: 1``: retrying may work); a checkpoint
  or pins that can never fit the budget (507).

:func:`install_error_handlers` and :class:`ErrorsAsJson` put this on an app;
:func:`error_responses` declares a route's error replies in its OpenAPI schema.

Example:
    >>> import weightbank as wb
    >>> status_of(wb.RouteNotFound("ab", [])), retryable(wb.RouteNotFound("ab", []))
    (404, False)
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import (
    AmbiguousRef,
    BudgetExceeded,
    CheckpointNotFound,
    ConcurrentUpdate,
    CorruptObject,
    DeviceError,
    HandlerError,
    IncompatibleState,
    InvalidName,
    InvalidRef,
    InvalidRequest,
    MissingDependency,
    MissingObject,
    NoHistory,
    NonFiniteOutput,
    NotABank,
    RouteNotFound,
    StorageError,
    UnsupportedFormat,
    WeightbankError,
)
from .schemas import ErrorBody

__all__ = [
    "BODY",
    "LOAD",
    "MANAGE",
    "RESOLVE",
    "ErrorsAsJson",
    "error_responses",
    "install_error_handlers",
    "log_reply",
    "retryable",
    "status_of",
]

log = logging.getLogger("weightbank.http")

# Damage that a retry cannot mend: answered 500 without Retry-After.
_PERMANENT_STORAGE = (CorruptObject, MissingObject, UnsupportedFormat, NotABank)

_STATUS: tuple[tuple[type[WeightbankError], int], ...] = (
    (RouteNotFound, 404),
    (CheckpointNotFound, 404),
    (NonFiniteOutput, 422),
    (InvalidRequest, 422),
    (AmbiguousRef, 400),
    (InvalidRef, 400),
    (InvalidName, 400),
    (NoHistory, 409),
    (ConcurrentUpdate, 409),
    (IncompatibleState, 409),
    (DeviceError, 500),
    (MissingDependency, 500),
    (CorruptObject, 500),
    (MissingObject, 500),
    (UnsupportedFormat, 500),
    (NotABank, 500),
    (StorageError, 503),
)


def status_of(error: WeightbankError) -> int:
    """The HTTP status of an error: 4xx when the request caused it, 5xx for a server fault.

    BudgetExceeded is 503 when room may appear and 507 when it never fits; a
    HandlerError is 503 when transient (device out of memory), else 500; damaged
    or missing stored data is 500; any other storage failure is 503.

    Example:
        >>> import weightbank as wb
        >>> status_of(wb.CheckpointNotFound("x")), status_of(wb.InvalidRequest("bad"))
        (404, 422)
        >>> status_of(wb.CorruptObject("packs/x")), status_of(wb.StorageError("timed out"))
        (500, 503)
    """
    if isinstance(error, BudgetExceeded):
        return 503 if error.transient else 507
    if isinstance(error, HandlerError):
        return 503 if error.transient else 500
    for cls, code in _STATUS:
        if isinstance(error, cls):
            return code
    return 400


def retryable(error: WeightbankError) -> bool:
    """Whether the reply advertises a retry (``Retry-After``): only for a condition that may pass.

    Example:
        >>> import weightbank as wb
        >>> retryable(wb.CorruptObject("packs/x")), retryable(wb.StorageError("timed out"))
        (False, True)
        >>> retryable(wb.BudgetExceeded("device", needed=1, used=1, budget=1, transient=True))
        True
    """
    if isinstance(error, BudgetExceeded | HandlerError):
        return error.transient
    return isinstance(error, StorageError) and not isinstance(error, _PERMANENT_STORAGE)


def log_reply(request: Request, code: int, name: str, detail: str, exc: BaseException | None = None) -> None:
    """Log one error reply: a 5xx as an error (with its traceback), a non-finite output as a warning, else info."""
    where = f"{request.method} {request.url.path}"
    if code >= 500:
        log.error("%s -> %d %s: %s", where, code, name, detail, exc_info=exc)
    elif name == NonFiniteOutput.__name__:  # the model's doing, worth an operator's look
        log.warning("%s -> %d %s: %s", where, code, name, detail)
    else:
        log.info("%s -> %d %s: %s", where, code, name, detail)


class ErrorsAsJson:
    """ASGI middleware: an exception no handler mapped becomes a logged JSON 500, and the connection lives.

    Starlette's last-resort handler answers in plain text and re-raises, and
    uvicorn then closes the keep-alive connection; this answers in the common
    error shape instead and swallows the exception once it is logged.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            request = Request(scope)
            detail = f"internal server error ({type(exc).__name__}); the server log has the details"
            log_reply(request, 500, "InternalError", f"{type(exc).__name__}: {exc}", exc)
            if started:  # too late for a reply of our own: let the server close the connection
                raise
            await JSONResponse({"detail": detail, "error": "InternalError"}, status_code=500)(
                scope, receive, send
            )


def install_error_handlers(app: FastAPI) -> None:
    """Answer every error ``app`` raises in the common shape: library errors, bad bodies, HTTP errors.

    Example:
        >>> from fastapi import FastAPI
        >>> app = FastAPI(); install_error_handlers(app)
        >>> WeightbankError in app.exception_handlers
        True
    """

    @app.exception_handler(WeightbankError)
    async def _weightbank_error(request: Request, exc: WeightbankError) -> JSONResponse:
        code = status_of(exc)
        name = type(exc).__name__
        log_reply(request, code, name, str(exc), exc if code >= 500 else None)
        headers = {"Retry-After": "1"} if retryable(exc) else None
        return JSONResponse({"detail": str(exc), "error": name}, status_code=code, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {
                "loc": [p if isinstance(p, int | str) else str(p) for p in e.get("loc", ())],
                "msg": str(e.get("msg", "")),
                "type": str(e.get("type", "")),
            }
            for e in exc.errors()[:10]
        ]
        log_reply(request, 422, "InvalidRequest", "; ".join(f"{e['loc']}: {e['msg']}" for e in errors))
        return JSONResponse(
            {"detail": "malformed request", "error": "InvalidRequest", "errors": errors}, status_code=422
        )

    def _allowed(scope: Scope) -> str:
        """Every method some route of this path answers (Starlette lists only the first route's)."""
        methods: set[str] = set()
        for route in app.router.routes:
            match, _ = route.matches({**scope, "method": "GET"})
            if match != Match.NONE:
                methods.update(getattr(route, "methods", None) or ())
        return ", ".join(sorted(methods))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        headers = dict(exc.headers or {})
        if exc.status_code == 405:
            headers["Allow"] = _allowed(request.scope)
        kind = {
            400: "InvalidRequest",
            401: "Unauthorized",
            403: "Forbidden",
            404: "NotFound",
            405: "MethodNotAllowed",
        }.get(exc.status_code, "HTTPError")
        log_reply(request, exc.status_code, kind, str(exc.detail))
        return JSONResponse(
            {"detail": str(exc.detail), "error": kind}, status_code=exc.status_code, headers=headers
        )

    @app.exception_handler(RecursionError)
    async def _too_deep(request: Request, exc: RecursionError) -> JSONResponse:
        log_reply(request, 422, "InvalidRequest", "request body is nested too deeply")
        return JSONResponse({"detail": "request body is nested too deeply", "error": "InvalidRequest"}, 422)


# -- the OpenAPI declaration of error replies ---------------------------------------------------
_WHY: dict[int, str] = {
    400: "A ref or name does not parse (see its pattern), or an id prefix is ambiguous.",
    401: "Management needs `Authorization: Bearer <token>`.",
    403: "Management is disabled on this server (no token), or the client is not on loopback.",
    404: "No such checkpoint, tag or route.",
    409: "Conflicts with the bank's state: the tag moved (expect), no earlier target, or the "
    "checkpoint does not fit the model.",
    413: "The request body is larger than the server's limit.",
    422: "The body is malformed, the input does not fit the model, or the model's output for it "
    "is not finite.",
    500: "A server fault: damaged or missing stored data, or a handler/model error (not retryable).",
    503: "Temporarily unavailable: storage outage, every resident checkpoint busy, or the device out "
    "of memory (see Retry-After).",
    507: "The checkpoint (with the pinned ones) can never fit the server's memory budget.",
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying (sent only when a retry may succeed).",
        "schema": {"type": "integer", "minimum": 0},
        "required": False,
    }
}

MANAGE = (401, 403)
"""What a management route adds: no or a wrong token, management disabled."""
RESOLVE = (400, 404)
"""What resolving a ref or name adds: it does not parse, it names nothing."""
BODY = (413, 422)
"""What a request body adds: too large, malformed."""
LOAD = (409, 503, 507)
"""What loading a checkpoint adds: it does not fit the model, no room now, no room ever."""


def error_responses(*codes: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route answering with ``codes``: each an ErrorBody, 503 with Retry-After.

    Example:
        >>> sorted(error_responses(*RESOLVE, 503))
        [400, 404, 503]
    """
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        entry: dict[str, Any] = {"model": ErrorBody, "description": _WHY[code]}
        if code == 503:
            entry["headers"] = _RETRY_AFTER
        out[code] = entry
    return out
