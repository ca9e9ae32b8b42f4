from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

import weightbank as wb
from weightbank.http import create_app
from weightbank.serving import ModelService, TensorHandler

from ..serving.family import Family, build, make_family

TOKEN = "test-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def family() -> Family:
    return make_family(wb.open("memory://"), n_variants=4)


@pytest.fixture
def service(family: Family) -> Iterator[ModelService]:
    svc = ModelService(
        family.bank,
        TensorHandler(build, input_shape=(None, 32)),
        poll=0,
        budget={"device": family.full_bytes + 2 * family.head_bytes},
        wait_timeout=5,
    )
    yield svc
    svc.close()


@pytest.fixture
def client(service: ModelService) -> Iterator[TestClient]:
    with TestClient(create_app(service, token=TOKEN, max_body=64 << 10), raise_server_exceptions=False) as c:
        yield c
