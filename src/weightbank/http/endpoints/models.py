"""``/v1/models``: what is resident, and loading, unloading, pinning and unpinning checkpoints."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from fastapi import FastAPI, params

from ...serving.results import ModelStatus
from ...serving.service import ModelService
from ..error_replies import BODY, LOAD, MANAGE, RESOLVE, error_responses
from ..params import RefPath
from ..schemas import ModelReply, ModelsReply, PinReply, UnloadReply

__all__ = ["add_routes"]


def _model_json(m: ModelStatus) -> dict[str, Any]:
    return asdict(m)


def add_routes(app: FastAPI, service: ModelService, manage: Sequence[params.Depends]) -> None:
    """Add the model management routes of ``service`` to ``app``, each guarded by ``manage``.

    Example:
        >>> import torch, weightbank as wb
        >>> from fastapi import FastAPI
        >>> svc = wb.ModelService(wb.open("memory://"), wb.TensorHandler(lambda i: torch.nn.Linear(1, 1)), poll=0)
        >>> app = FastAPI(openapi_url=None); add_routes(app, svc, [])
        >>> for r in app.routes:
        ...     print(*r.methods, r.path)
        GET /v1/models
        POST /v1/models/{ref}:load
        POST /v1/models/{ref}:unload
        POST /v1/models/{ref}:pin
        POST /v1/models/{ref}:unpin
    """

    @app.get(
        "/v1/models",
        tags=["models"],
        dependencies=manage,
        response_model=ModelsReply,
        responses=error_responses(*MANAGE, 500),
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
        responses=error_responses(*RESOLVE, *MANAGE, *BODY, *LOAD, 500),
    )
    def load(ref: RefPath) -> dict[str, Any]:
        """Make a checkpoint resident now (waits for the load)."""
        return _model_json(service.cache.load(service.live.resolve(ref)))

    @app.post(
        "/v1/models/{ref}:unload",
        tags=["models"],
        dependencies=manage,
        response_model=UnloadReply,
        responses=error_responses(*RESOLVE, *MANAGE, *BODY, 500, 503),
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
        responses=error_responses(*RESOLVE, *MANAGE, *BODY, *LOAD, 500),
    )
    def pin(ref: RefPath) -> dict[str, Any]:
        """Load and keep a checkpoint on the device; 507 if pins would pass the budget."""
        return _model_json(service.cache.pin(service.live.resolve(ref)))

    @app.post(
        "/v1/models/{ref}:unpin",
        tags=["models"],
        dependencies=manage,
        response_model=PinReply,
        responses=error_responses(*RESOLVE, *MANAGE, *BODY, 500, 503),
    )
    def unpin(ref: RefPath) -> dict[str, Any]:
        """Let a pinned checkpoint be evicted again."""
        cid = service.live.resolve(ref)
        return {"checkpoint": cid, "was_pinned": service.cache.unpin(cid)}
