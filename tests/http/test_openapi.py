"""The OpenAPI schema describes the API: schemathesis, run against a live server, finds no 5xx and no
schema failure (undocumented status, body or header off its schema, a schema-valid request refused,
a wrong answer to an undeclared method).

The run is bounded by examples, not time: a fixed seed, ``MAX_EXAMPLES`` cases per operation and
phase, one worker. A slow machine makes it slower, never different.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import weightbank as wb
from weightbank.http.schemas import NEW_TAG_PATTERN, REF_PATTERN, TAG_PATTERN
from weightbank.serving import ModelService, TensorHandler

from ..serving.family import build, make_family
from .conftest import TOKEN
from .live import DEADLINE, start_server

MAX_EXAMPLES = 10
SEED = 20261101
PHASES = "examples,coverage,fuzzing"  # the schema declares no links: the stateful phase has nothing to chain
# A model decides which inputs it takes: a schema-valid `input` may still be refused with a 422 (a
# shape the model does not take, an output that overflows), and whether a request names exactly one
# of ref and route may be split between its body and its headers. Every such refusal is a declared
# 422 of the common error shape, which the other checks still verify on /v1/predict.
CONFIG = """
[[operations]]
include-path = "/v1/predict"
checks.positive_data_acceptance.enabled = false
"""


@pytest.fixture(scope="module")
def live_url() -> Iterator[str]:
    family = make_family(wb.open("memory://"), n_variants=4)
    service = ModelService(
        family.bank,
        TensorHandler(build, input_shape=(None, 32)),
        poll=0,
        budget={"device": family.full_bytes + 2 * family.head_bytes},
        wait_timeout=5,
    )
    url, stop = start_server(service, TOKEN, max_body=64 << 10)
    yield url
    stop()
    service.close()


def test_schemathesis_finds_no_server_error_and_no_schema_failure(live_url: str, tmp_path: Path) -> None:
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    cmd = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "--config-file",
        str(config),
        "--no-color",
        "run",
        f"{live_url}/openapi.json",
        "--header",
        f"Authorization: Bearer {TOKEN}",
        "--max-examples",
        str(MAX_EXAMPLES),
        "--seed",
        str(SEED),
        "--workers",
        "1",
        "--phases",
        PHASES,
        "--request-timeout",
        str(DEADLINE),
        "--suppress-health-check",
        "too_slow",
        "--report-dir",
        str(tmp_path / "report"),
    ]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=10 * DEADLINE, cwd=tmp_path, check=False
    )
    out = proc.stdout + proc.stderr
    summary = re.search(r"(\d+) generated[^\n]*", out)
    print(f"schemathesis: {summary.group(0) if summary else 'no summary'}")  # shown with -rP / -s
    assert proc.returncode == 0, out[-12000:]
    assert summary is not None and int(summary.group(1)) > 0, out[-4000:]
    assert re.match(r"(\d+) generated, \1 passed", summary.group(0)), summary.group(0)  # no failure, no error


# -- the grammars in the schema are the library's grammars ------------------------------------
def _accepts(check: object, name: str) -> bool:
    try:
        check("tag", name)  # type: ignore[operator]
    except wb.WeightbankError:
        return False
    return True


def test_the_schema_patterns_match_the_name_and_ref_rules() -> None:
    """Random strings over the interesting alphabet: each pattern accepts exactly what the bank does."""
    import random

    from weightbank.bank.layout import check_name, check_new_name

    rng = random.Random(7)
    alphabet = "abcdef0123456789gxYZ_.+=,-@~:{}"
    for _ in range(20000):
        s = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 10)))
        assert bool(re.match(TAG_PATTERN, s)) == _accepts(check_name, s), s
        assert bool(re.match(NEW_TAG_PATTERN, s)) == _accepts(check_new_name, s), s
        plain = "@" not in s and "~" not in s
        if plain:  # a plain ref: a name that is not 1-5 hex characters, or an id / id prefix
            short_hex = re.fullmatch(r"[0-9a-f]{1,5}", s) is not None
            want = (_accepts(check_name, s) and not short_hex) or re.fullmatch(r"[0-9a-f]{6,}", s) is not None
            assert bool(re.match(REF_PATTERN, s)) == want, s
    for ref in ("prod", "run@12", "run@latest~2", "run@best:val_loss:max", "prod@{3}~", "a" * 64, "abcdef"):
        assert re.match(REF_PATTERN, ref), ref
    for ref in ("abc", "a..b@3", "run@", "@3", "run@best:", "x~y", ""):
        assert not re.match(REF_PATTERN, ref), ref


def test_every_route_declares_its_errors_with_the_common_shape(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    error = spec["components"]["schemas"]["ErrorBody"]
    assert error["properties"]["detail"]["type"] == "string" and error["required"] == ["detail", "error"]
    assert "HTTPValidationError" not in spec["components"]["schemas"]  # FastAPI's array `detail` is not ours
    for path, methods in spec["paths"].items():
        for method, op in methods.items():
            codes = set(op["responses"])
            assert "500" in codes, (method, path)
            if path.startswith("/v1/") and path != "/v1/predict":
                assert {"401", "403"} <= codes, (method, path)
            if method in ("post", "put"):
                assert {"413", "422"} <= codes, (method, path)
            if "{" in path:
                assert {"400", "404", "422"} <= codes or method == "put", (method, path)
            for code, response in op["responses"].items():
                if code.startswith(("4", "5")) and path != "/readyz":
                    ref = response["content"]["application/json"]["schema"]["$ref"]
                    assert ref == "#/components/schemas/ErrorBody", (method, path, code)
    params = {p["name"]: p["schema"] for p in spec["paths"]["/v1/models/{ref}:load"]["post"]["parameters"]}
    assert params["ref"]["pattern"] == REF_PATTERN and params["ref"]["maxLength"] == 256


def test_405_lists_every_method_of_the_path(client: TestClient) -> None:
    r = client.put("/v1/tags/prod:rollback", json={"steps": 1})  # never read as tag "prod:rollback"
    assert r.status_code == 405 and r.headers["Allow"] == "POST" and r.json()["error"] == "MethodNotAllowed"
    r = client.request("OPTIONS", "/v1/routes/ab")
    assert r.status_code == 405 and r.headers["Allow"] == "DELETE, GET, PUT"
