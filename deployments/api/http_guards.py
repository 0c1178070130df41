"""ASGI middleware in front of every HTTP route: the API key (all routes but health and readiness)
and the request body cap (413), both before any route code or JSON parsing runs."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from deployments.errors import APIError, PayloadTooLarge, Unauthorized
from deployments.frontend.auth import key_matches

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

OPEN_PATHS = frozenset({"/health", "/ready"})


def route_path(scope: Scope) -> str:
    """The path inside the app (a Serve route prefix arrives as root_path)."""
    path, root = scope.get("path", "/"), scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path or "/"


async def send_error(send: Send, error: APIError, extra_headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(k.lower().encode(), v.encode()) for k, v in {**error.headers(), **(extra_headers or {})}.items()]
    await send({"type": "http.response.start", "status": error.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class GuardMiddleware:
    def __init__(self, app: ASGIApp, api_keys: Sequence[str], max_body_bytes: int,
                 open_paths: frozenset[str] = OPEN_PATHS) -> None:
        self.app = app
        self.api_keys = tuple(api_keys)
        self.max_body_bytes = max_body_bytes
        self.open_paths = open_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if route_path(scope) not in self.open_paths and not key_matches(headers.get("authorization"),
                                                                        self.api_keys):
            await send_error(send, Unauthorized("missing or invalid API key (Authorization: Bearer <key>)"),
                             {"WWW-Authenticate": "Bearer"})
            return
        length = headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            await send_error(send, self._too_large(int(length)))
            return
        if scope.get("method") in ("POST", "PUT", "PATCH"):
            buffered = await self._buffered(receive, send)
            if buffered is None:
                return
            receive = buffered
        await self.app(scope, receive, send)

    def _too_large(self, size: int | None) -> PayloadTooLarge:
        got = f"{size} bytes" if size is not None else "more"
        return PayloadTooLarge(f"request body is {got}; the limit is {self.max_body_bytes} bytes (max_body_bytes)",
                               "body")

    async def _buffered(self, receive: Receive, send: Send) -> Receive | None:
        """Reads the body within the cap (chunked bodies carry no length), then replays it."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                await send_error(send, self._too_large(None))
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        return replay
