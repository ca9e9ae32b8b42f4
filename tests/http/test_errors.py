"""Every failure is a logged JSON reply of the common shape, 4xx for the request's fault, 5xx for ours;
Retry-After only where a retry may succeed."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Protocol

import pytest
import torch
from fastapi.testclient import TestClient

import weightbank as wb
from weightbank.http import create_app
from weightbank.serving import ModelService, TensorHandler
from weightbank.serving.tiers import OutOfMemoryError

from ..serving.family import Family, build, make_family, patch_load_tensors
from .conftest import AUTH, TOKEN


class Reply(Protocol):
    """What these tests read of a reply (TestClient's and httpx's responses both have it)."""

    @property
    def status_code(self) -> int: ...

    @property
    def text(self) -> str: ...

    @property
    def headers(self) -> Mapping[str, str]: ...

    def json(self) -> Any: ...


def error_of(r: Reply, status: int, error: str) -> dict[str, object]:
    """The reply's JSON, checked to be the common error shape with ``status`` and ``error``."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json", r.text
    body: dict[str, object] = r.json()
    assert set(body) <= {"detail", "error", "errors"} and isinstance(body["detail"], str) and body["detail"]
    assert body["error"] == error, body
    return body


class Failing:
    """A handler for the family whose ``predict`` raises ``error`` (a custom model's failure)."""

    def __init__(self, error: BaseException) -> None:
        self.error = error

    def build(self, info: wb.CheckpointInfo) -> torch.nn.Module:
        return build(info)

    def decode(self, payload: object) -> torch.Tensor:
        return torch.tensor(payload, dtype=torch.long)

    def predict(self, model: torch.nn.Module, inputs: torch.Tensor) -> torch.Tensor:
        raise self.error

    def encode(self, outputs: torch.Tensor) -> object:
        return outputs.tolist()


def client_for(service: ModelService) -> TestClient:
    return TestClient(create_app(service, token=TOKEN), raise_server_exceptions=False)


def test_input_that_overflows_is_a_422(client: TestClient) -> None:
    for row in ([10**400] * 32, [1e300] * 32, [-(10**39)] * 32):
        r = client.post("/v1/predict", json={"input": [row], "ref": "prod"})
        assert "float32" in str(error_of(r, 422, "InvalidRequest")["detail"])


@pytest.mark.parametrize(
    ("raised", "status", "error", "retry"),
    [
        (IndexError("index out of range in self"), 422, "InvalidRequest", False),  # a token id past the vocab
        (ValueError("bad value"), 422, "InvalidRequest", False),
        (KeyError("a bug in the handler"), 500, "HandlerError", False),
        (RuntimeError("a bug in the model"), 500, "HandlerError", False),
        (OutOfMemoryError("CUDA out of memory"), 503, "HandlerError", True),
    ],
)
def test_what_a_model_raises_is_json_and_logged(
    family: Family,
    caplog: pytest.LogCaptureFixture,
    raised: BaseException,
    status: int,
    error: str,
    retry: bool,
) -> None:
    service = ModelService(family.bank, Failing(raised), poll=0)
    with client_for(service) as c, caplog.at_level(logging.INFO, logger="weightbank.http"):
        r = c.post("/v1/predict", json={"input": [[300, 1]], "ref": "prod"})
        error_of(r, status, error)
        assert (r.headers.get("Retry-After") == "1") is retry
        assert c.get("/healthz").status_code == 200  # the server goes on
    [record] = [rec for rec in caplog.records if rec.name == "weightbank.http"]
    assert f"-> {status} {error}" in record.getMessage()
    assert record.levelno == (logging.ERROR if status >= 500 else logging.INFO)
    assert (record.exc_info is not None) is (status >= 500)  # a server fault logs its traceback
    service.close()


def test_an_unexpected_exception_is_a_json_500(
    service: ModelService,
    client: TestClient,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken() -> list[wb.ModelStatus]:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(service.cache, "models", broken)
    with caplog.at_level(logging.INFO, logger="weightbank.http"):
        r = client.get("/v1/models", headers=AUTH)
    assert "ZeroDivisionError" in str(error_of(r, 500, "InternalError")["detail"])
    assert "Retry-After" not in r.headers
    assert any(rec.levelno == logging.ERROR and rec.exc_info for rec in caplog.records)


def test_non_finite_outputs_are_an_error_never_null() -> None:
    bank = wb.open("memory://")
    bank.save({"weight": torch.tensor([[1e38, 1e38], [0.0, 1.0]]), "bias": torch.zeros(2)}, tags=["prod"])
    nan = bank.save({"weight": torch.full((2, 2), float("nan")), "bias": torch.zeros(2)}, tags=["nan"]).id
    service = ModelService(bank, TensorHandler(lambda info: torch.nn.Linear(2, 2)), poll=0)
    with client_for(service) as c:
        assert c.post("/v1/predict", json={"input": [[0.0, 1.0]], "ref": "prod"}).status_code == 200
        r = c.post("/v1/predict", json={"input": [[3e38, 3e38]], "ref": "prod"})  # the layer overflows
        assert "non-finite" in str(error_of(r, 422, "NonFiniteOutput")["detail"])
        r = c.post("/v1/predict", json={"input": [[1.0, 1.0]], "ref": "nan"})  # a damaged checkpoint
        assert nan[:12] in str(error_of(r, 422, "NonFiniteOutput")["detail"])
    service.close()


def test_damage_is_a_500_without_retry_and_an_outage_a_503_with_it(tmp_path: Path) -> None:
    family = make_family(wb.open(tmp_path / "bank"))
    [own] = set(family.bank.show(family.ids[1]).packs) - set(family.bank.show(family.ids[0]).packs)
    pack = tmp_path / "bank" / own
    data = bytearray(pack.read_bytes())
    data[len(data) // 2] ^= 0xFF
    pack.write_bytes(bytes(data))
    service = ModelService(family.bank, TensorHandler(build, input_shape=(None, 32)), poll=0)
    body = {"input": family.x.tolist()}
    with client_for(service) as c:
        r = c.post("/v1/predict", json={**body, "ref": family.ids[1]})
        error_of(r, 500, "CorruptObject")
        assert "Retry-After" not in r.headers, "permanent damage must not advertise a retry"
        assert c.post("/v1/predict", json={**body, "ref": family.ids[2]}).status_code == 200

        real = family.bank.load_tensors

        def outage(*a: object, **k: object) -> dict[str, torch.Tensor]:
            raise wb.StorageError("the object store timed out")

        patch_load_tensors(family.bank, outage)
        r = c.post("/v1/predict", json={**body, "ref": family.ids[3]})
        error_of(r, 503, "StorageError")
        assert r.headers["Retry-After"] == "1"
        patch_load_tensors(family.bank, real)
        assert c.post("/v1/predict", json={**body, "ref": family.ids[3]}).status_code == 200
    service.close()


def test_budget_errors_retry_only_when_transient(family: Family) -> None:
    service = ModelService(
        family.bank,
        TensorHandler(build, input_shape=(None, 32)),
        poll=0,
        budget={"device": family.full_bytes},
        wait_timeout=0,
    )
    body = {"input": family.x.tolist()}
    with client_for(service) as c, service.cache.lease(family.ids[1]):
        r = c.post("/v1/predict", json={**body, "ref": family.ids[2]})  # 1 is leased: no room now
        error_of(r, 503, "BudgetExceeded")
        assert r.headers["Retry-After"] == "1"
    small = ModelService(
        family.bank, TensorHandler(build, input_shape=(None, 32)), poll=0, budget={"device": 100}
    )
    with client_for(small) as c:
        r = c.post("/v1/predict", json={**body, "ref": "prod"})  # never fits
        error_of(r, 507, "BudgetExceeded")
        assert "Retry-After" not in r.headers
    service.close()
    small.close()


@pytest.mark.parametrize(
    "arms",
    [
        {"prod": "90"},
        {"prod": True},
        {"prod": None},
        {"prod": 1e308, "canary": 1e308},
        {"prod": -1},
        {"prod": 0},
        {f"a{i}": 1 for i in range(65)},
    ],
)
def test_bad_route_weights_are_refused_and_change_nothing(
    client: TestClient, arms: dict[str, object]
) -> None:
    assert (
        client.put("/v1/routes/ab", json={"arms": {"prod": 90, "canary": 10}}, headers=AUTH).status_code
        == 200
    )
    r = client.put("/v1/routes/ab", json={"arms": arms}, headers=AUTH)
    error_of(r, 422, "InvalidRequest")
    assert client.get("/v1/routes/ab", headers=AUTH).json()["arms"] == {"prod": 90.0, "canary": 10.0}


@pytest.fixture
def quiet_client(service: ModelService) -> Iterator[TestClient]:
    with client_for(service) as c:
        yield c


def test_four_hundreds_are_logged(quiet_client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="weightbank.http"):
        quiet_client.post("/v1/predict", json={"input": [[0.0] * 32], "ref": "no-such-tag"})
        quiet_client.get("/v1/models")
    messages = [rec.getMessage() for rec in caplog.records if rec.name == "weightbank.http"]
    assert any("POST /v1/predict -> 404 CheckpointNotFound" in m for m in messages), messages
    assert any("GET /v1/models -> 401 Unauthorized" in m for m in messages), messages
