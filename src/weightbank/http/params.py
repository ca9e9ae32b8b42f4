"""Path parameters: the ``segment`` convertor and the annotated ref, tag and route parameters of every route.

A ``{name:segment}`` path parameter matches one path segment without ``:``, so
``/v1/tags/{name}`` never swallows ``/v1/tags/{name}:rollback``. Each parameter
declares its grammar (the patterns of :mod:`~weightbank.http.schemas`) in the
OpenAPI schema; the library checks it again when the value is used.

Example:
    >>> from starlette.convertors import CONVERTOR_TYPES
    >>> CONVERTOR_TYPES["segment"].regex
    '[^/:]+'
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Path
from starlette.convertors import Convertor, register_url_convertor

from .schemas import NEW_TAG_PATTERN, REF_PATTERN, ROUTE_PATTERN, TAG_PATTERN

__all__ = ["NewTagPath", "RefPath", "RoutePath", "TagPath"]


class _Segment(Convertor[str]):
    """A path segment without ``:``, so ``/v1/tags/{name}`` never swallows ``/v1/tags/{name}:rollback``."""

    regex = "[^/:]+"

    def convert(self, value: str) -> str:
        return value

    def to_string(self, value: str) -> str:
        return value


register_url_convertor("segment", _Segment())

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
