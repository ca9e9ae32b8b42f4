"""``/metrics``, ``/healthz`` and ``/readyz``: what an operator and an orchestrator probe."""

from __future__ import annotations

from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse

from ...serving.service import ModelService
from ..error_replies import error_responses
from ..metrics import ServingMetrics
from ..schemas import Health, Readiness

__all__ = ["add_routes"]


def add_routes(app: FastAPI, service: ModelService, metrics: ServingMetrics) -> None:
    """Add the operations routes of ``service`` to ``app`` (open, like predict), with ``metrics`` behind ``/metrics``.

    Example:
        >>> import torch, weightbank as wb
        >>> from fastapi import FastAPI
        >>> svc = wb.ModelService(wb.open("memory://"), wb.TensorHandler(lambda i: torch.nn.Linear(1, 1)), poll=0)
        >>> from weightbank.http import ServingMetrics
        >>> app = FastAPI(openapi_url=None); add_routes(app, svc, ServingMetrics(svc))
        >>> for r in app.routes:
        ...     print(*r.methods, r.path)
        GET /metrics
        GET /healthz
        GET /readyz
    """

    @app.get("/metrics", tags=["operations"], include_in_schema=False)
    def prometheus() -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/healthz", tags=["operations"], response_model=Health, responses=error_responses(500))
    def healthz() -> dict[str, str]:
        """The process is up."""
        return {"status": "ok"}

    @app.get(
        "/readyz",
        tags=["operations"],
        response_model=Readiness,
        responses={
            503: {"model": Readiness, "description": "The bank does not answer."},
            **error_responses(500),
        },
    )
    def readyz() -> JSONResponse:
        """The bank answers and the tag watcher is healthy."""
        try:
            service.bank.tags()
        except Exception as e:
            return JSONResponse({"status": "unavailable", "detail": f"{type(e).__name__}: {e}"}, 503)
        return JSONResponse({"status": "ready", "tags": len(service.served_tags())})
