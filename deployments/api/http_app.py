"""The FastAPI app of the ingress: OpenAI-compatible routes, health and readiness, engine stats;
errors in the OpenAI shape, bad input always a 4xx (FastAPI's 422 becomes 400)."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.api.http_guards import GuardMiddleware
from deployments.api.openai_chat import start_chat
from deployments.api.openai_completions import Job, start_completion
from deployments.api.openai_protocol import ChatCompletionRequest, CompletionRequest, parse_body
from deployments.api.openapi_bodies import DeclaredBodies
from deployments.api.tokenize import DetokenizeRequest, TokenizeRequest, detokenize, tokenize
from deployments.config import AppConfig
from deployments.errors import APIError, BadRequest, to_api_error
from deployments.frontend.ingress_core import IngressCore
from deployments.telemetry.instrumentation import HttpMetricsMiddleware

logger = logging.getLogger("ray.serve")


class ManagedStream(StreamingResponse):
    """An SSE response whose `on_close` runs however it ends: finished, client gone, or never
    started (a body iterator that never ran has no finally of its own to run)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def error_response(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers())


def create_http_app(get_core: Callable[[], IngressCore], config: AppConfig) -> FastAPI:
    app = FastAPI(title="moe-cluster", description="OpenAI-compatible API for Mistral Small 4 (MoE)")
    bodies = DeclaredBodies()  # the request models in /openapi.json (the routes parse their bodies themselves)
    app.add_middleware(GuardMiddleware, api_keys=config.api_keys, max_body_bytes=config.max_body_bytes)
    app.add_middleware(HttpMetricsMiddleware, deadline_s=config.request_timeout_s,  # outermost: sees every status
                       get_tool_calls_id=lambda: get_core().tokenizer.tool_calls_id)

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in first["loc"] if p not in ("body", "query", "path")) or None
        return error_response(BadRequest(f"{param or 'request'}: {first['msg']}", param))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        error = APIError(str(exc.detail))
        error.status, error.error_type = exc.status_code, "invalid_request_error"
        return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception) -> JSONResponse:
        return error_response(to_api_error(exc))

    @app.get("/health")
    async def health() -> dict[str, str]:
        """Liveness: this ingress replica answers."""
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        """Readiness: an engine server has loaded the model and its engine loop runs."""
        if await get_core().ready():
            return JSONResponse({"status": "ready"})
        return JSONResponse({"status": "loading"}, status_code=503,
                            headers={"Retry-After": str(config.retry_after_s)})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        info = await get_core().info()
        return {"object": "list", "data": [{"id": info.name, "object": "model", "created": int(time.time()),
                                            "owned_by": "moe-cluster", "max_model_len": info.max_model_len}]}

    @app.post("/v1/completions", openapi_extra=bodies.of(CompletionRequest))
    async def completions(request: Request) -> Response:
        body = parse_body(CompletionRequest, await request.body())
        return await _run(get_core(), lambda core: start_completion(core, body), body.stream)

    @app.post("/v1/chat/completions", openapi_extra=bodies.of(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        body = parse_body(ChatCompletionRequest, await request.body())
        return await _run(get_core(), lambda core: start_chat(core, body), body.stream)

    @app.post("/tokenize", openapi_extra=bodies.of(TokenizeRequest))
    async def tokenize_route(request: Request) -> dict[str, Any]:
        """vLLM's: a completion prompt or chat messages as the token ids generation would run."""
        return await tokenize(get_core(), parse_body(TokenizeRequest, await request.body()))

    @app.post("/detokenize", openapi_extra=bodies.of(DetokenizeRequest))
    async def detokenize_route(request: Request) -> dict[str, str]:
        """vLLM's: token ids as text (special tokens left out)."""
        return await detokenize(get_core(), parse_body(DetokenizeRequest, await request.body()))

    @app.get("/v1/engine/stats")
    async def engine_stats() -> dict[str, Any]:
        """One engine replica's stats (its latest published snapshot), and this ingress replica's admission
        count."""
        core = get_core()
        stats = await core.engine.stats(10.0)
        return {**dataclasses.asdict(stats), "kv_usage": stats.kv_usage,
                "ingress_in_flight": core.admission.in_flight}

    bodies.install(app)
    return app


async def _run(core: IngressCore, start: Callable[[IngressCore], Awaitable[Job]], stream: bool) -> Response:
    ticket = core.admission.enter()
    job: Job | None = None
    handed_off = False
    try:
        job = started = await start(core)
        if stream:
            def on_close() -> None:
                started.cancel()
                ticket.release()

            response = ManagedStream(job.events(), on_close=on_close)
            handed_off = True
            return response
        return JSONResponse(await job.collect())
    finally:
        if not handed_off:
            if job is not None:
                job.cancel()
            ticket.release()
