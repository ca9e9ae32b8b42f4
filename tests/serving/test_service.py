"""ModelService: one request end to end, refs vs routes, bad requests."""

from __future__ import annotations

import pytest
import torch

import weightbank as wb
from weightbank.serving import ModelService, TensorHandler

from .family import Family, build


@pytest.fixture
def svc(family: Family) -> ModelService:
    s = ModelService(family.bank, TensorHandler(build, input_shape=(None, 32)), poll=0)
    s.router.set("ab", {family.ids[1]: 50, family.ids[2]: 50})
    return s


def test_predict_by_ref_and_by_route(svc: ModelService, family: Family) -> None:
    p = svc.predict(family.x.tolist(), ref="prod")
    assert p.checkpoint == family.ids[0] and torch.equal(
        torch.tensor(p.output), family.expected(family.ids[0])
    )
    seen: list[wb.Prediction] = []
    svc.on_request(seen.append)
    for i in range(20):
        p = svc.predict(family.x.tolist(), route="ab", key=f"u{i}")
        assert p.route == "ab" and p.arm == p.checkpoint
        assert torch.equal(torch.tensor(p.output), family.expected(p.checkpoint))
    assert {p.checkpoint for p in seen} == {family.ids[1], family.ids[2]}
    via_ref = svc.predict(family.x.tolist(), ref="ab", key="u1")  # a ref naming a route is that route
    assert (
        via_ref.route == "ab"
        and via_ref.checkpoint == svc.predict(family.x.tolist(), route="ab", key="u1").checkpoint
    )
    forced = svc.predict(family.x.tolist(), route="ab", arm=family.ids[2])
    assert forced.checkpoint == family.ids[2]
    assert sum(svc.requests.values()) == 24


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({}, wb.InvalidRequest),
        ({"ref": "prod", "route": "ab"}, wb.InvalidRequest),
        ({"ref": "prod", "arm": "x"}, wb.InvalidRequest),
        ({"ref": "nope"}, wb.CheckpointNotFound),
        ({"route": "nope"}, wb.RouteNotFound),
        ({"route": "ab", "arm": "zzz"}, wb.InvalidRequest),
        ({"ref": "prod@"}, wb.InvalidRef),
    ],
)
def test_bad_requests(
    svc: ModelService, family: Family, kwargs: dict[str, str], error: type[Exception]
) -> None:
    with pytest.raises(error):
        svc.predict(family.x.tolist(), **kwargs)


def test_bad_input(svc: ModelService) -> None:
    with pytest.raises(wb.InvalidRequest, match="shape"):
        svc.predict([[1.0, 2.0]], ref="prod")
