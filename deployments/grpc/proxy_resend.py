"""Installed in Ray Serve's proxy with `proxy_replica_lost`: a request whose ingress replica died
before the proxy sent the client anything (no HTTP response message, no gRPC message) is sent
again, to another replica (Serve's router drops a replica once a call to it raised
`ActorDiedError`), at most `MAX_RESENDS` times; then it ends with `proxy_replica_lost`'s 503 /
UNAVAILABLE. Once output has started nothing is resent: the client has seen part of an answer.

What can be resent: gRPC calls with a single request message (the proxy holds it), and HTTP
requests whose body is at most `REPLAY_BODY_LIMIT` bytes (the ingress's default `max_body_bytes`):
the client's ASGI `receive` is recorded as the proxy reads it and replayed for the next replica.
Not websockets, client-streaming gRPC or cross-language apps.

How a loss is seen: Serve's `send_request_to_replica` catches the replica's error itself and asks
the proxy module for a status (`get_http_response_status`, `get_grpc_response_status`, with the
request id); `proxy_replica_lost` reports a lost replica to `note_lost`. If the attempt's first
message reaches the wrapper after that, nothing was sent before the loss."""

from __future__ import annotations

import inspect
import logging
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger("ray.serve")

MAX_RESENDS = 2
REPLAY_BODY_LIMIT = 8 * 2**20
_PARAMETERS = ["self", "request_id", "internal_request_id", "handle", "proxy_request", "app_is_cross_language"]


@dataclass
class _Attempt:
    lost: bool = False  # its replica died (reported by the status functions)


_attempts: dict[str, _Attempt] = {}  # request id -> the attempt in progress


def note_lost(request_id: Any) -> None:
    """Called by the status functions when a request's replica died."""
    attempt = _attempts.get(request_id) if isinstance(request_id, str) else None
    if attempt is not None:
        attempt.lost = True


class ReplayableReceive:
    """An ASGI `receive` that records the request body it passes on, so that it can be given again
    from the start (`rewind`) while it stayed within `limit` bytes and the client is still there."""

    def __init__(self, receive: Callable[[], Awaitable[dict[str, Any]]], limit: int) -> None:
        self._receive = receive
        self._limit = limit
        self._seen: list[dict[str, Any]] = []
        self._size = 0
        self._replay: deque[dict[str, Any]] = deque()
        self.replayable = True

    async def __call__(self) -> dict[str, Any]:
        if self._replay:
            return self._replay.popleft()
        message = await self._receive()
        if message.get("type") == "http.request" and self.replayable:
            self._size += len(message.get("body", b""))
            self._seen.append(message)
            if self._size > self._limit:
                self.replayable, self._seen = False, []
        elif message.get("type") == "http.disconnect":
            self.replayable, self._seen = False, []  # the client is gone: nobody to answer
        return message

    def rewind(self) -> bool:
        if self.replayable:
            self._replay = deque(self._seen)
        return self.replayable


def _resending(send: Callable[..., AsyncIterator[Any]],
               failure: Callable[[str], list[Any]]) -> Callable[..., AsyncIterator[Any]]:
    async def send_request_to_replica(self: Any, request_id: str, internal_request_id: str, handle: Any,
                                      proxy_request: Any, app_is_cross_language: bool = False) -> AsyncIterator[Any]:
        replay: ReplayableReceive | None = None
        if proxy_request.request_type == "http" and not app_is_cross_language:
            replay = ReplayableReceive(proxy_request.receive, REPLAY_BODY_LIMIT)
            proxy_request.receive = replay
        resendable = replay is not None or (proxy_request.request_type == "grpc"
                                            and getattr(proxy_request, "has_input_stream", True) is False)
        resendable = resendable and request_id not in _attempts  # a client reusing a request id: no resends
        for resends_left in range(MAX_RESENDS, -1, -1):
            attempt = _Attempt()
            if resendable and resends_left > 0:
                _attempts[request_id] = attempt  # the last attempt is not: its loss is answered as such
            started = dropped = False
            try:
                # Consumed to its end even when dropped: its cleanup (the receive queue under
                # `internal_request_id`) must be done before the next attempt.
                async for message in send(self, request_id, internal_request_id, handle, proxy_request,
                                          app_is_cross_language):
                    if not started and attempt.lost and (replay is None or replay.replayable):
                        dropped = True  # lost before any output: what follows is its error answer
                    if dropped:
                        continue
                    started = True
                    yield message
            finally:
                if _attempts.get(request_id) is attempt:
                    del _attempts[request_id]
            if not dropped:
                return
            if replay is not None and not replay.rewind():  # the client left meanwhile
                break
            logger.warning("request %s: its ingress replica died before answering; sending it again", request_id)
        for message in failure(proxy_request.request_type):
            yield message

    return send_request_to_replica


def install(proxy: Any, failure: Callable[[str], list[Any]]) -> None:
    """Wraps `send_request_to_replica` of Serve's HTTP and gRPC proxies (`proxy` is
    `ray.serve._private.proxy`); `failure(request_type)` gives a lost request's last answer (its
    messages, then its `ResponseStatus`)."""
    classes: list[Any] = [getattr(proxy, name, None) for name in ("HTTPProxy", "gRPCProxy")]
    methods: list[Any] = [getattr(c, "send_request_to_replica", None) for c in classes]
    if not all(callable(m) and _signature_fits(m) for m in methods):
        logger.warning("resending requests of a lost ingress replica not installed: unexpected Serve proxy internals")
        return
    for cls, method in zip(classes, methods, strict=True):
        cls.send_request_to_replica = _resending(method, failure)


def _signature_fits(method: Any) -> bool:
    try:
        return list(inspect.signature(method).parameters) == _PARAMETERS
    except (TypeError, ValueError):
        return False
