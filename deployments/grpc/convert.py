"""Between the protobuf messages of `moe_cluster.proto` and the ingress: requests become the same
validated bodies as the HTTP API (so both front ends refuse the same things), engine outputs
become whole or streamed responses."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from pydantic import ValidationError

from deployments.api.chat_parser import ChatDelta
from deployments.api.openai_chat import ChatJob
from deployments.api.openai_completions import CompletionJob
from deployments.api.openai_protocol import ChatCompletionRequest, CompletionRequest, validation_error
from deployments.api.outputs import Progress
from deployments.errors import BadRequest
from deployments.frontend.engine_client import merged
from deployments.protos import moe_cluster_pb2 as pb

_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "seed", "logprobs")


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


def usage(prompt: int, completion: int) -> pb.Usage:
    return pb.Usage(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)


def _logprobs(lps: tuple) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                            top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top]) for lp in lps]


def _tool_calls(delta: ChatDelta) -> list[pb.ToolCall]:
    return [pb.ToolCall(index=c.index, id=c.id or "", name=c.name or "", arguments=c.arguments)
            for c in delta.tool_calls]


async def generate_whole(job: CompletionJob) -> pb.GenerateResponse:
    parts = [m async for m in generate_deltas(job)]
    last = parts[-1]
    return pb.GenerateResponse(
        id=job.rid, text="".join(m.text for m in parts), token_ids=[t for m in parts for t in m.token_ids],
        prompt_token_ids=parts[0].prompt_token_ids, finish_reason=last.finish_reason, stop_reason=last.stop_reason,
        usage=last.usage, logprobs=[lp for m in parts for lp in m.logprobs])


async def chat_whole(job: ChatJob) -> pb.ChatResponse:
    parts = [m async for m in chat_deltas(job)]
    calls: dict[int, pb.ToolCall] = {}
    for m in parts:
        for c in m.tool_calls:
            call = calls.setdefault(c.index, pb.ToolCall(index=c.index, id=c.id, name=c.name))
            call.arguments += c.arguments
    return pb.ChatResponse(id=job.rid, content="".join(m.content for m in parts),
                           reasoning_content="".join(m.reasoning_content for m in parts),
                           tool_calls=[calls[i] for i in sorted(calls)], finish_reason=parts[-1].finish_reason,
                           usage=parts[-1].usage)


async def generate_deltas(job: CompletionJob) -> AsyncIterator[pb.GenerateResponse]:
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
                message.usage.CopyFrom(usage(p.prompt_tokens, p.tokens))
            yield message
    finally:
        job.cancel()


async def chat_deltas(job: ChatJob) -> AsyncIterator[pb.ChatResponse]:
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
                message.usage.CopyFrom(usage(p.prompt_tokens, p.tokens))
                yield message
            elif delta:
                yield message
    finally:
        job.cancel()
