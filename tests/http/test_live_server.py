"""A real uvicorn server on 127.0.0.1: concurrent clients while tags flip; no wrong-version reply."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import torch
import uvicorn

from weightbank.http import create_app
from weightbank.serving import ModelService

from ..serving.family import Family
from .conftest import AUTH, TOKEN


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def server(service: ModelService) -> Iterator[str]:
    port = free_port()
    config = uvicorn.Config(
        create_app(service, token=TOKEN), host="127.0.0.1", port=port, log_level="warning", access_log=False
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not srv.started:
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    thread.join(10)


def test_tag_flips_under_concurrent_requests(server: str, family: Family) -> None:
    expected = {cid: family.expected(cid) for cid in family.ids}
    stop = threading.Event()
    replies: list[tuple[str, str, list[list[float]]]] = []
    errors: list[str] = []
    lock = threading.Lock()

    def client(n: int) -> None:
        with httpx.Client(base_url=server, timeout=10) as c:
            i = 0
            while not stop.is_set():
                body = (
                    {"input": family.x.tolist(), "ref": "prod"}
                    if n % 2
                    else {"input": family.x.tolist(), "route": "ab", "key": f"user-{n}-{i % 7}"}
                )
                r = c.post("/v1/predict", json=body)
                i += 1
                if r.status_code != 200:
                    errors.append(r.text)
                    continue
                out = r.json()
                with lock:
                    replies.append((out["checkpoint"], r.headers["X-Weightbank-Checkpoint"], out["output"]))

    with httpx.Client(base_url=server, headers=AUTH, timeout=30) as admin:
        assert admin.put("/v1/routes/ab", json={"arms": {"prod": 50, "canary": 50}}).status_code == 200
        assert admin.put("/v1/tags/canary", json={"ref": family.ids[1]}).status_code == 200
        threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        for target in (family.ids[2], family.ids[3], family.ids[4]):
            time.sleep(0.1)
            r = admin.put("/v1/tags/prod", json={"ref": target})
            assert r.status_code == 200 and r.json()["served"] == target
        time.sleep(0.1)
        assert admin.post("/v1/tags/prod:rollback").json()["served"] == family.ids[3]
        time.sleep(0.1)
        stop.set()
        for t in threads:
            t.join(10)
        metrics = httpx.get(f"{server}/metrics").text
    assert not errors, errors[:3]
    assert len(replies) > 20
    assert len({cid for cid, _, _ in replies}) >= 4
    for cid, header, out in replies:
        assert cid == header
        assert torch.equal(torch.tensor(out), expected[cid]), cid[:12]
    assert "weightbank_requests_total" in metrics
