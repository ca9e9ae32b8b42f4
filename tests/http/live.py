"""A real uvicorn server on a free loopback port, in a thread, for tests that need real sockets."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

import uvicorn

from weightbank.http import create_app
from weightbank.serving import ModelService

DEADLINE = 120.0  # seconds; only ever reached when something is broken


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start_server(
    service: ModelService, token: str, *, max_body: int = 16 << 20
) -> tuple[str, Callable[[], None]]:
    """Serve ``service`` on a free loopback port; returns the base URL and a function that stops it.

    It waits for the server to be up (a condition, under a generous deadline), never for a time.
    """
    port = free_port()
    config = uvicorn.Config(
        create_app(service, token=token, max_body=max_body),
        host="127.0.0.1",
        port=port,
        log_level="warning",
        access_log=False,
    )
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + DEADLINE
    while not srv.started:
        assert thread.is_alive(), "the server thread died"
        assert time.monotonic() < deadline, "server did not start"
        time.sleep(0.01)

    def stop() -> None:
        srv.should_exit = True
        thread.join(DEADLINE)
        assert not thread.is_alive(), "the server did not stop"

    return f"http://127.0.0.1:{port}", stop
