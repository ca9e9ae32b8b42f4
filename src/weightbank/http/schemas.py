"""Request and response bodies of the HTTP API (pydantic models; unknown fields are refused).

Example:
    >>> PredictBody(input=[[1, 2]], ref="prod").ref
    'prod'
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

__all__ = ["PredictBody", "RollbackBody", "RouteBody", "TagBody"]

_NAME = Field(default=None, min_length=1, max_length=256)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class PredictBody(_Strict):
    """``POST /v1/predict``: the handler's input and what should answer it."""

    input: Any = Field(description="Model input as the handler expects it (nested lists for tensors).")
    ref: str | None = _NAME
    route: str | None = _NAME
    key: str | None = Field(default=None, max_length=256, description="Sticky routing key (e.g. a user id).")
    arm: str | None = _NAME


class TagBody(_Strict):
    """``PUT /v1/tags/{name}``: move the tag to ``ref`` (only if it points at ``expect``, when given)."""

    ref: str = Field(min_length=1, max_length=256)
    why: str = Field(default="", max_length=1000)
    expect: str | None = _NAME


class RollbackBody(_Strict):
    """``POST /v1/tags/{name}:rollback``."""

    steps: int = Field(default=1, ge=1, le=1000)
    why: str = Field(default="", max_length=1000)


class RouteBody(_Strict):
    """``PUT /v1/routes/{name}``: arms (refs) and their weights."""

    arms: dict[str, float]
