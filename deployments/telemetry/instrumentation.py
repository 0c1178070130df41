"""Where the ingress records the series of `deployments.telemetry.metrics` for each request, kept
out of the request code so that each hook there is one line:

- Per request: `RequestTracker` (time to first token, inter-token latency, finish reason or abort
  cause). The HTTP middleware and the gRPC method wrapper start one per call and close it when
  the call ends; `EngineClient.open` hands every engine stream it opens to the current tracker
  (`observe_stream`, through a context variable), so the request code itself carries nothing.
- gRPC calls are tracked by `deployments.grpc.observe.observe_grpc`, which also counts their status.
  HTTP status counts and end-to-end latency per route are Ray Serve's own
  (`ray_serve_num_http_requests_total`, `ray_serve_http_request_latency_ms`).
- Engine replicas: `deployments.telemetry.engine_instrumentation`. Images: the ImagePipeline
  and the VisionEncoder deployment record through `VisionMetrics`.

Metrics never fail a request: every recording here swallows its own errors (logged at debug).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from deployments.telemetry.metrics import MetricSet
from deployments.telemetry.recorders import RequestMetrics

logger = logging.getLogger("ray.serve")

CLIENT_CLOSED = 499  # the HTTP code recorded when the client went away before a response started
CHAT_PATH = "/chat/completions"
DEADLINE_SLACK_S = 0.05


@contextlib.contextmanager
def quiet(what: str) -> Iterator[None]:
    try:
        yield
    except Exception:  # noqa: BLE001 - metrics never fail a request
        logger.debug("metrics: %s failed", what, exc_info=True)


# ---------------------------------------------------------------------------------------------
# Requests
# ---------------------------------------------------------------------------------------------

_current: contextvars.ContextVar[RequestTracker | None] = contextvars.ContextVar("moe_cluster_request",
                                                                                  default=None)


class RequestTracker:
    """One API request's latencies and outcome, fed by the engine streams it opens.

    `begin()` makes it the current request of the calling task; every engine stream opened in it
    goes through `observe_stream`, which reports each output (tokens as they arrive at the ingress;
    the request's first token is its time to first token). The request completes when every stream
    has finished (reason: the engine's, or `tool_calls` for a chat answer that called a tool). The
    front end calls `close(exc, status)` once the call is over: a request that did not complete is
    then counted as aborted, by cause: `deadline` (its deadline passed, or the call ended with a
    timeout), `client` (cancelled, or the response ended early without an error), `error` (a server
    error, or an error sent in-band in a stream). A request refused before it reached the engine
    (4xx, 429, no stream opened) is not counted here; Serve's status counters have it."""

    def __init__(self, deadline_at: float | None = None, tool_calls_id: int | None = None,
                 metrics: MetricSet | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.request = RequestMetrics(metrics, clock=clock)
        self._clock = clock
        self.deadline_at = deadline_at  # on `clock`
        self.tool_calls_id = tool_calls_id
        self._tokens: list[int] = []  # per stream
        self._called: set[int] = set()  # streams whose answer has the tool-calls token
        self._open = 0
        self._reasons: list[str] = []
        self._completed = False  # every stream finished
        self._error = False
        self._lock = threading.Lock()
        self.closed = False

    @classmethod
    def begin(cls, deadline_s: float | None = None, deadline_unix: float | None = None,
              tool_calls_id: int | None = None, metrics: MetricSet | None = None) -> RequestTracker:
        """A tracker for the calling task's request. The deadline is the tighter of a timeout
        (`deadline_s` from now) and an absolute Unix time."""
        now = time.monotonic()
        deadlines = [now + deadline_s] if deadline_s else []
        if deadline_unix is not None:
            deadlines.append(now + (deadline_unix - time.time()))
        tracker = cls(min(deadlines) if deadlines else None, tool_calls_id, metrics)
        _current.set(tracker)
        return tracker

    def wrap(self, generator: Any) -> Any:
        with self._lock:
            index = len(self._tokens)
            self._tokens.append(0)
            self._open += 1
        return _ObservedStream(generator, self, index)

    def output(self, index: int, out: Any) -> None:
        with quiet("request output"), self._lock:
            if self.request.finished is not None:
                return
            new = len(out.token_ids)  # a delta: the tokens new in this output
            if out.prompt_token_ids is not None and getattr(out, "num_cached_tokens", None) is not None:
                self.request.on_cached_tokens(out.num_cached_tokens)  # the first delta
            self._tokens[index] += new
            if new > 0:
                self.request.on_token(new)
            if self.tool_calls_id is not None and self.tool_calls_id in out.token_ids:
                self._called.add(index)
            if out.finished:
                self._open -= 1
                reason = out.finish_reason or "stop"
                if reason == "stop" and index in self._called:
                    reason = "tool_calls"
                self._reasons.append(reason)
                self._completed = self._open == 0

    def failed(self) -> None:
        self._error = True

    def close(self, exc: BaseException | None = None, status: int | None = None) -> str | None:
        """The call is over (`exc`: what it raised; `status`: its HTTP status, or the HTTP
        equivalent of its gRPC code). Records the outcome once; returns it."""
        with quiet("request close"), self._lock:
            if self.closed:
                return self.request.finished
            self.closed = True
            if self.request.finished is not None or not self._tokens:
                return self.request.finished
            if self._completed:
                reason = "tool_calls" if "tool_calls" in self._reasons else self._reasons[-1]
                self.request.on_finish(reason)
            else:
                cause = self._cause(exc, status)
                if cause is not None:
                    self.request.on_finish(cause)
        return self.request.finished

    def _cause(self, exc: BaseException | None, status: int | None) -> str | None:
        from deployments.errors import APIError, DeadlineExceeded, unwrap

        exc = unwrap(exc) if exc is not None else None
        cancelled = isinstance(exc, asyncio.CancelledError | GeneratorExit) or status == CLIENT_CLOSED
        past_deadline = self.deadline_at is not None and self._clock() >= self.deadline_at - DEADLINE_SLACK_S
        if isinstance(exc, DeadlineExceeded | TimeoutError) or status in (408, 504):
            return "deadline"
        if cancelled:
            return "deadline" if past_deadline else "client"
        if isinstance(exc, APIError):
            status = exc.status
        elif exc is not None:
            return "error"
        if status is not None and 400 <= status < 500:
            return None  # refused (bad input, overload): not a request that ran
        if self._error or (status is not None and status >= 500):
            return "error"
        return "deadline" if past_deadline else "client"


class _ObservedStream:
    """An engine stream (Serve's DeploymentResponseGenerator) whose outputs and errors reach a
    tracker; everything else is delegated."""

    def __init__(self, inner: Any, tracker: RequestTracker, index: int) -> None:
        self._inner, self._tracker, self._index = inner, tracker, index

    def __aiter__(self) -> _ObservedStream:
        return self

    async def __anext__(self) -> Any:
        try:
            out = await self._inner.__anext__()
        except (StopAsyncIteration, asyncio.CancelledError, GeneratorExit):
            raise
        except Exception:
            self._tracker.failed()
            raise
        self._tracker.output(self._index, out)
        return out

    def cancel(self) -> None:
        self._inner.cancel()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def observe_stream(generator: Any) -> Any:
    """An engine stream opened for the current request, observed by its tracker (as is, outside
    a tracked request)."""
    tracker = _current.get()
    return generator if tracker is None or tracker.closed else tracker.wrap(generator)


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------

class HttpMetricsMiddleware:
    """Outermost ASGI middleware of the ingress app: tracks each request that reaches the engine
    (`RequestTracker`; chat completions count tool calls) and closes it with the response's
    status (`CLIENT_CLOSED` when the client left before one started, 500 when the app raised).
    `get_tool_calls_id()` gives the tokenizer's `[TOOL_CALLS]` id (None: not counted apart)."""

    def __init__(self, app: Any, deadline_s: float | None = None,
                 get_tool_calls_id: Callable[[], int | None] | None = None, metrics: MetricSet | None = None) -> None:
        self.app = app
        self.deadline_s = deadline_s
        self.get_tool_calls_id = get_tool_calls_id
        self.metrics = metrics

    def _tool_calls_id(self) -> int | None:
        with quiet("tool call token"):
            return self.get_tool_calls_id() if self.get_tool_calls_id else None
        return None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chat = str(scope.get("path", "")).endswith(CHAT_PATH)
        tracker = RequestTracker.begin(self.deadline_s, tool_calls_id=self._tool_calls_id() if chat else None,
                                       metrics=self.metrics)
        status: int | None = None

        async def send_observed(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        error: BaseException | None = None
        try:
            await self.app(scope, receive, send_observed)
        except BaseException as exc:
            error = exc
            raise
        finally:
            if status is None:
                status = CLIENT_CLOSED if isinstance(error, asyncio.CancelledError) else 500
            tracker.close(error, status)
