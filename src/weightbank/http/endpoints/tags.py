"""``/v1/tags``: each tag's target in the bank and the target served, moving and rolling back tags."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from typing import Annotated, Any

from fastapi import Body, FastAPI, params

from ...serving.service import ModelService
from ..error_replies import BODY, MANAGE, RESOLVE, error_responses
from ..params import NewTagPath, TagPath
from ..schemas import RollbackBody, TagBody, TagReply, TagsReply

__all__ = ["add_routes"]


def add_routes(app: FastAPI, service: ModelService, manage: Sequence[params.Depends]) -> None:
    """Add the tag routes of ``service`` to ``app``, each guarded by ``manage``.

    Example:
        >>> import torch, weightbank as wb
        >>> from fastapi import FastAPI
        >>> svc = wb.ModelService(wb.open("memory://"), wb.TensorHandler(lambda i: torch.nn.Linear(1, 1)), poll=0)
        >>> app = FastAPI(openapi_url=None); add_routes(app, svc, [])
        >>> for r in app.routes:
        ...     print(*r.methods, r.path)
        GET /v1/tags
        GET /v1/tags/{name:segment}
        PUT /v1/tags/{name:segment}
        POST /v1/tags/{name:segment}:rollback
    """

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
        responses=error_responses(*MANAGE, 500, 503),
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
        responses=error_responses(*RESOLVE, *MANAGE, 422, 500, 503),
    )
    def get_tag(name: TagPath) -> dict[str, Any]:
        """A tag's target, served target and recent history."""
        return _tag_json(name)

    @app.put(
        "/v1/tags/{name:segment}",
        tags=["tags"],
        dependencies=manage,
        response_model=TagReply,
        responses=error_responses(*RESOLVE, *MANAGE, 409, *BODY, 500, 503),
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
        responses=error_responses(*RESOLVE, *MANAGE, 409, *BODY, 500, 503),
    )
    def rollback_tag(name: TagPath, body: Annotated[RollbackBody | None, Body()] = None) -> dict[str, Any]:
        """Move a tag back to an earlier target (warmed first)."""
        b = body or RollbackBody()
        service.rollback_tag(name, b.steps, why=b.why)
        return _tag_json(name)
