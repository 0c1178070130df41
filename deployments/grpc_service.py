"""The gRPC methods of the ingress, called by Ray Serve's gRPC proxy by RPC name: the
`moe_cluster.v1.MoeCluster` service and the standard `grpc.health.v1.Health` service.

Requests are turned into the same validated bodies as the HTTP API, so both front ends refuse the
same things. Errors are set on the Serve gRPC context: a unary call returns an empty message with
the status; a streaming call raises after setting it (Serve then keeps the code)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing
from typing import Any

import grpc
from grpc_health.v1 import health_pb2
from pydantic import ValidationError

from deployments.api_errors import APIError, BadRequest, Unauthorized, to_api_error
from deployments.auth import key_matches
from deployments.chat import ChatDelta
from deployments.engine_client import merged
from deployments.openai_api import ChatCompletionRequest, CompletionRequest, validation_error
from deployments.openai_chat import ChatJob, start_chat
from deployments.openai_completions import CompletionJob, start_completion
from deployments.outputs import Progress
from deployments.protos import moe_cluster_pb2 as pb
from deployments.service import IngressCore

SERVICE_NAME = "moe_cluster.v1.MoeCluster"
HEALTH_WATCH_PERIOD_S = 1.0
_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "seed", "logprobs")


def _fail(ctx: Any, error: APIError) -> None:
    ctx.set_code(error.grpc_code)
    named = error.param is None or error.message.startswith(error.param)
    ctx.set_details(error.message if named else f"{error.param}: {error.message}")


def _sampling(s: pb.SamplingOptions) -> dict[str, Any]:
    out: dict[str, Any] = {k: getattr(s, k) for k in _SAMPLING if s.HasField(k)}
    out.update(stop=list(s.stop), stop_token_ids=list(s.stop_token_ids), ignore_eos=s.ignore_eos)
    return out


def completion_body(req: pb.GenerateRequest) -> CompletionRequest:
    kind = req.WhichOneof("prompt")
    if kind is None:
        raise BadRequest("prompt is required: set text or token_ids", "prompt")
    prompt = req.text if kind == "text" else list(req.token_ids.ids)
    return _validate(CompletionRequest, {"model": req.model, "prompt": prompt, **_sampling(req.sampling)})


def chat_body(req: pb.ChatRequest) -> ChatCompletionRequest:
    messages = []
    for m in req.messages:
        msg: dict[str, Any] = {"role": m.role, "content": m.content or (None if m.tool_calls else "")}
        if m.tool_calls:
            msg["tool_calls"] = [{"id": c.id, "type": "function",
                                  "function": {"name": c.name, "arguments": c.arguments}} for c in m.tool_calls]
        if m.tool_call_id:
            msg["tool_call_id"] = m.tool_call_id
        if m.name:
            msg["name"] = m.name
        messages.append(msg)
    tools = []
    for i, t in enumerate(req.tools):
        try:
            parameters = json.loads(t.parameters_json) if t.parameters_json else {"type": "object", "properties": {}}
        except ValueError as exc:
            raise BadRequest(f"tools[{i}].parameters_json is not valid JSON: {exc}", f"tools[{i}]") from None
        tools.append({"type": "function", "function": {"name": t.name, "description": t.description,
                                                       "parameters": parameters}})
    data: dict[str, Any] = {"model": req.model, "messages": messages, "tools": tools or None,
                            **_sampling(req.sampling)}
    if data.pop("logprobs", None) is not None:
        data.update(logprobs=True, top_logprobs=req.sampling.logprobs)
    if req.tool_choice:
        named = req.tool_choice not in ("auto", "none", "required")
        data["tool_choice"] = {"type": "function", "function": {"name": req.tool_choice}} if named else req.tool_choice
    if req.reasoning_effort:
        data["reasoning_effort"] = req.reasoning_effort
    return _validate(ChatCompletionRequest, data)


def _validate(model: type, data: dict[str, Any]) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def _usage(prompt: int, completion: int) -> pb.Usage:
    return pb.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _logprobs(lps: tuple) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                            top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top]) for lp in lps]


def _tool_calls(delta: ChatDelta) -> list[pb.ToolCall]:
    return [pb.ToolCall(index=c.index, id=c.id or "", name=c.name or "", arguments=c.arguments)
            for c in delta.tool_calls]


class GrpcMethods:
    """Mixed into the ingress deployment; `self.core` is its IngressCore."""

    core: IngressCore

    # -- guards ------------------------------------------------------------------------------

    def _admit(self, request: Any, ctx: Any, count: bool) -> Any:
        config = self.core.config
        if not key_matches(dict(ctx.invocation_metadata()).get("authorization"), config.api_keys):
            raise Unauthorized("missing or invalid API key (metadata authorization: Bearer <key>)")
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

    async def _stream(self, request: Any, ctx: Any, run: Callable[[], AsyncIterator[Any]]) -> AsyncIterator[Any]:
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

    async def Generate(self, request: pb.GenerateRequest, grpc_context: Any) -> pb.GenerateResponse:  # noqa: N802
        async def run() -> pb.GenerateResponse:
            job = await start_completion(self.core, completion_body(request))
            return await _generate_whole(job)
        return await self._unary(request, grpc_context, run, pb.GenerateResponse())

    async def GenerateStream(self, request: pb.GenerateRequest, grpc_context: Any  # noqa: N802
                             ) -> AsyncIterator[pb.GenerateResponse]:
        async def run() -> AsyncIterator[pb.GenerateResponse]:
            job = await start_completion(self.core, completion_body(request))
            async for message in _generate_deltas(job):
                yield message
        async for message in self._stream(request, grpc_context, run):
            yield message

    async def Chat(self, request: pb.ChatRequest, grpc_context: Any) -> pb.ChatResponse:  # noqa: N802
        async def run() -> pb.ChatResponse:
            job = await start_chat(self.core, chat_body(request))
            parts = [m async for m in _chat_deltas(job)]
            calls: dict[int, pb.ToolCall] = {}
            for m in parts:
                for c in m.tool_calls:
                    call = calls.setdefault(c.index, pb.ToolCall(index=c.index, id=c.id, name=c.name))
                    call.arguments += c.arguments
            return pb.ChatResponse(id=job.rid, content="".join(m.content for m in parts),
                                   reasoning_content="".join(m.reasoning_content for m in parts),
                                   tool_calls=[calls[i] for i in sorted(calls)], finish_reason=parts[-1].finish_reason,
                                   usage=parts[-1].usage)
        return await self._unary(request, grpc_context, run, pb.ChatResponse())

    async def ChatStream(self, request: pb.ChatRequest, grpc_context: Any  # noqa: N802
                         ) -> AsyncIterator[pb.ChatResponse]:
        async def run() -> AsyncIterator[pb.ChatResponse]:
            job = await start_chat(self.core, chat_body(request))
            async for message in _chat_deltas(job):
                yield message
        async for message in self._stream(request, grpc_context, run):
            yield message

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

    async def Check(self, request: health_pb2.HealthCheckRequest, grpc_context: Any  # noqa: N802
                    ) -> health_pb2.HealthCheckResponse:
        status = await self._health(request.service)
        if status is None:
            grpc_context.set_code(grpc.StatusCode.NOT_FOUND)
            grpc_context.set_details(f"unknown service {request.service!r}")
            return health_pb2.HealthCheckResponse()
        return health_pb2.HealthCheckResponse(status=status)

    async def List(self, request: health_pb2.HealthListRequest, grpc_context: Any  # noqa: N802
                   ) -> health_pb2.HealthListResponse:
        status = await self._health("")
        return health_pb2.HealthListResponse(statuses={
            name: health_pb2.HealthCheckResponse(status=status) for name in ("", SERVICE_NAME)})

    async def Watch(self, request: health_pb2.HealthCheckRequest, grpc_context: Any  # noqa: N802
                    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        last = None
        while True:
            status = await self._health(request.service)
            if status is None:
                status = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
            if status != last:
                yield health_pb2.HealthCheckResponse(status=status)
                last = status
            await asyncio.sleep(HEALTH_WATCH_PERIOD_S)


async def _generate_whole(job: CompletionJob) -> pb.GenerateResponse:
    parts = [m async for m in _generate_deltas(job)]
    last = parts[-1]
    return pb.GenerateResponse(
        id=job.rid, text="".join(m.text for m in parts), token_ids=[t for m in parts for t in m.token_ids],
        prompt_token_ids=parts[0].prompt_token_ids, finish_reason=last.finish_reason, stop_reason=last.stop_reason,
        usage=last.usage, logprobs=[lp for m in parts for lp in m.logprobs])


async def _generate_deltas(job: CompletionJob) -> AsyncIterator[pb.GenerateResponse]:
    p = Progress()
    try:
        async for _, out in merged(job.streams):
            first = p.tokens == 0
            text, ids, lps = p.step(out)
            message = pb.GenerateResponse(id=job.rid, text=text, token_ids=ids, logprobs=_logprobs(lps))
            if first:
                message.prompt_token_ids.extend(out.prompt_token_ids)
            if out.finished:
                message.finish_reason = out.finish_reason or ""
                message.stop_reason = "" if out.stop_reason is None else str(out.stop_reason)
                message.usage.CopyFrom(_usage(p.prompt_tokens, p.tokens))
            yield message
    finally:
        job.cancel()


async def _chat_deltas(job: ChatJob) -> AsyncIterator[pb.ChatResponse]:
    parser, p = job.parsers[0], Progress()
    try:
        async for _, out in merged(job.streams):
            delta = parser.feed(out.token_ids, len(out.text))
            if out.finished:
                end = parser.finish(len(out.text))
                delta = ChatDelta(delta.reasoning + end.reasoning, delta.content + end.content,
                                  delta.tool_calls + end.tool_calls)
            p.step(out)
            message = pb.ChatResponse(id=job.rid, content=delta.content, reasoning_content=delta.reasoning,
                                      tool_calls=_tool_calls(delta))
            if out.finished:
                message.finish_reason = parser.finish_reason(out.finish_reason) or ""
                message.usage.CopyFrom(_usage(p.prompt_tokens, p.tokens))
                yield message
            elif delta:
                yield message
    finally:
        job.cancel()
