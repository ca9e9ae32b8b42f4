"""``/v1/routes``: the weighted, sticky traffic splits between refs (A/B tests, canaries)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, params

from ...serving.router import check_route_name
from ...serving.service import ModelService
from ..error_replies import BODY, MANAGE, RESOLVE, error_responses
from ..params import RoutePath
from ..schemas import DeletedRoute, RouteBody, RouteReply, RoutesReply

__all__ = ["add_routes"]


def add_routes(app: FastAPI, service: ModelService, manage: Sequence[params.Depends]) -> None:
    """Add the route management routes of ``service`` to ``app``, each guarded by ``manage``.

    Example:
        >>> import torch, weightbank as wb
        >>> from fastapi import FastAPI
        >>> svc = wb.ModelService(wb.open("memory://"), wb.TensorHandler(lambda i: torch.nn.Linear(1, 1)), poll=0)
        >>> app = FastAPI(openapi_url=None); add_routes(app, svc, [])
        >>> for r in app.routes:
        ...     print(*r.methods, r.path)
        GET /v1/routes
        GET /v1/routes/{name}
        PUT /v1/routes/{name}
        DELETE /v1/routes/{name}
    """

    def _route_json(name: str) -> dict[str, Any]:
        route = service.router.get(name)
        return {"name": route.name, "arms": route.weights}

    @app.get(
        "/v1/routes",
        tags=["routes"],
        dependencies=manage,
        response_model=RoutesReply,
        responses=error_responses(*MANAGE, 500),
    )
    def routes() -> dict[str, Any]:
        """Every route and its weights."""
        return {"routes": [{"name": r.name, "arms": r.weights} for r in service.router.routes()]}

    @app.get(
        "/v1/routes/{name}",
        tags=["routes"],
        dependencies=manage,
        response_model=RouteReply,
        responses=error_responses(*RESOLVE, *MANAGE, 422, 500),
    )
    def get_route(name: RoutePath) -> dict[str, Any]:
        """One route's arms and weights."""
        return _route_json(check_route_name(name))

    @app.put(
        "/v1/routes/{name}",
        tags=["routes"],
        dependencies=manage,
        response_model=RouteReply,
        responses=error_responses(400, *MANAGE, *BODY, 500),
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
        responses=error_responses(*RESOLVE, *MANAGE, 422, 500),
    )
    def delete_route(name: RoutePath) -> dict[str, Any]:
        """Remove a route."""
        route = service.router.delete(check_route_name(name))
        return {"name": route.name, "arms": route.weights, "deleted": True}
