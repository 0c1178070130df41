"""Between the protobuf messages of `moe_cluster.proto` and the ingress: requests become the same
validated bodies as the HTTP API (so both front ends refuse the same things), engine outputs
become whole or streamed responses."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from deployments.api.chat_parser import ChatDelta
from deployments.api.openai_chat import ChatJob
from deployments.api.openai_completions import CompletionJob
from deployments.api.openai_protocol import ChatCompletionRequest, CompletionRequest, validation_error
from deployments.api.outputs import usage
from deployments.errors import BadRequest
from deployments.frontend.engine_client import merged
from deployments.protos import moe_cluster_pb2 as pb

Body = TypeVar("Body", bound=BaseModel)
_SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "seed", "logprobs", "presence_penalty",
             "frequency_penalty", "repetition_penalty", "min_p", "min_tokens", "n")


def _sampling(s: pb.SamplingOptions) -> dict[str, Any]:
    out: dict[str, Any] = {k: getattr(s, k) for k in _SAMPLING if s.HasField(k)}
    out.update(stop=list(s.stop), stop_token_ids=list(s.stop_token_ids), ignore_eos=s.ignore_eos,
               include_stop_str_in_output=s.include_stop_str_in_output)
    if s.logit_bias:
        out["logit_bias"] = {str(k): v for k, v in s.logit_bias.items()}  # JSON's shape: ids as strings
    return out


def unary(body: Body) -> Body:
    """A unary method's body: one answer, so one choice (n > 1 streams, each message tagged with its
    choice's index)."""
    if getattr(body, "n", 1) > 1:
        raise BadRequest("n > 1 needs the streaming method (GenerateStream, ChatStream): each message there "
                         "carries its choice's index", "n")
    return body


def completion_body(req: pb.GenerateRequest) -> CompletionRequest:
    kind = req.WhichOneof("prompt")
    if kind is None:
        raise BadRequest("prompt is required: set text or token_ids", "prompt")
    prompt = req.text if kind == "text" else list(req.token_ids.ids)
    return _validate(CompletionRequest, {"model": req.model, "prompt": prompt, **_sampling(req.sampling),
                                         "cache_salt": req.cache_salt or None,
                                         "response_format": _response_format(req)})


def _response_format(req: pb.GenerateRequest | pb.ChatRequest) -> dict[str, Any] | None:
    """The HTTP API's `response_format` (None when unset)."""
    if not req.HasField("response_format"):
        return None
    rf = req.response_format
    out: dict[str, Any] = {"type": rf.type or "text"}
    if rf.HasField("json_schema"):
        js = rf.json_schema
        try:
            schema = json.loads(js.schema_json) if js.schema_json else None
        except ValueError as exc:
            raise BadRequest(f"response_format.json_schema.schema_json is not valid JSON: {exc}",
                             "response_format.json_schema.schema_json") from None
        out["json_schema"] = {"name": js.name, "schema": schema, "strict": js.strict,
                              **({"description": js.description} if js.description else {})}
    return out


def _content(m: pb.ChatMessage, i: int) -> str | list[dict[str, Any]] | None:
    """A message's content: its string, or its parts as the HTTP API's content parts (images as
    `image` parts of base64 bytes or `image_url` parts, checked as HTTP images are)."""
    if not m.parts:
        return m.content or (None if m.tool_calls else "")
    if m.content:
        raise BadRequest(f"messages[{i}]: give content or parts, not both", f"messages[{i}].content")
    parts: list[dict[str, Any]] = []
    for j, part in enumerate(m.parts):
        kind = part.WhichOneof("part")
        if kind == "text":
            parts.append({"type": "text", "text": part.text})
        elif kind == "image" and part.image.WhichOneof("source") == "data":
            parts.append({"type": "image", "image": base64.b64encode(part.image.data).decode("ascii")})
        elif kind == "image" and part.image.WhichOneof("source") == "url":
            parts.append({"type": "image_url", "image_url": {"url": part.image.url}})
        else:
            raise BadRequest(f"messages[{i}].parts[{j}] is empty: set text or an image's data or url",
                             f"messages[{i}].parts[{j}]")
    return parts


def chat_body(req: pb.ChatRequest) -> ChatCompletionRequest:
    messages: list[dict[str, Any]] = []
    for m in req.messages:
        msg: dict[str, Any] = {"role": m.role, "content": _content(m, len(messages))}
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
                            **_sampling(req.sampling), "cache_salt": req.cache_salt or None}
    if data.pop("logprobs", None) is not None:
        data.update(logprobs=True, top_logprobs=req.sampling.logprobs)
    if req.tool_choice:
        named = req.tool_choice not in ("auto", "none", "required")
        data["tool_choice"] = {"type": "function", "function": {"name": req.tool_choice}} if named else req.tool_choice
    if req.reasoning_effort:
        data["reasoning_effort"] = req.reasoning_effort
    if req.HasField("parallel_tool_calls"):
        data["parallel_tool_calls"] = req.parallel_tool_calls
    if req.HasField("response_format"):
        data["response_format"] = _response_format(req)
    return _validate(ChatCompletionRequest, data)


def _validate(model: type[Body], data: dict[str, Any]) -> Body:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def _logprobs(lps: tuple) -> list[pb.TokenLogprob]:
    return [pb.TokenLogprob(token_id=lp.token_id, logprob=lp.logprob,
                            top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top]) for lp in lps]


def _tool_calls(delta: ChatDelta) -> list[pb.ToolCall]:
    return [pb.ToolCall(index=c.index, id=c.id or "", name=c.name or "", arguments=c.arguments)
            for c in delta.tool_calls]


async def generate_whole(job: CompletionJob) -> pb.GenerateResponse:
    last = pb.GenerateResponse()
    async for last in generate_deltas(job):  # noqa: B007 - the finishing message has the reasons and usage
        pass
    out = job.streams[0].result()
    return pb.GenerateResponse(
        id=job.rid, text=out.text, token_ids=out.token_ids, prompt_token_ids=out.prompt_token_ids or (),
        finish_reason=last.finish_reason, stop_reason=last.stop_reason, usage=last.usage,
        logprobs=_logprobs(out.logprobs or ()))


async def chat_whole(job: ChatJob) -> pb.ChatResponse:
    last = pb.ChatResponse()
    async for last in chat_deltas(job):  # noqa: B007 - the finishing message has the reason and usage
        pass
    parser = job.parsers[0]  # it holds the whole answer
    return pb.ChatResponse(id=job.rid, content=parser.content, reasoning_content=parser.reasoning,
                           tool_calls=[pb.ToolCall(index=c.index, id=c.id, name=c.name, arguments=c.arguments)
                                       for c in parser.calls], finish_reason=last.finish_reason, usage=last.usage)


def _usage(job: CompletionJob | ChatJob) -> pb.Usage:
    """Once every choice finished."""
    counts = usage(job.prompt_tokens(), job.completion_tokens(), job.cached_tokens())
    return pb.Usage(prompt_tokens=counts["prompt_tokens"], completion_tokens=counts["completion_tokens"],
                    total_tokens=counts["total_tokens"],
                    cached_tokens=counts["prompt_tokens_details"]["cached_tokens"])


async def generate_deltas(job: CompletionJob) -> AsyncIterator[pb.GenerateResponse]:
    running = len(job.streams)
    try:
        async for i, out in merged(job.streams):  # text deltas
            message = pb.GenerateResponse(id=job.rid, text=out.text, token_ids=out.token_ids,
                                          logprobs=_logprobs(out.logprobs or ()), index=i)
            if out.prompt_token_ids is not None:  # the first delta
                message.prompt_token_ids.extend(out.prompt_token_ids)
            if out.finished:
                running -= 1
                message.finish_reason = out.finish_reason or ""
                message.stop_reason = "" if out.stop_reason is None else str(out.stop_reason)
                if not running:
                    message.usage.CopyFrom(_usage(job))
            yield message
    finally:
        job.cancel()


async def chat_deltas(job: ChatJob) -> AsyncIterator[pb.ChatResponse]:
    running = len(job.streams)
    try:
        async for i, out in merged(job.streams):  # text deltas
            parser = job.parsers[i]
            delta = parser.feed(out.token_ids, len(out.text), out.finished)
            message = pb.ChatResponse(id=job.rid, content=delta.content, reasoning_content=delta.reasoning,
                                      tool_calls=_tool_calls(delta), index=i)
            if out.finished:
                running -= 1
                message.finish_reason = parser.finish_reason(out.finish_reason) or ""
                if not running:
                    message.usage.CopyFrom(_usage(job))
                yield message
            elif delta:
                yield message
    finally:
        job.cancel()
