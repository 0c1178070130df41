"""The ingress's gRPC methods as requests and statuses: `observe_grpc` counts each call's status by
method name (`ray_moe_cluster_grpc_responses_total`: Serve's own gRPC counts take a unary call that
answered with an error code on its context for OK) and tracks each generation call as a request
(`deployments.telemetry.instrumentation.RequestTracker`), with the client's deadline that the proxy
forwarded (`deployments.grpc.proxy_fix`)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from deployments.grpc.proxy_fix import forwarded_deadline
from deployments.telemetry.instrumentation import CLIENT_CLOSED, DEADLINE_SLACK_S, RequestTracker, quiet
from deployments.telemetry.recorders import GrpcMetrics

GENERATION_METHODS = frozenset({"Generate", "GenerateStream", "Chat", "ChatStream"})
CHAT_METHODS = frozenset({"Chat", "ChatStream"})

_GRPC_AS_HTTP = {"OK": 200, "CANCELLED": CLIENT_CLOSED, "DEADLINE_EXCEEDED": 504, "INVALID_ARGUMENT": 400,
                 "NOT_FOUND": 404, "UNAUTHENTICATED": 401, "PERMISSION_DENIED": 403, "RESOURCE_EXHAUSTED": 429,
                 "FAILED_PRECONDITION": 400, "OUT_OF_RANGE": 400, "ALREADY_EXISTS": 409, "ABORTED": 409,
                 "UNIMPLEMENTED": 501, "UNAVAILABLE": 503}


def grpc_code_name(grpc_context: Any, exc: BaseException | None = None) -> str:
    """The status a call ends with: the code set on the (Serve) context, else CANCELLED for a
    cancelled call, UNKNOWN for an exception, OK."""
    code = getattr(grpc_context, "code", None)
    with quiet("grpc code"):
        code = code() if callable(code) else code
    if code is not None and not callable(code):
        return str(getattr(code, "name", code)).upper()
    if isinstance(exc, asyncio.CancelledError | GeneratorExit):
        return "CANCELLED"
    return "UNKNOWN" if exc is not None else "OK"


def _grpc_tracker(self: Any, method: str, grpc_context: Any) -> RequestTracker | None:
    if method not in GENERATION_METHODS:
        return None
    config = self.core.config
    tool_calls_id = None
    if method in CHAT_METHODS:
        with quiet("tool call token"):
            tool_calls_id = self.core.tokenizer.tool_calls_id
    return RequestTracker.begin(config.request_timeout_s, forwarded_deadline(grpc_context), tool_calls_id)


def _grpc_done(method: str, grpc_context: Any, tracker: RequestTracker | None, exc: BaseException | None) -> None:
    code = grpc_code_name(grpc_context, exc)
    if code == "CANCELLED":  # the proxy cancels a call whose deadline passed: say which it was
        deadline = forwarded_deadline(grpc_context)
        if deadline is not None and time.time() >= deadline - DEADLINE_SLACK_S:
            code = "DEADLINE_EXCEEDED"
    if tracker is not None:
        tracker.close(exc, _GRPC_AS_HTTP.get(code, 500))
    with quiet("grpc status"):
        GrpcMetrics().response(method, code)


def observe_grpc(method: Callable[..., Any]) -> Callable[..., Any]:
    """Decorates an ingress gRPC method (unary or server streaming; `self.core` is its
    IngressCore): counts its status by method name and tracks generation calls as requests."""
    name = method.__name__

    if inspect.isasyncgenfunction(method):
        @functools.wraps(method)
        async def streaming(self: Any, request: Any, grpc_context: Any) -> AsyncIterator[Any]:
            tracker = _grpc_tracker(self, name, grpc_context)
            error: BaseException | None = None
            try:
                async with contextlib.aclosing(method(self, request, grpc_context)) as messages:
                    async for message in messages:
                        yield message
            except BaseException as exc:
                error = exc
                raise
            finally:
                _grpc_done(name, grpc_context, tracker, error)

        return streaming

    @functools.wraps(method)
    async def unary(self: Any, request: Any, grpc_context: Any) -> Any:
        tracker = _grpc_tracker(self, name, grpc_context)
        error: BaseException | None = None
        try:
            return await method(self, request, grpc_context)
        except BaseException as exc:
            error = exc
            raise
        finally:
            _grpc_done(name, grpc_context, tracker, error)

    return unary
