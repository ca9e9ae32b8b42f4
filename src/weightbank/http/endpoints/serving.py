"""``POST /v1/predict``: run the handler with the checkpoint a ref names or a route picks."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import FastAPI, Header, Response

from ...serving.service import ModelService
from ..error_replies import BODY, LOAD, RESOLVE, error_responses
from ..schemas import ID_PATTERN, REF_PATTERN, PredictBody, PredictReply

__all__ = ["add_routes"]


def add_routes(app: FastAPI, service: ModelService) -> None:
    """Add the serving routes of ``service`` to ``app`` (open to every client: no management token).

    Example:
        >>> import torch, weightbank as wb
        >>> from fastapi import FastAPI
        >>> svc = wb.ModelService(wb.open("memory://"), wb.TensorHandler(lambda i: torch.nn.Linear(1, 1)), poll=0)
        >>> app = FastAPI(openapi_url=None); add_routes(app, svc)
        >>> for r in app.routes:
        ...     print(*r.methods, r.path)
        POST /v1/predict
    """

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
            **error_responses(*RESOLVE, *BODY, *LOAD, 500),
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
