"""ModelService: one request end to end, refs vs routes, bad requests."""

from __future__ import annotations

import pytest
import torch

import weightbank as wb
from weightbank.serving import ModelService, TensorHandler
from weightbank.serving.tiers import OutOfMemoryError

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
    with pytest.raises(wb.InvalidRequest, match="float32"):  # OverflowError before
        svc.predict([[10**400] * 32], ref="prod")


class Scripted:
    """A handler whose stages raise what a test asks for (``None``: behave)."""

    def __init__(self, decode: BaseException | None = None, predict: BaseException | None = None) -> None:
        self.raise_in = {"decode": decode, "predict": predict}
        self.encoded: object = None

    def build(self, info: wb.CheckpointInfo) -> torch.nn.Module:
        return build(info)

    def decode(self, payload: object) -> torch.Tensor:
        if self.raise_in["decode"] is not None:
            raise self.raise_in["decode"]
        return torch.tensor(payload)

    def predict(self, model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        if self.raise_in["predict"] is not None:
            raise self.raise_in["predict"]
        out: torch.Tensor = model(inputs)
        return out

    def encode(self, outputs: torch.Tensor) -> object:
        return self.encoded if self.encoded is not None else outputs.tolist()


@pytest.mark.parametrize(
    ("stage", "raised", "error", "transient"),
    [
        ("decode", KeyError("input"), wb.InvalidRequest, None),
        ("decode", OverflowError("int too large"), wb.InvalidRequest, None),
        ("decode", ZeroDivisionError("a handler bug"), wb.HandlerError, False),
        ("predict", IndexError("index out of range in self"), wb.InvalidRequest, None),  # token id
        ("predict", OverflowError("value too large"), wb.InvalidRequest, None),
        ("predict", KeyError("missing_config"), wb.HandlerError, False),
        ("predict", RuntimeError("a model bug"), wb.HandlerError, False),
        ("predict", OutOfMemoryError("CUDA out of memory"), wb.HandlerError, True),
        ("predict", wb.InvalidRequest("the handler's own check", "input"), wb.InvalidRequest, None),
    ],
)
def test_what_a_handler_raises_is_typed(
    family: Family, stage: str, raised: BaseException, error: type[Exception], transient: bool | None
) -> None:
    handler = Scripted(**{stage: raised})
    svc = ModelService(family.bank, handler, poll=0)
    with pytest.raises(error) as info:
        svc.predict(family.x.tolist(), ref="prod")
    if transient is not None:
        assert isinstance(info.value, wb.HandlerError) and info.value.transient is transient
        assert info.value.stage == stage and info.value.cause == type(raised).__name__
    assert svc.cache.stats().leases == 0  # the lease was released however the request failed
    svc.close()


def test_out_of_memory_is_transient_on_a_torch_without_torch_out_of_memory_error(
    family: Family, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delattr(torch, "OutOfMemoryError")  # as before torch 2.5, which the package supports
    svc = ModelService(family.bank, Scripted(predict=OutOfMemoryError("CUDA out of memory")), poll=0)
    with pytest.raises(wb.HandlerError) as info:  # not an AttributeError from the except clause
        svc.predict(family.x.tolist(), ref="prod")
    assert info.value.transient and info.value.cause == "OutOfMemoryError"
    svc.close()


def test_non_finite_or_non_json_outputs_are_refused(family: Family) -> None:
    handler = Scripted()
    svc = ModelService(family.bank, handler, poll=0)
    handler.encoded = [[1.0, float("nan")], [float("inf"), 2.0]]
    with pytest.raises(wb.NonFiniteOutput) as info:
        svc.predict(family.x.tolist(), ref="prod")
    assert info.value.count == 2 and info.value.checkpoint == family.ids[0]
    handler.encoded = [object()]
    with pytest.raises(wb.HandlerError, match="encode"):
        svc.predict(family.x.tolist(), ref="prod")
    handler.encoded = None
    assert svc.predict(family.x.tolist(), ref="prod").checkpoint == family.ids[0]
    svc.close()


def test_an_input_that_overflows_the_model_is_refused_not_nulled() -> None:
    bank = wb.open("memory://")
    state = {"weight": torch.tensor([[1e38, 1e38], [0.0, 1.0]]), "bias": torch.zeros(2)}
    bank.save(state, tags=["prod"])
    svc = ModelService(bank, TensorHandler(lambda info: torch.nn.Linear(2, 2)), poll=0)
    assert svc.predict([[0.0, 1.0]], ref="prod").output == [[torch.tensor(1e38).item(), 1.0]]
    with pytest.raises(wb.NonFiniteOutput) as info:
        svc.predict([[3e38, 3e38]], ref="prod")  # finite in float32; the layer overflows it
    assert info.value.count == 1
    svc.close()
