"""The OpenAPI schema declares every body-taking route's request model (what the fuzz tests in
tests/e2e/test_fuzz_http.py generate from), and the declared schema agrees with the parser."""

from __future__ import annotations

import jsonschema
import pytest
from fastapi.routing import APIRoute

from deployments.api.http_app import create_http_app
from deployments.api.openai_protocol import ChatCompletionRequest, CompletionRequest, parse_body
from deployments.config import AppConfig
from deployments.errors import BadRequest


@pytest.fixture(scope="module")
def openapi() -> dict:
    return create_http_app(lambda: None, AppConfig(model="m")).openapi()


def validator(openapi: dict, path: str) -> jsonschema.Draft202012Validator:
    body = openapi["paths"][path]["post"]["requestBody"]
    assert body["required"] is True
    ref = body["content"]["application/json"]["schema"]["$ref"]
    return jsonschema.Draft202012Validator({**openapi, "$ref": ref})  # refs resolve against the whole document


def test_every_post_route_declares_its_body(openapi):
    app = create_http_app(lambda: None, AppConfig(model="m"))
    posts = [r.path for r in app.routes if isinstance(r, APIRoute) and "POST" in r.methods]
    assert {"/v1/completions", "/v1/chat/completions"} <= set(posts)
    for path in posts:
        validator(openapi, path).check_schema(validator(openapi, path).schema)
    # Every model a declared one refers to is a component too.
    names = set(openapi["components"]["schemas"])
    assert {"CompletionRequest", "ChatCompletionRequest", "StreamOptions", "NamedToolChoice"} <= names


CHAT = [{"role": "user", "content": "Hi"}]
SAMPLES = [
    ("/v1/completions", CompletionRequest, {"prompt": "Hi", "max_tokens": 3}, True),
    ("/v1/completions", CompletionRequest, {"prompt": [1, 2], "stream": True, "stream_options": {}}, True),
    ("/v1/completions", CompletionRequest, {}, False),
    ("/v1/completions", CompletionRequest, {"prompt": "Hi", "max_tokens": 0}, False),
    ("/v1/completions", CompletionRequest, {"prompt": "Hi", "max_tokens": "5"}, False),
    ("/v1/completions", CompletionRequest, {"prompt": "Hi", "top_p": 0}, False),
    ("/v1/chat/completions", ChatCompletionRequest, {"messages": CHAT, "tool_choice": "auto"}, True),
    ("/v1/chat/completions", ChatCompletionRequest, {"messages": []}, False),
    ("/v1/chat/completions", ChatCompletionRequest, {"messages": CHAT, "reasoning_effort": "medium"}, False),
]


@pytest.mark.parametrize("path, model, body, valid", SAMPLES)
def test_declared_schema_agrees_with_the_parser(openapi, path, model, body, valid):
    import json

    assert validator(openapi, path).is_valid(body) is valid
    if valid:
        parse_body(model, json.dumps(body).encode())
    else:
        with pytest.raises(BadRequest):
            parse_body(model, json.dumps(body).encode())
