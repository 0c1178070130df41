"""The gRPC methods of the ingress, called by Ray Serve's gRPC proxy by RPC name: the
`moe_cluster.v1.MoeCluster` service and the standard `grpc.health.v1.Health` service.

Errors are set on the Serve gRPC context: a unary call returns an empty message with the status;
a streaming call raises after setting it (Serve then keeps the code)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from deployments.api.openai_chat import start_chat
from deployments.api.openai_completions import start_completion
from deployments.errors import APIError, BadRequest, Unauthorized, to_api_error
from deployments.frontend.auth import key_matches
from deployments.frontend.ingress_core import IngressCore
from deployments.grpc.convert import (
    chat_body,
    chat_deltas,
    chat_whole,
    completion_body,
    generate_deltas,
    generate_whole,
    unary,
)
from deployments.grpc.observe import observe_grpc
from deployments.grpc.registration import Undecodable
from deployments.protos import moe_cluster_pb2 as pb

SERVICE_NAME = "moe_cluster.v1.MoeCluster"
HEALTH_WATCH_PERIOD_S = 1.0


def _fail(ctx: Any, error: APIError) -> None:
    ctx.set_code(error.grpc_code)
    named = error.param is None or error.message.startswith(error.param)
    ctx.set_details(error.message if named else f"{error.param}: {error.message}")


def _undecodable(request: Undecodable) -> BadRequest:
    return BadRequest(f"the request is no {request.message_type} message: {request.reason}", "request")


class GrpcMethods:
    """Mixed into the ingress deployment; `self.core` is its IngressCore."""

    core: IngressCore

    # -- guards ------------------------------------------------------------------------------

    def _admit(self, request: Any, ctx: Any, count: bool) -> Any:
        config = self.core.config
        if not key_matches(dict(ctx.invocation_metadata()).get("authorization"), config.api_keys):
            raise Unauthorized("missing or invalid API key (metadata authorization: Bearer <key>)")
        if isinstance(request, Undecodable):  # bytes the proxy could not decode (deployments.grpc.registration)
            raise _undecodable(request)
        size = request.ByteSize()
        if size > config.grpc_max_message_bytes:
            raise BadRequest(f"request is {size} bytes; the limit is {config.grpc_max_message_bytes} "
                             "(grpc_max_message_bytes)", "request")
        return self.core.admission.enter() if count else None

    async def _unary(self, request: Any, ctx: Any, run: Callable[[], Any], empty: Any, count: bool = True) -> Any:
        ticket = None
        try:
            ticket = self._admit(request, ctx, count)
            return await run()
        except Exception as exc:  # noqa: BLE001 - every failure is a status, never a crash
            _fail(ctx, to_api_error(exc))
            return empty
        finally:
            if ticket is not None:
                ticket.release()

    async def _stream(self, request: Any, ctx: Any, run: Callable[[], AsyncGenerator[Any, None]]
                      ) -> AsyncIterator[Any]:
        ticket = None
        try:
            ticket = self._admit(request, ctx, True)
            async with aclosing(run()) as messages:  # closed at once when the client goes
                async for message in messages:
                    yield message
        except Exception as exc:
            error = to_api_error(exc)
            _fail(ctx, error)
            raise error from None
        finally:
            if ticket is not None:
                ticket.release()

    # -- MoeCluster --------------------------------------------------------------------------

    @observe_grpc  # status counts; generation calls tracked (deployments.grpc.observe)
    async def Generate(self, request: pb.GenerateRequest, grpc_context: Any) -> pb.GenerateResponse:  # noqa: N802
        async def run() -> pb.GenerateResponse:
            job = await start_completion(self.core, unary(completion_body(request)))
            return await generate_whole(job)
        return await self._unary(request, grpc_context, run, pb.GenerateResponse())

    @observe_grpc
    async def GenerateStream(self, request: pb.GenerateRequest, grpc_context: Any  # noqa: N802
                             ) -> AsyncIterator[pb.GenerateResponse]:
        async def run() -> AsyncGenerator[pb.GenerateResponse, None]:
            job = await start_completion(self.core, completion_body(request))
            async for message in generate_deltas(job):
                yield message
        async for message in self._stream(request, grpc_context, run):
            yield message

    @observe_grpc
    async def Chat(self, request: pb.ChatRequest, grpc_context: Any) -> pb.ChatResponse:  # noqa: N802
        async def run() -> pb.ChatResponse:
            job = await start_chat(self.core, unary(chat_body(request)))
            return await chat_whole(job)
        return await self._unary(request, grpc_context, run, pb.ChatResponse())

    @observe_grpc
    async def ChatStream(self, request: pb.ChatRequest, grpc_context: Any  # noqa: N802
                         ) -> AsyncIterator[pb.ChatResponse]:
        async def run() -> AsyncGenerator[pb.ChatResponse, None]:
            job = await start_chat(self.core, chat_body(request))
            async for message in chat_deltas(job):
                yield message
        async for message in self._stream(request, grpc_context, run):
            yield message

    @observe_grpc
    async def ListModels(self, request: pb.ListModelsRequest, grpc_context: Any  # noqa: N802
                         ) -> pb.ListModelsResponse:
        async def run() -> pb.ListModelsResponse:
            info = await self.core.info()
            return pb.ListModelsResponse(models=[pb.Model(id=info.name, max_model_len=info.max_model_len,
                                                          owned_by="moe-cluster")])
        return await self._unary(request, grpc_context, run, pb.ListModelsResponse(), count=False)

    # -- grpc.health.v1.Health (no key needed, like HTTP /health and /ready) -------------------

    async def _health(self, service: str) -> int | None:
        if service not in ("", SERVICE_NAME):
            return None
        serving = await self.core.ready()
        return health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING

    @observe_grpc
    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context: Any  # noqa: N802
                    ) -> health_pb2.HealthCheckResponse:
        if isinstance(request, Undecodable):
            _fail(grpc_context, _undecodable(request))
            return health_pb2.HealthCheckResponse()
        status = await self._health(request.service)
        if status is None:
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown service {request.service!r}")
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=status)

    @observe_grpc
    async def List(self, request: health_pb2.HealthListRequest, grpc_context: Any  # noqa: N802
                   ) -> health_pb2.HealthListResponse:
        if isinstance(request, Undecodable):
            _fail(grpc_context, _undecodable(request))
            return health_pb2.HealthListResponse()
        status = await self._health("")
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=status) for name in ("", SERVICE_NAME)})

    @observe_grpc
    async def Watch(self, request: health_pb2.HealthCheckRequest, grpc_context: Any  # noqa: N802
                    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        if isinstance(request, Undecodable):
            error = _undecodable(request)
            _fail(grpc_context, error)
            raise error
        last = None
        while True:
            status = await self._health(request.service)
            if status is None:
                status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(HEALTH_WATCH_PERIOD_S)
