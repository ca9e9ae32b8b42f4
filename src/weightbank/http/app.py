"""The FastAPI app: predict, model/tag/route management, metrics and health, over a ModelService.

Every handler here is a few lines calling the serving library. Every error is
a JSON reply of one shape, :class:`~weightbank.http.schemas.ErrorBody`
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

The OpenAPI schema declares every status each route answers with and the
grammars of refs and names. Sync endpoints run in the thread pool, so a slow
load never blocks requests to resident checkpoints. Nothing is ever unpickled.

Example:
    >>> import torch, weightbank as wb
    >>> from fastapi.testclient import TestClient
    >>> svc = wb.ModelService(wb.open("memory://"), wb.TensorHandler(lambda i: torch.nn.Linear(1, 1)), poll=0)
    >>> TestClient(create_app(svc, token="t")).get("/v1/models").status_code
    401
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Header, Path, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import HTTPBearer
from starlette.convertors import Convertor, register_url_convertor
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .._version import __version__
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
from ..serving.results import ModelStatus
from ..serving.router import check_route_name
from ..serving.service import ModelService
from .auth import BodyLimit, TokenGuard
from .metrics import ServingMetrics
from .schemas import (
    ID_PATTERN,
    NEW_TAG_PATTERN,
    REF_PATTERN,
    ROUTE_PATTERN,
    TAG_PATTERN,
    DeletedRoute,
    ErrorBody,
    Health,
    ModelReply,
    ModelsReply,
    PinReply,
    PredictBody,
    PredictReply,
    Readiness,
    RollbackBody,
    RouteBody,
    RouteReply,
    RoutesReply,
    TagBody,
    TagReply,
    TagsReply,
    UnloadReply,
)

__all__ = ["create_app", "retryable", "status_of"]

log = logging.getLogger("weightbank.http")


class _Segment(Convertor[str]):
    """A path segment without ``:``, so ``/v1/tags/{name}`` never swallows ``/v1/tags/{name}:rollback``."""

    regex = "[^/:]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("segment", _Segment())

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


def _log(request: Request, code: int, name: str, detail: str, exc: BaseException | None = None) -> None:
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
            _log(request, 500, "InternalError", f"{type(exc).__name__}: {exc}", exc)
            if started:  # too late for a reply of our own: let the server close the connection
                raise
            await JSONResponse({"detail": detail, "error": "InternalError"}, status_code=500)(
                scope, receive, send
            )


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


def _errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        entry: dict[str, Any] = {"model": ErrorBody, "description": _WHY[code]}
        if code == 503:
            entry["headers"] = _RETRY_AFTER
        out[code] = entry
    return out


_MANAGE = (401, 403)
_RESOLVE = (400, 404)
_BODY = (413, 422)
_LOAD = (409, 503, 507)

RefPath = Annotated[
    str,
    Path(
        min_length=1,
        max_length=256,
        description="A checkpoint id, id prefix (at least 6 hex characters), tag, run@step, run@latest, "
        "run@best:metric[:max] or tag@{N}, optionally with ~N.",
        json_schema_extra={"pattern": REF_PATTERN},
    ),
]
TagPath = Annotated[
    str,
    Path(
        min_length=1,
        max_length=128,
        description="A tag name.",
        json_schema_extra={"pattern": TAG_PATTERN},
    ),
]
NewTagPath = Annotated[
    str,
    Path(
        min_length=1,
        max_length=128,
        description="A tag name that cannot be read as a checkpoint id or id prefix.",
        json_schema_extra={"pattern": NEW_TAG_PATTERN},
    ),
]
RoutePath = Annotated[
    str,
    Path(
        min_length=1,
        max_length=128,
        description="A route name.",
        json_schema_extra={"pattern": ROUTE_PATTERN},
    ),
]


def _model_json(m: ModelStatus) -> dict[str, Any]:
    return asdict(m)


def create_app(
    service: ModelService,
    *,
    token: str | None = None,
    insecure_local: bool = False,
    max_body: int = 16 << 20,
) -> FastAPI:
    """The HTTP app of ``service``; management needs ``token`` (or ``insecure_local`` for loopback clients).

    Example:
        >>> import torch, weightbank as wb
        >>> svc = wb.ModelService(wb.open("memory://"), wb.TensorHandler(lambda i: torch.nn.Linear(1, 1)), poll=0)
        >>> create_app(svc, token="t").title
        'weightbank'
    """
    app = FastAPI(title="weightbank", version=__version__, summary="Serve many checkpoints of one bank.")
    app.add_middleware(ErrorsAsJson)
    app.add_middleware(BodyLimit, max_bytes=max_body)
    metrics = ServingMetrics(service)
    app.state.service = service
    app.state.metrics = metrics
    # The guard checks the token; HTTPBearer (never raising) only declares the scheme in OpenAPI.
    manage = [
        Depends(TokenGuard(token, insecure_local=insecure_local)),
        Security(HTTPBearer(auto_error=False, description="The server's management token.")),
    ]

    @app.exception_handler(WeightbankError)
    async def _weightbank_error(request: Request, exc: WeightbankError) -> JSONResponse:
        code = status_of(exc)
        name = type(exc).__name__
        _log(request, code, name, str(exc), exc if code >= 500 else None)
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
        _log(request, 422, "InvalidRequest", "; ".join(f"{e['loc']}: {e['msg']}" for e in errors))
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
        _log(request, exc.status_code, kind, str(exc.detail))
        return JSONResponse(
            {"detail": str(exc.detail), "error": kind}, status_code=exc.status_code, headers=headers
        )

    @app.exception_handler(RecursionError)
    async def _too_deep(request: Request, exc: RecursionError) -> JSONResponse:
        _log(request, 422, "InvalidRequest", "request body is nested too deeply")
        return JSONResponse({"detail": "request body is nested too deeply", "error": "InvalidRequest"}, 422)

    # -- serving ---------------------------------------------------------------------------
    @app.post(
        "/v1/predict",
        tags=["serving"],
        response_model=PredictReply,
        responses={
            200: {
                "description": "The output, and the checkpoint that produced it.",
                "headers": {
                    "X-Weightbank-Checkpoint": {
                        "description": "The id of the checkpoint that answered.",
                        "schema": {"type": "string", "pattern": ID_PATTERN},
                    }
                },
            },
            **_errors(*_RESOLVE, *_BODY, *_LOAD, 500),
        },
    )
    def predict(
        body: PredictBody,
        response: Response,
        x_weightbank_ref: Annotated[
            str | None, Header(max_length=256, json_schema_extra={"pattern": REF_PATTERN})
        ] = None,
        x_weightbank_route: Annotated[str | None, Header(max_length=256)] = None,
        x_weightbank_key: Annotated[str | None, Header(max_length=256)] = None,
        x_weightbank_arm: Annotated[str | None, Header(max_length=256)] = None,
    ) -> dict[str, Any]:
        """Run the handler on ``input`` with the checkpoint ``ref`` names or an arm of ``route``."""
        p = service.predict(
            body.input,
            ref=body.ref or x_weightbank_ref,
            route=body.route or x_weightbank_route,
            key=body.key or x_weightbank_key,
            arm=body.arm or x_weightbank_arm,
        )
        response.headers["X-Weightbank-Checkpoint"] = p.checkpoint
        return {"output": p.output, "checkpoint": p.checkpoint, "ref": p.ref, "route": p.route, "arm": p.arm}

    # -- models ----------------------------------------------------------------------------
    @app.get(
        "/v1/models",
        tags=["models"],
        dependencies=manage,
        response_model=ModelsReply,
        responses=_errors(*_MANAGE, 500),
    )
    def models() -> dict[str, Any]:
        """Resident checkpoints (tier, bytes, leases, last use) and the cache's statistics."""
        stats = service.cache.stats()
        return {
            "models": [_model_json(m) for m in service.cache.models()],
            "stats": {**asdict(stats), "hit_rate": stats.hit_rate},
        }

    @app.post(
        "/v1/models/{ref}:load",
        tags=["models"],
        dependencies=manage,
        response_model=ModelReply,
        responses=_errors(*_RESOLVE, *_MANAGE, *_BODY, *_LOAD, 500),
    )
    def load(ref: RefPath) -> dict[str, Any]:
        """Make a checkpoint resident now (waits for the load)."""
        return _model_json(service.cache.load(service.live.resolve(ref)))

    @app.post(
        "/v1/models/{ref}:unload",
        tags=["models"],
        dependencies=manage,
        response_model=UnloadReply,
        responses=_errors(*_RESOLVE, *_MANAGE, *_BODY, 500, 503),
    )
    def unload(ref: RefPath) -> dict[str, Any]:
        """Release a checkpoint (a leased one goes when its last request ends)."""
        cid = service.live.resolve(ref)
        return {"checkpoint": cid, "was_resident": service.cache.unload(cid)}

    @app.post(
        "/v1/models/{ref}:pin",
        tags=["models"],
        dependencies=manage,
        response_model=ModelReply,
        responses=_errors(*_RESOLVE, *_MANAGE, *_BODY, *_LOAD, 500),
    )
    def pin(ref: RefPath) -> dict[str, Any]:
        """Load and keep a checkpoint on the device; 507 if pins would pass the budget."""
        return _model_json(service.cache.pin(service.live.resolve(ref)))

    @app.post(
        "/v1/models/{ref}:unpin",
        tags=["models"],
        dependencies=manage,
        response_model=PinReply,
        responses=_errors(*_RESOLVE, *_MANAGE, *_BODY, 500, 503),
    )
    def unpin(ref: RefPath) -> dict[str, Any]:
        """Let a pinned checkpoint be evicted again."""
        cid = service.live.resolve(ref)
        return {"checkpoint": cid, "was_pinned": service.cache.unpin(cid)}

    # -- tags ------------------------------------------------------------------------------
    def _tag_json(name: str) -> dict[str, Any]:
        history = service.bank.tag_history(name)
        target = history[-1].new if history else None
        return {
            "name": name,
            "target": target,
            "served": service.served_tags().get(name),
            "warm_error": service.live.errors.get(name),
            "history": [asdict(e) for e in history[-20:]],
        }

    @app.get(
        "/v1/tags",
        tags=["tags"],
        dependencies=manage,
        response_model=TagsReply,
        responses=_errors(*_MANAGE, 500, 503),
    )
    def tags() -> dict[str, Any]:
        """Every tag: its target in the bank and the target requests are served from."""
        served = service.served_tags()
        return {
            "tags": [
                {"name": t.name, "target": t.target, "served": served.get(t.name)}
                for t in service.bank.tags()
            ]
        }

    @app.get(
        "/v1/tags/{name:segment}",
        tags=["tags"],
        dependencies=manage,
        response_model=TagReply,
        responses=_errors(*_RESOLVE, *_MANAGE, 422, 500, 503),
    )
    def get_tag(name: TagPath) -> dict[str, Any]:
        """A tag's target, served target and recent history."""
        return _tag_json(name)

    @app.put(
        "/v1/tags/{name:segment}",
        tags=["tags"],
        dependencies=manage,
        response_model=TagReply,
        responses=_errors(*_RESOLVE, *_MANAGE, 409, *_BODY, 500, 503),
    )
    def put_tag(name: NewTagPath, body: TagBody) -> dict[str, Any]:
        """Move a tag; its new target is warmed before traffic flips to it."""
        service.set_tag(name, body.ref, why=body.why, expect=body.expect)
        return _tag_json(name)

    @app.post(
        "/v1/tags/{name:segment}:rollback",
        tags=["tags"],
        dependencies=manage,
        response_model=TagReply,
        responses=_errors(*_RESOLVE, *_MANAGE, 409, *_BODY, 500, 503),
    )
    def rollback_tag(name: TagPath, body: Annotated[RollbackBody | None, Body()] = None) -> dict[str, Any]:
        """Move a tag back to an earlier target (warmed first)."""
        b = body or RollbackBody()
        service.rollback_tag(name, b.steps, why=b.why)
        return _tag_json(name)

    # -- routes ----------------------------------------------------------------------------
    def _route_json(name: str) -> dict[str, Any]:
        route = service.router.get(name)
        return {"name": route.name, "arms": route.weights}

    @app.get(
        "/v1/routes",
        tags=["routes"],
        dependencies=manage,
        response_model=RoutesReply,
        responses=_errors(*_MANAGE, 500),
    )
    def routes() -> dict[str, Any]:
        """Every route and its weights."""
        return {"routes": [{"name": r.name, "arms": r.weights} for r in service.router.routes()]}

    @app.get(
        "/v1/routes/{name}",
        tags=["routes"],
        dependencies=manage,
        response_model=RouteReply,
        responses=_errors(*_RESOLVE, *_MANAGE, 422, 500),
    )
    def get_route(name: RoutePath) -> dict[str, Any]:
        """One route's arms and weights."""
        return _route_json(check_route_name(name))

    @app.put(
        "/v1/routes/{name}",
        tags=["routes"],
        dependencies=manage,
        response_model=RouteReply,
        responses=_errors(400, *_MANAGE, *_BODY, 500),
    )
    def put_route(name: RoutePath, body: RouteBody) -> dict[str, Any]:
        """Create or replace a route (weighted arms, sticky by request key; weights are relative shares)."""
        service.router.set(name, body.arms)
        return _route_json(name)

    @app.delete(
        "/v1/routes/{name}",
        tags=["routes"],
        dependencies=manage,
        response_model=DeletedRoute,
        responses=_errors(*_RESOLVE, *_MANAGE, 422, 500),
    )
    def delete_route(name: RoutePath) -> dict[str, Any]:
        """Remove a route."""
        route = service.router.delete(check_route_name(name))
        return {"name": route.name, "arms": route.weights, "deleted": True}

    # -- operations ------------------------------------------------------------------------
    @app.get("/metrics", tags=["operations"], include_in_schema=False)
    def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/healthz", tags=["operations"], response_model=Health, responses=_errors(500))
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["operations"],
        response_model=Readiness,
        responses={503: {"model": Readiness, "description": "The bank does not answer."}, **_errors(500)},
    )
    def readyz() -> JSONResponse:
        """The bank answers and the tag watcher is healthy."""
        try:
            service.bank.tags()
        except Exception as e:
            return JSONResponse({"status": "unavailable", "detail": f"{type(e).__name__}: {e}"}, 503)
        return JSONResponse({"status": "ready", "tags": len(service.served_tags())})

    return app
