"""Bearer-token auth for management endpoints, and the request body size limit.

Management (models, tags, routes) needs ``Authorization: Bearer <token>``;
the token comes from ``$WEIGHTBANK_TOKEN`` or a file. Without a token the
endpoints answer 403 unless the server was started ``insecure_local`` — and
then only to clients on the loopback interface.

Example:
    >>> import os
    >>> from weightbank.http.auth import load_token
    >>> load_token(env={"WEIGHTBANK_TOKEN": " abc \\n"})
    'abc'
"""

from __future__ import annotations

import hmac
import os
from collections.abc import Mapping
from pathlib import Path

from fastapi import HTTPException, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..errors import InvalidName

__all__ = ["LOOPBACK", "BodyLimit", "TokenGuard", "load_token"]

LOOPBACK = frozenset({"127.0.0.1", "::1", "localhost", "testclient"})
TOKEN_ENV = "WEIGHTBANK_TOKEN"


def load_token(
    token_file: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
) -> str | None:
    """The management token from ``token_file`` if given, else ``$WEIGHTBANK_TOKEN``; None when neither is set."""
    if token_file is not None:
        try:
            text = Path(token_file).read_text().strip()
        except OSError as e:
            raise InvalidName("token file", str(token_file), f"cannot read it: {e.strerror or e}") from None
        if not text:
            raise InvalidName("token file", str(token_file), "it is empty")
        return text
    value = (env if env is not None else os.environ).get(TOKEN_ENV, "").strip()
    return value or None


class TokenGuard:
    """FastAPI dependency: 401 without the right bearer token, 403 when management is off."""

    def __init__(self, token: str | None, *, insecure_local: bool = False) -> None:
        self._token = token.encode() if token else None
        self._insecure_local = insecure_local

    def __call__(self, request: Request) -> None:
        if self._token is None:
            host = request.client.host if request.client else ""
            if self._insecure_local and host in LOOPBACK:
                return
            raise HTTPException(
                403,
                "management is disabled: start the server with a token ($WEIGHTBANK_TOKEN or --token-file)"
                " or with --insecure-local on 127.0.0.1",
            )
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self._token):
            raise HTTPException(
                401,
                "management needs 'Authorization: Bearer <token>'",
                headers={"WWW-Authenticate": "Bearer"},
            )


class BodyLimit:
    """ASGI middleware: request bodies over ``max_bytes`` get 413 before the app sees a byte of them."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") in ("GET", "HEAD", "OPTIONS", "DELETE"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await self._refuse(send)
            return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            total += len(body)
            if total > self.max_bytes:
                await self._refuse(send)
                return
            chunks.append(body)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send) -> None:
        body = f'{{"detail":"request body is larger than {self.max_bytes} bytes","error":"PayloadTooLarge"}}'
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
            }
        )
        await send({"type": "http.response.body", "body": body.encode()})
