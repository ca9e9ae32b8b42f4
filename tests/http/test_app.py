"""The HTTP app: predict, management with auth, bad requests are 4xx (never 500), limits, metrics."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from fastapi.testclient import TestClient

from weightbank.http import create_app
from weightbank.serving import ModelService

from ..serving.family import Family
from .conftest import AUTH, TOKEN

MANAGEMENT = [
    ("GET", "/v1/models", None),
    ("POST", "/v1/models/prod:load", None),
    ("POST", "/v1/models/prod:unload", None),
    ("POST", "/v1/models/prod:pin", None),
    ("POST", "/v1/models/prod:unpin", None),
    ("GET", "/v1/tags", None),
    ("GET", "/v1/tags/prod", None),
    ("PUT", "/v1/tags/prod", {"ref": "prod"}),
    ("POST", "/v1/tags/prod:rollback", None),
    ("GET", "/v1/routes", None),
    ("GET", "/v1/routes/ab", None),
    ("PUT", "/v1/routes/ab", {"arms": {"prod": 1}}),
    ("DELETE", "/v1/routes/ab", None),
]


def predict(client: TestClient, family: Family, **body: object) -> dict[str, object]:
    r = client.post("/v1/predict", json={"input": family.x.tolist(), **body})
    assert r.status_code == 200, r.text
    out: dict[str, object] = r.json()
    assert r.headers["X-Weightbank-Checkpoint"] == out["checkpoint"]
    assert torch.equal(torch.tensor(out["output"]), family.expected(str(out["checkpoint"])))
    return out


def test_predict_by_ref_header_and_route(client: TestClient, family: Family) -> None:
    assert predict(client, family, ref="prod")["checkpoint"] == family.ids[0]
    r = client.post(
        "/v1/predict", json={"input": family.x.tolist()}, headers={"X-Weightbank-Ref": family.ids[2]}
    )
    assert r.json()["checkpoint"] == family.ids[2]
    assert (
        client.put(
            "/v1/routes/ab", json={"arms": {family.ids[1]: 1, family.ids[3]: 1}}, headers=AUTH
        ).status_code
        == 200
    )
    arms = {predict(client, family, route="ab", key=f"k{i}")["checkpoint"] for i in range(30)}
    assert arms == {family.ids[1], family.ids[3]}
    sticky = {predict(client, family, route="ab", key="same")["checkpoint"] for _ in range(5)}
    assert len(sticky) == 1
    r = client.post(
        "/v1/predict",
        json={"input": family.x.tolist()},
        headers={"X-Weightbank-Route": "ab", "X-Weightbank-Arm": family.ids[3]},
    )
    assert r.json()["checkpoint"] == family.ids[3] and r.json()["arm"] == family.ids[3]


@pytest.mark.parametrize(("method", "path", "body"), MANAGEMENT)
def test_management_refused_without_the_token(
    client: TestClient, method: str, path: str, body: object
) -> None:
    for headers in (
        {},
        {"Authorization": "Bearer wrong"},
        {"Authorization": TOKEN},
        {"Authorization": f"Basic {TOKEN}"},
    ):
        r = client.request(method, path, json=body, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert r.headers["WWW-Authenticate"] == "Bearer"


def test_management_off_without_a_token_and_loopback_only_when_insecure(service: ModelService) -> None:
    with TestClient(create_app(service)) as c:
        assert c.get("/v1/models").status_code == 403
        assert "token" in c.get("/v1/models").json()["detail"]
    with TestClient(create_app(service, insecure_local=True)) as c:
        assert c.get("/v1/models").status_code == 200
    with TestClient(create_app(service, insecure_local=True), client=("127.0.0.1", 5000)) as c:
        assert c.get("/v1/models").status_code == 200
    with TestClient(create_app(service, insecure_local=True), client=("10.1.2.3", 5000)) as c:
        assert c.get("/v1/models").status_code == 403
        assert c.post("/v1/predict", json={"ref": "prod", "input": [[0.0] * 32]}).status_code == 200


DEEP = "[" * 5000 + "]" * 5000
ROW = "[[" + ", ".join(["0"] * 32) + "]]"


@pytest.mark.parametrize(
    ("content", "status"),
    [
        (b"{not json", 422),
        (b"", 422),
        (b"[]", 422),
        (b'"text"', 422),
        (DEEP.encode(), 400),
        (b'{"input": [[1, 2]]}', 422),  # neither ref nor route
        (b'{"input": [[1, 2]], "ref": "prod"}', 422),  # wrong shape
        (b'{"input": [[1, 2]], "ref": "prod", "route": "x"}', 422),
        (b'{"ref": "prod"}', 422),  # no input
        (b'{"input": [[0]], "ref": "prod", "extra": 1}', 422),
        (b'{"input": [[true, false]], "ref": "prod"}', 422),
        (b'{"input": [[1e999]], "ref": "prod"}', 422),
        (b'{"input": "abc", "ref": "prod"}', 422),
        (b'{"input": {"a": 1}, "ref": "prod"}', 422),
        (b'{"input": [[1, 2], [3]], "ref": "prod"}', 422),
        (b'{"input": [[1]], "ref": 5}', 422),
        (b'{"input": [[1]], "ref": ""}', 422),
        (("{" + '"input": ' + DEEP + ', "ref": "prod"}').encode(), 400),
        (('{"input": ' + ROW + ', "ref": "no-such-tag"}').encode(), 404),
        (('{"input": ' + ROW + ', "ref": "prod@"}').encode(), 400),
        (('{"input": ' + ROW + ', "ref": "abc"}').encode(), 400),
        (('{"input": ' + ROW + ', "route": "nope"}').encode(), 404),
        (('{"input": ' + ROW + ', "route": "../etc"}').encode(), 404),
        (b'{"input": [[1]], "ref": "prod", "arm": "x"}', 422),
    ],
)
def test_malformed_requests_are_4xx(client: TestClient, content: bytes, status: int) -> None:
    r = client.post("/v1/predict", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    body = r.json()
    assert isinstance(body["detail"], str) and body["detail"] and body["error"]


def test_malformed_management_requests_are_4xx(client: TestClient, family: Family) -> None:
    cases = [
        ("PUT", "/v1/routes/ab", {"arms": {}}, 422),
        ("PUT", "/v1/routes/ab", {"arms": {"prod": -1}}, 422),
        ("PUT", "/v1/routes/ab", {"arms": {"prod": "x"}}, 422),
        ("PUT", "/v1/routes/ab", {"weights": {"prod": 1}}, 422),
        ("PUT", "/v1/routes/bad%20name", {"arms": {"prod": 1}}, 400),
        ("GET", "/v1/routes/missing", None, 404),
        ("DELETE", "/v1/routes/missing", None, 404),
        ("PUT", "/v1/tags/prod", {"ref": "no-such"}, 404),
        ("PUT", "/v1/tags/bad..name", {"ref": "prod"}, 400),
        ("PUT", "/v1/tags/prod", {"ref": family.ids[1], "expect": family.ids[2]}, 409),
        ("GET", "/v1/tags/nope", None, 404),
        ("POST", "/v1/tags/prod:rollback", None, 409),  # no earlier target
        ("POST", "/v1/tags/prod:rollback", {"steps": 0}, 422),
        ("POST", "/v1/models/nope:load", None, 404),
        ("POST", "/v1/models/nope:pin", None, 404),
    ]
    for method, path, body, status in cases:
        r = client.request(method, path, json=body, headers=AUTH)
        assert r.status_code == status, (method, path, body, r.text)


def test_body_size_limit(client: TestClient) -> None:
    big = b'{"input": [' + b"0," * 40000 + b'0], "ref": "prod"}'
    r = client.post("/v1/predict", content=big, headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["detail"]

    def chunks() -> Iterator[bytes]:
        yield b'{"input": ['
        for _ in range(100):
            yield b"0," * 400
        yield b'0], "ref": "prod"}'

    r = client.post("/v1/predict", content=chunks(), headers={"Content-Type": "application/json"})
    assert r.status_code == 413
    r = client.post("/v1/predict", content=b"{}", headers={"Content-Length": "99999999999"})
    assert r.status_code == 413


def test_tags_move_and_roll_back_with_warm_flip(client: TestClient, family: Family) -> None:
    r = client.get("/v1/tags/prod", headers=AUTH)
    assert r.json()["target"] == r.json()["served"] == family.ids[0]
    r = client.put("/v1/tags/prod", json={"ref": family.ids[2], "why": "canary won"}, headers=AUTH)
    assert r.status_code == 200 and r.json()["served"] == family.ids[2]
    assert r.json()["history"][-1]["why"] == "canary won"
    assert predict(client, family, ref="prod")["checkpoint"] == family.ids[2]
    r = client.post("/v1/tags/prod:rollback", headers=AUTH)
    assert r.json()["served"] == family.ids[0]
    assert predict(client, family, ref="prod")["checkpoint"] == family.ids[0]
    listed = client.get("/v1/tags", headers=AUTH).json()["tags"]
    assert listed == [{"name": "prod", "target": family.ids[0], "served": family.ids[0]}]


def test_routes_crud(client: TestClient) -> None:
    assert client.put("/v1/routes/ab", json={"arms": {"prod": 90, "canary": 10}}, headers=AUTH).json() == {
        "name": "ab",
        "arms": {"prod": 90.0, "canary": 10.0},
    }
    assert client.get("/v1/routes/ab", headers=AUTH).json()["arms"] == {"prod": 90.0, "canary": 10.0}
    assert client.get("/v1/routes", headers=AUTH).json()["routes"][0]["name"] == "ab"
    assert client.delete("/v1/routes/ab", headers=AUTH).json()["deleted"] is True
    assert client.get("/v1/routes", headers=AUTH).json()["routes"] == []


def test_models_load_pin_unload(client: TestClient, family: Family) -> None:
    r = client.post(f"/v1/models/{family.ids[1]}:load", headers=AUTH)
    assert r.status_code == 200 and r.json()["tier"] == "device" and r.json()["leases"] == 0
    assert client.post("/v1/models/prod:pin", headers=AUTH).json()["pinned"] is True
    assert client.post(f"/v1/models/{family.ids[2]}:pin", headers=AUTH).status_code == 200
    assert client.post(f"/v1/models/{family.ids[3]}:pin", headers=AUTH).status_code == 200  # heads only
    r = client.post(f"/v1/models/{family.ids[4]}:pin", headers=AUTH)
    assert r.status_code == 507 and r.json()["error"] == "BudgetExceeded"
    listed = client.get("/v1/models", headers=AUTH).json()
    assert {m["checkpoint"] for m in listed["models"]} == {family.ids[0], family.ids[2], family.ids[3]}
    assert listed["stats"]["tiers"]["device"]["used"] <= listed["stats"]["tiers"]["device"]["budget"]
    # every resident checkpoint is pinned and the budget is full: a new one cannot load now
    r = client.post("/v1/predict", json={"input": family.x.tolist(), "ref": family.ids[4]})
    assert r.status_code in (503, 507), r.text
    assert client.post("/v1/models/prod:unpin", headers=AUTH).json()["was_pinned"] is True
    assert client.post("/v1/models/prod:unload", headers=AUTH).json()["was_resident"] is True
    assert predict(client, family, ref=family.ids[4])["checkpoint"] == family.ids[4]


def test_metrics_health_and_openapi(client: TestClient, family: Family) -> None:
    predict(client, family, ref="prod")
    predict(client, family, ref="prod")
    for cid in family.ids[1:]:
        predict(client, family, ref=cid)
    text = client.get("/metrics").text
    for name in (
        'weightbank_cache_hits_total{tier="device"} 1.0',
        'weightbank_cache_misses_total{tier="device"} 5.0',
        "weightbank_load_seconds_bucket",
        'weightbank_bytes{tier="device"}',
        f'weightbank_budget_bytes{{tier="device"}} {float(family.full_bytes + 2 * family.head_bytes)}',
        'weightbank_evictions_total{reason="pressure",tier="device"}',
        "weightbank_leases_in_flight 0.0",
        "weightbank_load_wait_seconds_count",
        f'weightbank_requests_total{{checkpoint="{family.ids[0][:12]}"}} 2.0',
    ):
        assert name in text, name
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json()["status"] == "ready"
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/predict", "/v1/models", "/v1/tags/{name}", "/v1/routes/{name}", "/healthz"} <= set(paths)
