"""Every HTTP route fuzzed from the OpenAPI schema the server publishes (Schemathesis 4, through
Hypothesis): schema-valid (positive) and schema-invalid (negative) requests, with the key, without
it and with a wrong one. Never a 5xx (nor a 5xx-type error event inside a stream); every 4xx is an
OpenAI-shaped error; and afterwards the engine is idle with every KV block free and answers a
normal request.

Bounded: a fixed number of examples per route and mode, no Hypothesis database, `max_tokens` and
`n` clamped so that a schema-valid request stays a short generation. `MOE_FUZZ_EXAMPLES=300` for a
deeper run (both fuzz modules)."""

from __future__ import annotations

import copy
import json
import os
from collections import Counter
from collections.abc import Callable
from typing import Any

import httpx2 as httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import Case, GenerationMode

from deployments.api.http_guards import OPEN_PATHS
from tests import openai_check
from tests.e2e.support import KEY

EXAMPLES = int(os.environ.get("MOE_FUZZ_EXAMPLES", "100"))  # per route and mode, with the key (more: a deeper run)
UNAUTHED_EXAMPLES = 5  # per route, without the key and with a wrong one
MAX_TOKENS, MAX_N = 4, 2
GOOD = {"prompt": "Hi", "max_tokens": 1}

# The published schema says "an object" for each message and tool (the chat route checks them
# itself), and any string or ints for a prompt; for the fuzzer to reach past those checks, data is
# steered to their usual shape (a non-empty prompt, token ids in the tiny checkpoint's vocabulary).
VOCAB = 131072
TEXT_PART = {"type": "object", "required": ["type", "text"], "additionalProperties": False,
             "properties": {"type": {"const": "text"}, "text": {"type": "string"}}}
IMAGE_PART = {"type": "object", "required": ["type", "image_url"], "additionalProperties": False, "properties": {
    "type": {"const": "image_url"},
    "image_url": {"type": "object", "required": ["url"], "additionalProperties": False, "properties": {
        "url": {"type": "string", "pattern": "^data:image/(png|jpeg|gif|webp);base64,[A-Za-z0-9+/]{0,120}={0,2}$"}}}}}
MESSAGE = {"type": "object", "required": ["role", "content"], "additionalProperties": False, "properties": {
    "role": {"enum": ["system", "user", "assistant"]},
    "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"anyOf": [TEXT_PART, IMAGE_PART]},
                                               "maxItems": 3}]}}}
# Small JSON Schemas (tool parameters, `response_format`), compiled into grammars by the server.
TYPES = {"enum": ["object", "string", "integer", "number", "boolean", "array", "null"]}
LEAF = {"type": "object", "additionalProperties": False, "properties": {
    "type": TYPES, "minLength": {"type": "integer", "minimum": -1, "maximum": 8},
    "maxLength": {"type": "integer", "minimum": -1, "maximum": 8}, "pattern": {"type": "string", "maxLength": 12},
    "enum": {"type": "array", "maxItems": 3}, "minimum": {"type": "number"}, "maximum": {"type": "number"},
    "format": {"enum": ["date", "date-time", "email", "uuid", "bogus"]}}}
SCHEMA = {"type": "object", "additionalProperties": False, "properties": {
    "type": TYPES, "properties": {"type": "object", "additionalProperties": LEAF, "maxProperties": 3},
    "required": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
    "items": LEAF, "additionalProperties": {"type": "boolean"},
    "anyOf": {"type": "array", "items": LEAF, "maxItems": 2},
    "maxItems": {"type": "integer", "minimum": -1, "maximum": 4}}}
RESPONSE_FORMAT = {"anyOf": [
    {"type": "object", "required": ["type"], "additionalProperties": False,
     "properties": {"type": {"enum": ["text", "json_object", "regex", ""]}}},
    {"type": "object", "required": ["type", "json_schema"], "additionalProperties": False, "properties": {
        "type": {"const": "json_schema"},
        "json_schema": {"type": "object", "required": ["name", "schema"], "additionalProperties": False, "properties": {
            "name": {"type": "string", "maxLength": 10}, "strict": {"type": "boolean"}, "schema": SCHEMA}}}},
    {"type": "null"}]}
TOOL = {"type": "object", "required": ["type", "function"], "additionalProperties": False, "properties": {
    "type": {"const": "function"},
    "function": {"type": "object", "required": ["name"], "additionalProperties": False, "properties": {
        "name": {"type": "string", "pattern": "^[a-zA-Z_][a-zA-Z0-9_]{0,20}$"}, "description": {"type": "string"},
        "parameters": SCHEMA, "strict": {"type": "boolean"}}}}}


def steered(doc: dict[str, Any]) -> dict[str, Any]:
    """The server's schema with generation kept to the declared fields and the usual message shapes."""
    doc = copy.deepcopy(doc)
    for name in doc["components"]["schemas"]:
        model = doc["components"]["schemas"][name]
        if model.get("type") == "object" and "properties" in model:
            model["additionalProperties"] = False  # the server ignores unknown fields: generating them finds nothing
    ids = {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": VOCAB - 1}, "minItems": 1,
           "maxItems": 20}
    doc["components"]["schemas"]["CompletionRequest"]["properties"]["prompt"] = {"anyOf": [
        {"type": "string", "minLength": 1}, ids, {"type": "array", "items": ids, "minItems": 1, "maxItems": 3},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 3}]}
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    chat["messages"]["items"] = MESSAGE
    chat["messages"]["maxItems"] = 4
    chat["tools"]["anyOf"][0]["items"] = TOOL
    for model in ("ChatCompletionRequest", "CompletionRequest"):
        doc["components"]["schemas"][model]["properties"]["response_format"] = RESPONSE_FORMAT
    return doc


@pytest.fixture(scope="module")
def published(server) -> dict[str, Any]:
    r = httpx.get(server.url("/openapi.json"), headers=server.headers, timeout=30)
    r.raise_for_status()
    doc = r.json()
    posts = [path for path, ops in doc["paths"].items() if "post" in ops]
    assert posts and all("requestBody" in doc["paths"][p]["post"] for p in posts), "undeclared request bodies"
    return doc


@pytest.fixture(scope="module")
def schema(published) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_dict(steered(published))


def structured(doc: dict[str, Any]) -> dict[str, Any]:
    """The chat and completion bodies narrowed to a short prompt and what becomes a grammar (a
    `response_format`, tools and the tool choice): drawn in nearly every example, not one in fifty."""
    doc = steered(doc)
    models = doc["components"]["schemas"]
    chat, completion = models["ChatCompletionRequest"], models["CompletionRequest"]
    chat["properties"] = {"messages": {"type": "array", "items": MESSAGE, "minItems": 1, "maxItems": 2},
                          "response_format": {"anyOf": RESPONSE_FORMAT["anyOf"][:2]},
                          **{k: chat["properties"][k] for k in ("tools", "tool_choice", "reasoning_effort", "stream")}}
    chat["required"] = ["messages", "response_format"]
    completion["properties"] = {"prompt": {"type": "string", "minLength": 1, "maxLength": 20},
                                "response_format": {"anyOf": RESPONSE_FORMAT["anyOf"][:2]},
                                "stream": completion["properties"]["stream"]}
    completion["required"] = ["prompt", "response_format"]
    doc["paths"] = {p: doc["paths"][p] for p in ("/v1/chat/completions", "/v1/completions")}
    return doc


def operations(schema: schemathesis.BaseSchema) -> list[Any]:
    return [result.ok() for result in schema.get_all_operations()]


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def clamp(case: Case) -> None:
    """Keeps a request short: `max_tokens` set where absent (the default is the rest of the context),
    and it and `n` clamped where they are ints; other values are left as generated."""
    body = case.body
    if not isinstance(body, dict):
        return
    if body.get("max_tokens") is None and not is_int(body.get("max_completion_tokens")):
        body["max_tokens"] = MAX_TOKENS
    for name, bound in (("max_tokens", MAX_TOKENS), ("max_completion_tokens", MAX_TOKENS), ("n", MAX_N),
                        ("best_of", MAX_N)):
        if is_int(body.get(name)) and body[name] > bound:
            body[name] = bound


def integral(value: Any) -> Any:
    """JSON Schema's "integer" admits 3.0, which the server's strict parser refuses (a 400); positive
    data sends it as 3 to get further. (Float fields take ints as they are.)"""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, list):
        return [integral(v) for v in value]
    if isinstance(value, dict):
        return {k: integral(v) for k, v in value.items()}
    return value


def run_cases(operation: Any, mode: GenerationMode, examples: int, check: Callable[[Case], None]) -> None:
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True, print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(operation.as_strategy(generation_mode=mode))
    def fuzz(case: Case) -> None:
        if mode is GenerationMode.POSITIVE and isinstance(case.body, dict):
            case.body = integral(case.body)
        clamp(case)
        check(case)

    fuzz()


def explain(case: Case, response: Any) -> str:
    body = case.body if isinstance(case.body, dict | list | str | int | float) else repr(case.body)
    return f"{case.method} {case.path} {json.dumps(body)[:2000]} -> {response.status_code} {response.content[:2000]!r}"


def stream_errors(content: bytes) -> list[dict[str, Any]]:
    """The error events of an SSE body."""
    errors = []
    for line in content.decode("utf-8", "replace").splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            event = json.loads(line[len("data: "):])
            if "error" in event:
                errors.append(event["error"])
    return errors


def check_answer(case: Case, response: Any) -> None:
    assert response.status_code < 500, explain(case, response)
    content_type = response.headers.get("content-type", [""])[0]
    if response.status_code >= 400:
        error = json.loads(response.content)["error"]
        assert error["message"] and error["type"] and error["code"] == response.status_code, explain(case, response)
    elif content_type.startswith("text/event-stream"):
        assert all(int(e.get("code") or 0) < 500 for e in stream_errors(response.content)), explain(case, response)


def answers_normally(server) -> None:
    server.wait_idle()  # nothing left running or waiting, every KV block free
    openai_check.body(httpx.post(server.url("/v1/completions"), headers=server.headers, json=GOOD, timeout=60))


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_fuzz_every_route_with_the_key(server, schema, mode):
    base = server.url("")
    statuses: dict[str, Counter[int]] = {}

    def check(case: Case) -> None:
        response = case.call(base_url=base, headers=server.headers, timeout=60)
        statuses.setdefault(case.operation.label, Counter())[response.status_code] += 1
        check_answer(case, response)

    for operation in operations(schema):
        if mode is GenerationMode.NEGATIVE and len(operation.body) == 0:
            continue  # nothing declared to get wrong
        run_cases(operation, mode, EXAMPLES, check)
    print(mode.value, {label: dict(counts) for label, counts in statuses.items()})
    for label in ("POST /v1/completions", "POST /v1/chat/completions"):
        assert sum(statuses[label].values()) >= EXAMPLES // 2, statuses  # not cut short by Hypothesis
        if mode is GenerationMode.POSITIVE:  # schema-valid data gets past the parser often enough to generate
            assert statuses[label][200] >= EXAMPLES // 10, statuses
    answers_normally(server)


def test_fuzz_structured_output(server, published):
    """Schemas and tools the server compiles into grammars: refused with a 400 naming the part, or
    followed; never a 5xx."""
    base = server.url("")
    statuses: Counter[int] = Counter()

    def check(case: Case) -> None:
        response = case.call(base_url=base, headers=server.headers, timeout=60)
        statuses[response.status_code] += 1
        check_answer(case, response)

    for operation in operations(schemathesis.openapi.from_dict(structured(published))):
        run_cases(operation, GenerationMode.POSITIVE, EXAMPLES, check)
    print("structured", dict(statuses))
    assert statuses[200] >= EXAMPLES // 10 and statuses[400] >= 1, statuses
    answers_normally(server)


def test_random_bytes_bodies(server, published):
    """Bodies that are random bytes, or JSON text with random bytes in it, on every POST route: never
    a 5xx, and a 4xx in the OpenAI shape."""
    posts = sorted(p for p, ops in published["paths"].items() if "post" in ops)
    json_ish = st.builds(lambda a, b: b'{"max_tokens": 2, "prompt": "' + a + b'", "messages": [' + b + b"]}",
                         st.binary(max_size=40), st.binary(max_size=40))

    @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True, print_blob=True,
              suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(posts), st.binary(max_size=200) | json_ish)
    def fuzz(path: str, body: bytes) -> None:
        r = httpx.post(server.url(path), headers={**server.headers, "Content-Type": "application/json"},
                       content=body, timeout=60)
        assert r.status_code < 500, (path, body, r.status_code, r.text)
        if r.status_code >= 400:
            error = r.json()["error"]
            assert error["message"] and error["code"] == r.status_code, (path, body, r.text)

    fuzz()
    answers_normally(server)


def test_fuzz_every_route_without_the_key(server, schema):
    base = server.url("")

    def refused(case: Case) -> None:
        for headers in ({}, {"Authorization": "Bearer not-" + KEY}):
            response = case.call(base_url=base, headers=headers, timeout=60)
            if case.path in OPEN_PATHS:
                assert response.status_code == 200, explain(case, response)
            else:
                assert response.status_code == 401, explain(case, response)
                assert json.loads(response.content)["error"]["type"] == "authentication_error"

    for operation in operations(schema):
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if mode is GenerationMode.POSITIVE or len(operation.body) > 0:
                run_cases(operation, mode, UNAUTHED_EXAMPLES, refused)
    answers_normally(server)
