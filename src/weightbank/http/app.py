"""The FastAPI app: predict, model/tag/route management, metrics and health, over a ModelService.

:func:`create_app` assembles it: the error replies of
:mod:`~weightbank.http.error_replies` (every error a JSON reply of one shape,
4xx for what the request caused, 5xx for server faults, each logged to
``weightbank.http``), the body limit and token guard of
:mod:`~weightbank.http.auth`, and the routes of :mod:`~weightbank.http.endpoints`,
each a few lines calling the serving library.

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

from fastapi import Depends, FastAPI, Security
from fastapi.security import HTTPBearer

from .._version import __version__
from ..serving.service import ModelService
from .auth import BodyLimit, TokenGuard
from .endpoints import models, operations, routes, serving, tags
from .error_replies import ErrorsAsJson, install_error_handlers, retryable, status_of
from .metrics import ServingMetrics

__all__ = ["create_app", "retryable", "status_of"]


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
    install_error_handlers(app)
    serving.add_routes(app, service)
    models.add_routes(app, service, manage)
    tags.add_routes(app, service, manage)
    routes.add_routes(app, service, manage)
    operations.add_routes(app, service, metrics)
    return app
