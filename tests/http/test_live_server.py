"""A real uvicorn server on 127.0.0.1: concurrent clients while tags flip; no wrong-version reply.

Nothing here waits for an amount of time: each step waits for a condition (a
count of replies from the new target) under a generous deadline, so a slow or
loaded machine only makes the test take longer.
"""

from __future__ import annotations

import functools
import http.client
import json
import threading
import time
from collections.abc import Callable, Iterator

import httpx
import pytest
import torch

import weightbank as wb
from weightbank.serving import ModelService

from ..serving.family import Family
from .conftest import AUTH, TOKEN
from .live import DEADLINE, start_server


@pytest.fixture
def server(service: ModelService) -> Iterator[str]:
    url, stop = start_server(service, TOKEN)
    yield url
    stop()


class Replies:
    """Replies collected by client threads; ``wait_for`` blocks until a condition on them holds."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, list[list[float]]]] = []
        self.errors: list[str] = []
        self._cond = threading.Condition()

    def add(self, item: tuple[str, str, list[list[float]]] | None, error: str | None = None) -> None:
        with self._cond:
            if item is not None:
                self.items.append(item)
            if error is not None:
                self.errors.append(error)
            self._cond.notify_all()

    def count(self, cid: str, since: int = 0) -> int:
        with self._cond:
            return sum(1 for c, _, _ in self.items[since:] if c == cid)

    def mark(self) -> int:
        with self._cond:
            return len(self.items)

    def wait_for(self, what: str, pred: Callable[[], bool]) -> None:
        deadline = time.monotonic() + DEADLINE
        with self._cond:
            while not pred():
                assert not self.errors, self.errors[:3]
                left = deadline - time.monotonic()
                assert left > 0, f"timed out waiting for {what}"
                self._cond.wait(min(left, 1.0))


def test_tag_flips_under_concurrent_requests(server: str, family: Family) -> None:
    expected = {cid: family.expected(cid) for cid in family.ids}
    stop = threading.Event()
    replies = Replies()
    per_target = 5

    def client(n: int) -> None:
        with httpx.Client(base_url=server, timeout=DEADLINE) as c:
            i = 0
            while not stop.is_set():
                body = (
                    {"input": family.x.tolist(), "ref": "prod"}
                    if n % 2
                    else {"input": family.x.tolist(), "route": "ab", "key": f"user-{n}-{i % 7}"}
                )
                try:
                    r = c.post("/v1/predict", json=body)
                except httpx.HTTPError as e:  # reported, and fails the test below
                    replies.add(None, f"{type(e).__name__}: {e}")
                    return
                i += 1
                if r.status_code != 200:
                    replies.add(None, r.text)
                    continue
                out = r.json()
                replies.add((out["checkpoint"], r.headers["X-Weightbank-Checkpoint"], out["output"]))

    with httpx.Client(base_url=server, headers=AUTH, timeout=DEADLINE) as admin:
        assert admin.put("/v1/routes/ab", json={"arms": {"prod": 50, "canary": 50}}).status_code == 200
        assert admin.put("/v1/tags/canary", json={"ref": family.ids[1]}).status_code == 200
        threads = [threading.Thread(target=client, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        try:
            replies.wait_for("canary replies", lambda: replies.count(family.ids[1]) >= per_target)

            def enough(cid: str, since: int) -> bool:
                return replies.count(cid, since) >= per_target

            for target in (family.ids[2], family.ids[3], family.ids[4]):
                since = replies.mark()
                r = admin.put("/v1/tags/prod", json={"ref": target})
                assert r.status_code == 200 and r.json()["served"] == target
                replies.wait_for(f"replies from {target[:12]}", functools.partial(enough, target, since))
            since = replies.mark()
            assert admin.post("/v1/tags/prod:rollback").json()["served"] == family.ids[3]
            replies.wait_for(
                "replies after the rollback", lambda: replies.count(family.ids[3], since) >= per_target
            )
        finally:
            stop.set()
            for t in threads:
                t.join(DEADLINE)
        assert not any(t.is_alive() for t in threads)
        metrics = httpx.get(f"{server}/metrics").text
    assert not replies.errors, replies.errors[:3]
    assert {family.ids[1], family.ids[2], family.ids[3], family.ids[4]} <= {c for c, _, _ in replies.items}
    for cid, header, out in replies.items:
        assert cid == header
        assert torch.equal(torch.tensor(out), expected[cid]), cid[:12]
    assert "weightbank_requests_total" in metrics


def _post(
    conn: http.client.HTTPConnection, path: str, body: object, **headers: str
) -> http.client.HTTPResponse:
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json", **headers})
    return conn.getresponse()


def test_errors_keep_the_connection_alive(
    server: str, family: Family, service: ModelService, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An input that overflows (OverflowError before) and an unexpected exception are JSON replies
    on a connection that stays open for the next request."""
    host, port = server.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=DEADLINE)
    try:
        r = _post(conn, "/v1/predict", {"input": [[10**400] * 32], "ref": "prod"})
        body = json.loads(r.read())
        assert r.status == 422 and body["error"] == "InvalidRequest" and not r.will_close
        sock = conn.sock
        r = _post(conn, "/v1/predict", {"input": family.x.tolist(), "ref": "prod"})
        assert r.status == 200 and json.loads(r.read())["checkpoint"] == family.ids[0]
        assert conn.sock is sock, "the server closed the keep-alive connection"

        def broken() -> list[wb.ModelStatus]:
            raise ZeroDivisionError("a bug")

        monkeypatch.setattr(service.cache, "models", broken)
        conn.request("GET", "/v1/models", headers=AUTH)
        r = conn.getresponse()
        body = json.loads(r.read())
        assert r.status == 500 and body["error"] == "InternalError" and not r.will_close
        conn.request("GET", "/healthz")
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read()) == {"status": "ok"}
        assert conn.sock is sock, "the server closed the keep-alive connection"
    finally:
        conn.close()
