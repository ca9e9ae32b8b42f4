"""The FastAPI app: predict, model/tag/route management, metrics and health, over a ModelService.

Every handler here is a few lines calling the serving library; every
:class:`~weightbank.errors.WeightbankError` maps to one 4xx/5xx status with a
clear message (bad input is always a 4xx), and nothing is ever unpickled.
Sync endpoints run in the thread pool, so a slow load never blocks requests
to resident checkpoints.

Example:
    >>> import torch, weightbank as wb
    >>> from fastapi.testclient import TestClient
    >>> svc = wb.ModelService(wb.open("memory://"), wb.TensorHandler(lambda i: torch.nn.Linear(1, 1)), poll=0)
    >>> TestClient(create_app(svc, token="t")).get("/v1/models").status_code
    401
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

from fastapi import Body, Depends, FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .._version import __version__
from ..errors import (
    AmbiguousRef,
    BudgetExceeded,
    CheckpointNotFound,
    ConcurrentUpdate,
    DeviceError,
    IncompatibleState,
    InvalidName,
    InvalidRef,
    InvalidRequest,
    NoHistory,
    RouteNotFound,
    StorageError,
    WeightbankError,
)
from ..serving.results import ModelStatus
from ..serving.router import check_route_name
from ..serving.service import ModelService
from .auth import BodyLimit, TokenGuard
from .metrics import ServingMetrics
from .schemas import PredictBody, RollbackBody, RouteBody, TagBody

__all__ = ["create_app", "status_of"]

_STATUS: tuple[tuple[type[WeightbankError], int], ...] = (
    (RouteNotFound, 404),
    (CheckpointNotFound, 404),
    (InvalidRequest, 422),
    (AmbiguousRef, 400),
    (InvalidRef, 400),
    (InvalidName, 400),
    (NoHistory, 409),
    (ConcurrentUpdate, 409),
    (IncompatibleState, 409),
    (DeviceError, 503),
    (StorageError, 503),
)


def status_of(error: WeightbankError) -> int:
    """The HTTP status of an error (BudgetExceeded: 503 when it may pass, 507 when it never fits).

    Example:
        >>> import weightbank as wb
        >>> status_of(wb.CheckpointNotFound("x")), status_of(wb.InvalidRequest("bad"))
        (404, 422)
    """
    if isinstance(error, BudgetExceeded):
        return 503 if error.transient else 507
    for cls, code in _STATUS:
        if isinstance(error, cls):
            return code
    return 400


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
    app.add_middleware(BodyLimit, max_bytes=max_body)
    metrics = ServingMetrics(service)
    app.state.service = service
    app.state.metrics = metrics
    manage = [Depends(TokenGuard(token, insecure_local=insecure_local))]

    @app.exception_handler(WeightbankError)
    async def _weightbank_error(request: Request, exc: WeightbankError) -> JSONResponse:
        code = status_of(exc)
        headers = {"Retry-After": "1"} if code == 503 else None
        return JSONResponse(
            {"detail": str(exc), "error": type(exc).__name__}, status_code=code, headers=headers
        )

    @app.exception_handler(RequestValidationError)
    async def _invalid_body(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [
            {"loc": list(e.get("loc", ())), "msg": str(e.get("msg", "")), "type": str(e.get("type", ""))}
            for e in exc.errors()[:10]
        ]
        return JSONResponse(
            {"detail": "malformed request body", "error": "InvalidRequest", "errors": errors}, status_code=422
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {400: "InvalidRequest", 401: "Unauthorized", 403: "Forbidden", 404: "NotFound"}.get(
            exc.status_code
        )
        return JSONResponse(
            {"detail": str(exc.detail), "error": kind or "HTTPError"},
            status_code=exc.status_code,
            headers=dict(exc.headers or {}),
        )

    @app.exception_handler(RecursionError)
    async def _too_deep(request: Request, exc: RecursionError) -> JSONResponse:
        return JSONResponse({"detail": "request body is nested too deeply", "error": "InvalidRequest"}, 422)

    # -- serving ---------------------------------------------------------------------------
    @app.post("/v1/predict", tags=["serving"])
    def predict(
        body: PredictBody,
        response: Response,
        x_weightbank_ref: Annotated[str | None, Header(max_length=256)] = None,
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
    @app.get("/v1/models", tags=["models"], dependencies=manage)
    def models() -> dict[str, Any]:
        """Resident checkpoints (tier, bytes, leases, last use) and the cache's statistics."""
        stats = service.cache.stats()
        return {
            "models": [_model_json(m) for m in service.cache.models()],
            "stats": {**asdict(stats), "hit_rate": stats.hit_rate},
        }

    @app.post("/v1/models/{ref}:load", tags=["models"], dependencies=manage)
    def load(ref: str) -> dict[str, Any]:
        """Make a checkpoint resident now (waits for the load)."""
        return _model_json(service.cache.load(service.live.resolve(ref)))

    @app.post("/v1/models/{ref}:unload", tags=["models"], dependencies=manage)
    def unload(ref: str) -> dict[str, Any]:
        """Release a checkpoint (a leased one goes when its last request ends)."""
        cid = service.live.resolve(ref)
        return {"checkpoint": cid, "was_resident": service.cache.unload(cid)}

    @app.post("/v1/models/{ref}:pin", tags=["models"], dependencies=manage)
    def pin(ref: str) -> dict[str, Any]:
        """Load and keep a checkpoint on the device; 507 if pins would pass the budget."""
        return _model_json(service.cache.pin(service.live.resolve(ref)))

    @app.post("/v1/models/{ref}:unpin", tags=["models"], dependencies=manage)
    def unpin(ref: str) -> dict[str, Any]:
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

    @app.get("/v1/tags", tags=["tags"], dependencies=manage)
    def tags() -> dict[str, Any]:
        """Every tag: its target in the bank and the target requests are served from."""
        served = service.served_tags()
        return {
            "tags": [
                {"name": t.name, "target": t.target, "served": served.get(t.name)}
                for t in service.bank.tags()
            ]
        }

    @app.get("/v1/tags/{name}", tags=["tags"], dependencies=manage)
    def get_tag(name: str) -> dict[str, Any]:
        """A tag's target, served target and recent history."""
        return _tag_json(name)

    @app.put("/v1/tags/{name}", tags=["tags"], dependencies=manage)
    def put_tag(name: str, body: TagBody) -> dict[str, Any]:
        """Move a tag; its new target is warmed before traffic flips to it."""
        service.set_tag(name, body.ref, why=body.why, expect=body.expect)
        return _tag_json(name)

    @app.post("/v1/tags/{name}:rollback", tags=["tags"], dependencies=manage)
    def rollback_tag(name: str, body: Annotated[RollbackBody | None, Body()] = None) -> dict[str, Any]:
        """Move a tag back to an earlier target (warmed first)."""
        b = body or RollbackBody()
        service.rollback_tag(name, b.steps, why=b.why)
        return _tag_json(name)

    # -- routes ----------------------------------------------------------------------------
    def _route_json(name: str) -> dict[str, Any]:
        route = service.router.get(name)
        return {"name": route.name, "arms": route.weights}

    @app.get("/v1/routes", tags=["routes"], dependencies=manage)
    def routes() -> dict[str, Any]:
        """Every route and its weights."""
        return {"routes": [{"name": r.name, "arms": r.weights} for r in service.router.routes()]}

    @app.get("/v1/routes/{name}", tags=["routes"], dependencies=manage)
    def get_route(name: str) -> dict[str, Any]:
        """One route's arms and weights."""
        return _route_json(check_route_name(name))

    @app.put("/v1/routes/{name}", tags=["routes"], dependencies=manage)
    def put_route(name: str, body: RouteBody) -> dict[str, Any]:
        """Create or replace a route (weighted arms, sticky by request key)."""
        service.router.set(name, body.arms)
        return _route_json(name)

    @app.delete("/v1/routes/{name}", tags=["routes"], dependencies=manage)
    def delete_route(name: str) -> dict[str, Any]:
        """Remove a route."""
        route = service.router.delete(name)
        return {"name": route.name, "arms": route.weights, "deleted": True}

    # -- operations ------------------------------------------------------------------------
    @app.get("/metrics", tags=["operations"], include_in_schema=False)
    def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/healthz", tags=["operations"])
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get("/readyz", tags=["operations"])
    def readyz() -> JSONResponse:
        """The bank answers and the tag watcher is healthy."""
        try:
            service.bank.tags()
        except Exception as e:
            return JSONResponse({"status": "unavailable", "detail": f"{type(e).__name__}: {e}"}, 503)
        return JSONResponse({"status": "ready", "tags": len(service.served_tags())})

    return app
