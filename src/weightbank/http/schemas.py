"""Request and response bodies of the HTTP API (pydantic models; unknown request fields are refused).

These models are the OpenAPI schema: every route declares its reply and each
error status it can answer with :class:`ErrorBody`, the one shape of every
error (``{"detail": str, "error": str}``, plus ``errors`` for a malformed
body). The grammars of refs and names are given as JSON-schema patterns
(:data:`REF_PATTERN`, :data:`TAG_PATTERN`, :data:`ROUTE_PATTERN`); the server
checks them itself (a ref or name that breaks them is a 400 or 404 with the
reason), so the patterns document the contract without changing the answers.

Example:
    >>> PredictBody(input=[[1, 2]], ref="prod").ref
    'prod'
    >>> import re; bool(re.match(REF_PATTERN, "run@best:val_loss~2")), bool(re.match(REF_PATTERN, "abc"))
    (True, False)
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

from ..serving.router import MAX_ARMS

__all__ = [
    "ID_PATTERN",
    "MAX_WEIGHT",
    "NEW_TAG_PATTERN",
    "REF_PATTERN",
    "ROUTE_PATTERN",
    "TAG_PATTERN",
    "ArmWeight",
    "DeletedRoute",
    "ErrorBody",
    "FieldError",
    "Health",
    "ModelReply",
    "ModelsReply",
    "PinReply",
    "PredictBody",
    "PredictReply",
    "Readiness",
    "RollbackBody",
    "RouteBody",
    "RouteReply",
    "RoutesReply",
    "StatsBody",
    "TagBody",
    "TagEventBody",
    "TagReply",
    "TagSummary",
    "TagsReply",
    "UnloadReply",
]

# The grammars below are plain regular expressions (no lookaround, which test generators ignore),
# written out from bank.layout.check_name / check_new_name and bank.refs; a test checks them
# against those functions on random strings.
_FIRST = r"[A-Za-z0-9_]"  # a name starts with a letter, digit or _
_CHAR = r"[A-Za-z0-9_+=,-]"  # any other name character but '.'
_REST = rf"(?:{_CHAR}|\.{_CHAR})*\.?"  # ... and '.', never two in a row
_HEX = r"[0-9a-f]"
_NAME = rf"{_FIRST}{_REST}"
_RUN = rf"{_FIRST}(?:{_CHAR}|\.{_CHAR}){{0,63}}\.?"
_NOT_ALL_HEX = (  # a name with a character that is not lowercase hex
    rf"(?:[g-zA-Z_]{_REST}|{_HEX}+(?:[g-zA-Z_+=,-]{_REST}|\.(?:{_CHAR}{_REST})?))"
)
_SELECTOR = r"(?:[0-9]+|latest|best:[^:~/\x00-\x1f\x7f]+(?::(?:min|max))?|\{[0-9]+\})"
ID_PATTERN = r"^[0-9a-f]{64}$"
"""A full checkpoint id."""
REF_PATTERN = rf"^(?:{_NOT_ALL_HEX}|{_HEX}{{6,}}|{_RUN}@{_SELECTOR})(?:~[0-9]*)*$"
"""A ref: an id, an id prefix (at least 6 lowercase hex characters), a tag, ``run@step``,
``run@latest``, ``run@best:metric[:min|:max]`` or ``tag@{N}``, each optionally followed by
``~`` / ``~N`` parent steps. A 1-5 character hex string is not a ref (too short for a prefix)."""
TAG_PATTERN = rf"^{_NAME}$"
"""A tag name: letters, digits and ``_ . + = , -``, starting with a letter, digit or ``_``, no ``..``."""
NEW_TAG_PATTERN = rf"^(?:{_NOT_ALL_HEX}|{_HEX}{{1,5}})$"
"""A name a tag may be given: a tag name that cannot be read as an id or id prefix (6+ hex characters)."""
ROUTE_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
"""A route name: letters, digits and ``. _ -``, starting with a letter or digit."""
MAX_WEIGHT = 1e306
"""The largest route weight over HTTP: 64 arms of it still sum to a finite number."""

RefStr = Annotated[str, Field(min_length=1, max_length=256, json_schema_extra={"pattern": REF_PATTERN})]
CheckpointId = Annotated[str, Field(pattern=ID_PATTERN, description="A full checkpoint id (64 hex).")]
ArmWeight = Annotated[float, Field(strict=True, ge=0, le=MAX_WEIGHT, allow_inf_nan=False)]
"""A route weight: a JSON number (not a string or a bool), 0 <= weight <= 1e306 (weights are shares)."""
ArmRef = Annotated[str, StringConstraints(min_length=1, max_length=256)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# -- errors ------------------------------------------------------------------------------------
class FieldError(BaseModel):
    """One problem in a malformed request body."""

    loc: list[str | int] = Field(description="Where: e.g. ['body', 'arms', 'prod'].")
    msg: str
    type: str


class ErrorBody(BaseModel):
    """Every error reply: a message saying what to do next, and the error's class name."""

    detail: str = Field(description="What went wrong and what to do next.")
    error: str = Field(
        description="The error's name, e.g. CheckpointNotFound, InvalidRequest, CorruptObject."
    )
    errors: list[FieldError] | None = Field(
        default=None, description="For a malformed body (422): each problem found (at most 10)."
    )


# -- serving -----------------------------------------------------------------------------------
class PredictBody(_Strict):
    """``POST /v1/predict``: the handler's input and what should answer it (exactly one of ref and route)."""

    input: Any = Field(description="Model input as the handler expects it (nested lists for tensors).")
    ref: RefStr | None = Field(default=None, description="The checkpoint or tag to answer with.")
    route: Annotated[str, Field(min_length=1, max_length=256)] | None = Field(
        default=None, description="A route whose arms share the traffic (see PUT /v1/routes/{name})."
    )
    key: Annotated[str, Field(max_length=256)] | None = Field(
        default=None, description="Sticky routing key (e.g. a user id)."
    )
    arm: Annotated[str, Field(min_length=1, max_length=256)] | None = Field(
        default=None, description="Force this arm of the route (overrides the draw)."
    )


class PredictReply(BaseModel):
    """The handler's output and the checkpoint that produced it (also in ``X-Weightbank-Checkpoint``)."""

    output: Any = Field(description="The handler's JSON output; never holds NaN or infinities.")
    checkpoint: CheckpointId
    ref: str
    route: str | None
    arm: str | None


# -- models ------------------------------------------------------------------------------------
class ModelReply(BaseModel):
    """One resident checkpoint."""

    checkpoint: CheckpointId
    tier: Literal["device", "host"]
    nbytes: int = Field(ge=0, description="Bytes of all its tensors (shared ones included).")
    unique_bytes: int = Field(ge=0, description="Bytes only it holds in its tier.")
    leases: int = Field(ge=0)
    pinned: bool
    loaded_at: float = Field(description="Unix time it became resident in this tier.")
    last_used: float = Field(description="Unix time of its last lease.")


class TierBody(BaseModel):
    tier: str
    used: int
    budget: int
    peak: int


class DiskBody(BaseModel):
    root: str
    max_bytes: int
    bytes: int
    entries: int
    hits: int
    misses: int
    hit_bytes: int
    puts: int
    put_bytes: int
    evictions: int
    evicted_bytes: int
    discarded: int
    errors: int


class StatsBody(BaseModel):
    """The cache's counters and gauges (see :class:`weightbank.CacheStats`)."""

    tiers: dict[str, TierBody]
    hits: dict[str, int]
    misses: dict[str, int]
    loads: int
    load_seconds: float
    bytes_loaded: dict[str, int]
    bytes_reused: int
    evictions: dict[str, int]
    leases: int
    loads_in_flight: int
    resident: dict[str, int]
    pinned: int
    queue_wait_seconds: float
    disk: DiskBody | None
    hit_rate: float


class ModelsReply(BaseModel):
    models: list[ModelReply] = Field(description="Resident checkpoints, most recently used first.")
    stats: StatsBody


class UnloadReply(BaseModel):
    checkpoint: CheckpointId
    was_resident: bool


class PinReply(BaseModel):
    checkpoint: CheckpointId
    was_pinned: bool


# -- tags --------------------------------------------------------------------------------------
class TagBody(_Strict):
    """``PUT /v1/tags/{name}``: move the tag to ``ref`` (only if it points at ``expect``, when given)."""

    ref: RefStr
    why: str = Field(default="", max_length=1000)
    expect: RefStr | None = Field(default=None, description="Move only if the tag points here now.")


class RollbackBody(_Strict):
    """``POST /v1/tags/{name}:rollback``."""

    steps: int = Field(default=1, ge=1, le=1000)
    why: str = Field(default="", max_length=1000)


class TagEventBody(BaseModel):
    tag: str
    action: Literal["set", "untag", "rollback"]
    old: str | None
    new: str | None
    at: float
    by: str
    why: str


class TagReply(BaseModel):
    """A tag: its target in the bank, the target requests are served from, and recent history."""

    name: str
    target: str | None
    served: str | None = Field(description="The target requests resolve to now (moves once warm).")
    warm_error: str | None = Field(description="Why the bank's target could not be warmed, if it could not.")
    history: list[TagEventBody] = Field(description="The last 20 changes, oldest first.")


class TagSummary(BaseModel):
    name: str
    target: str | None
    served: str | None


class TagsReply(BaseModel):
    tags: list[TagSummary]


# -- routes ------------------------------------------------------------------------------------
class RouteBody(_Strict):
    """``PUT /v1/routes/{name}``: arms (refs) and their relative weights (finite sum, at least one > 0)."""

    arms: dict[ArmRef, ArmWeight] = Field(
        min_length=1,
        max_length=MAX_ARMS,
        description="Arm (a ref) -> weight; traffic splits by share. At least one weight is positive.",
        # not every weight is 0 (weights are >= 0): the router refuses a route no request can take
        json_schema_extra={"not": {"additionalProperties": {"maximum": 0}}},
    )


class RouteReply(BaseModel):
    name: str
    arms: dict[str, float]


class RoutesReply(BaseModel):
    routes: list[RouteReply]


class DeletedRoute(RouteReply):
    deleted: bool


# -- operations --------------------------------------------------------------------------------
class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    status: Literal["ready", "unavailable"]
    tags: int | None = Field(default=None, description="Tags served (when ready).")
    detail: str | None = Field(default=None, description="Why not (when unavailable).")
