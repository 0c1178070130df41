"""Structured output through Serve, over HTTP and gRPC, with random weights (the tiny checkpoint)
and scripted ones (think, tool): every answer under a schema ends with "stop", parses and
validates; reasoning comes first and the schema holds after [/THINK]; forced tool calls follow
their tool's schema; a schema the grammar library cannot take is a 400 / INVALID_ARGUMENT naming
the part."""

from __future__ import annotations

import concurrent.futures
import json
from collections.abc import Callable
from typing import Any

import grpc
import httpx2 as httpx
import jsonschema
import pytest

from deployments.protos import moe_cluster_pb2 as pb
from deployments.protos import moe_cluster_pb2_grpc as pb_grpc
from tests import openai_check
from tests.e2e.support import THINK_TEXT, TOOL_NAME
from tests.grammar_schemas import BAD_SCHEMA, WEATHER_TOOL, response_format, schema

MAX_TOKENS = 600  # the bounded schemas close in ~50 tokens: reaching this is a failure
REQUESTS = 24  # 3 of each of the 8 ways below


@pytest.fixture(scope="module")
def stub(server):
    channel = server.channel()
    yield pb_grpc.MoeClusterStub(channel)
    channel.close()


def _grpc_format(i: int) -> pb.ResponseFormat:
    return pb.ResponseFormat(type="json_schema", json_schema=pb.JsonSchema(
        name=f"answer_{i}", schema_json=json.dumps(schema(i)), strict=True))


def _http(server: Any, path: str, body: dict[str, Any], stream: bool, app: str = "main") -> tuple[str, str]:
    """(answer text, finish reason) of a chat or completion, whole or streamed."""
    url, chat = server.url(path, app), "chat" in path
    if not stream:
        data = openai_check.body(httpx.post(url, headers=server.headers, timeout=300, json=body))
        choice = data["choices"][0]
        return (choice["message"]["content"] if chat else choice["text"]), choice["finish_reason"]
    text, reason = [], None
    with httpx.stream("POST", url, headers=server.headers, timeout=300, json={**body, "stream": True}) as r:
        for chunk in openai_check.chunks(r):
            for c in chunk["choices"]:
                text.append((c["delta"].get("content") or "") if chat else c["text"])
                reason = c["finish_reason"] or reason
    return "".join(text), reason


def _ways(server: Any, stub: Any) -> list[Callable[[int], tuple[str, str]]]:
    md = server.metadata()

    def http_chat(stream: bool) -> Callable[[int], tuple[str, str]]:
        return lambda i: _http(server, "/v1/chat/completions", {
            "messages": [{"role": "user", "content": f"Answer {i} as JSON."}], "max_tokens": MAX_TOKENS,
            "seed": i, "response_format": response_format(i)}, stream)

    def http_completion(stream: bool) -> Callable[[int], tuple[str, str]]:
        return lambda i: _http(server, "/v1/completions", {
            "prompt": f"Answer {i} as JSON:", "max_tokens": MAX_TOKENS, "seed": i,
            "response_format": response_format(i)}, stream)

    def grpc_chat(i: int, stream: bool) -> tuple[str, str]:
        req = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content=f"Answer {i} as JSON.")],
                             sampling=pb.SamplingOptions(max_tokens=MAX_TOKENS, seed=i),
                             response_format=_grpc_format(i))
        if not stream:
            r = stub.Chat(req, metadata=md, timeout=300)
            return r.content, r.finish_reason
        parts = list(stub.ChatStream(req, metadata=md, timeout=300))
        return "".join(p.content for p in parts), parts[-1].finish_reason

    def grpc_generate(i: int, stream: bool) -> tuple[str, str]:
        req = pb.GenerateRequest(text=f"Answer {i} as JSON:",
                                 sampling=pb.SamplingOptions(max_tokens=MAX_TOKENS, seed=i),
                                 response_format=_grpc_format(i))
        if not stream:
            r = stub.Generate(req, metadata=md, timeout=300)
            return r.text, r.finish_reason
        parts = list(stub.GenerateStream(req, metadata=md, timeout=300))
        return "".join(p.text for p in parts), parts[-1].finish_reason

    return [http_chat(False), http_chat(True), http_completion(False), http_completion(True),
            lambda i: grpc_chat(i, False), lambda i: grpc_chat(i, True),
            lambda i: grpc_generate(i, False), lambda i: grpc_generate(i, True)]


def test_json_schema_answers_stop_parse_and_validate(server, stub):
    """24 requests at once, each with its own schema (nested objects, arrays, enums, required
    fields): chat and completions, whole and streamed, over HTTP and gRPC."""
    ways = _ways(server, stub)
    with concurrent.futures.ThreadPoolExecutor(REQUESTS) as pool:
        answers = list(pool.map(lambda i: ways[i % len(ways)](i), range(REQUESTS)))
    for i, (text, reason) in enumerate(answers):
        where = f"request {i} (way {i % len(ways)})"
        assert reason == "stop", f"{where} ended with {reason}: {text[:200]!r}"
        jsonschema.validate(json.loads(text), schema(i))


def test_json_object_is_json(server):
    text, reason = _http(server, "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "JSON please"}], "max_tokens": 8, "seed": 0,
        "response_format": {"type": "json_object"}}, stream=False)
    stripped = text.lstrip()
    assert stripped[:1] in ("{", "["), text  # may not close in 8 tokens; it must start as JSON
    assert reason in ("stop", "length")


def test_reasoning_comes_first_then_the_schema_holds(server):
    """The think app's script is `[THINK]Let me think[/THINK]The answer`: with a schema, the
    reasoning is the script's, and from [/THINK] the answer is the schema's, not "The answer"."""
    r = openai_check.body(httpx.post(server.url("/v1/chat/completions", "think"), headers=server.headers,
                                     timeout=300, json={
        "messages": [{"role": "user", "content": "2+2?"}], "reasoning_effort": "high", "max_tokens": MAX_TOKENS,
        "seed": 1, "response_format": response_format(1)}))
    message, choice = r["choices"][0]["message"], r["choices"][0]
    assert message["reasoning_content"] == THINK_TEXT
    assert choice["finish_reason"] == "stop", message
    jsonschema.validate(json.loads(message["content"]), schema(1))


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": TOOL_NAME}}])
def test_forced_tool_arguments_follow_the_tool_schema(server, tool_choice):
    """The tool app's script writes `{"city": "Paris"}`; the tool's schema also requires `unit`:
    the arguments are the schema's."""
    assert WEATHER_TOOL["function"]["name"] == TOOL_NAME
    r = openai_check.body(httpx.post(server.url("/v1/chat/completions", "tool"), headers=server.headers,
                                     timeout=300, json={
        "messages": [{"role": "user", "content": "Weather in Paris?"}], "tools": [WEATHER_TOOL],
        "tool_choice": tool_choice, "max_tokens": MAX_TOKENS, "seed": 2}))
    choice = r["choices"][0]
    assert choice["finish_reason"] == "tool_calls", choice
    calls = choice["message"]["tool_calls"]
    assert calls and all(c["function"]["name"] == TOOL_NAME for c in calls)
    for c in calls:
        jsonschema.validate(json.loads(c["function"]["arguments"]), WEATHER_TOOL["function"]["parameters"])


def test_schemas_the_grammar_library_cannot_take_are_refused(server, stub):
    bad = {"type": "json_schema", "json_schema": {"name": "bad", "schema": BAD_SCHEMA, "strict": True}}
    for path, body in (("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                       ("/v1/completions", {"prompt": "x"})):
        r = httpx.post(server.url(path), headers=server.headers, timeout=60, json={**body, "response_format": bad})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "response_format.json_schema.schema" and "look-around" in err["message"], err
    tool = {"type": "function", "function": {"name": "f", "parameters": BAD_SCHEMA}}
    r = httpx.post(server.url("/v1/chat/completions"), headers=server.headers, timeout=60, json={
        "messages": [{"role": "user", "content": "x"}], "tools": [tool], "tool_choice": "required"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools[0].function.parameters", r.text
    r = httpx.post(server.url("/v1/chat/completions"), headers=server.headers, timeout=60, json={
        "messages": [{"role": "user", "content": "x"}], "response_format": {"type": "yaml"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format.type", r.text
    req = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="x")], response_format=pb.ResponseFormat(
        type="json_schema", json_schema=pb.JsonSchema(name="bad", schema_json=json.dumps(BAD_SCHEMA), strict=True)))
    with pytest.raises(grpc.RpcError) as err:
        stub.Chat(req, metadata=server.metadata(), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "response_format.json_schema.schema" in err.value.details()
