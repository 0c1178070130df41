"""Authentication on every mounted route, body limits, and bad input: always a 4xx naming the
problem, never a 5xx, and the server answers the next good request."""

from __future__ import annotations

import json

import httpx2 as httpx
import pytest
from starlette.routing import Route

from deployments.api.http_app import create_http_app
from deployments.api.http_guards import OPEN_PATHS
from tests import openai_check
from tests.e2e.support import MAX_BODY, MAX_MODEL_LEN


def mounted_routes(config) -> list[tuple[str, str]]:
    app = create_http_app(lambda: None, config)
    routes = []
    for route in app.routes:
        assert isinstance(route, Route), f"unexpected route type {type(route).__name__}"
        assert "{" not in route.path, f"{route.path}: a parametrised route needs a sample path here"
        for method in sorted(route.methods or {"GET"}):
            if method != "HEAD":
                routes.append((method, route.path))
    return routes


def test_every_route_but_health_needs_the_key(server):
    routes = mounted_routes(server.apps["main"])
    paths = {p for _, p in routes}
    assert {"/v1/completions", "/v1/chat/completions", "/v1/models", "/v1/engine/stats"} <= paths
    assert OPEN_PATHS <= paths
    for method, path in routes:
        if path in OPEN_PATHS:
            r = httpx.request(method, server.url(path), timeout=30)
            assert r.status_code == 200, (method, path, r.text)
            continue
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "test-key-1"}):
            r = httpx.request(method, server.url(path), headers=headers, json={}, timeout=30)
            assert r.status_code == 401, (method, path, headers, r.status_code)
            assert r.json()["error"]["type"] == "authentication_error"
            assert r.headers["www-authenticate"] == "Bearer"
    # Unknown paths do not reveal themselves either.
    assert httpx.get(server.url("/no/such/route"), timeout=30).status_code == 401
    assert httpx.get(server.url("/no/such/route"), headers=server.headers, timeout=30).status_code == 404


GOOD = {"prompt": "Hi", "max_tokens": 1}
CHAT = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}

# (route, body (bytes are sent raw), status, words the error must contain)
CASES = [
    ("/v1/completions", b'{"prompt": "Hi", ', 400, "JSON"),
    ("/v1/completions", b"not json at all", 400, "JSON"),
    ("/v1/completions", b"[1, 2]", 400, "object"),
    ("/v1/completions", {}, 400, "prompt"),
    ("/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": "5"}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "Hi", "temperature": "hot"}, 400, "temperature"),
    ("/v1/completions", {"prompt": "Hi", "stream": "yes"}, 400, "stream"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, "prompt"),
    ("/v1/completions", {"prompt": [1] * (MAX_MODEL_LEN + 5)}, 400, "context"),
    ("/v1/completions", {"prompt": "hello " * 1500}, 400, "context"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 10**9}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": MAX_MODEL_LEN}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": [1, 131072]}, 400, "vocabulary"),
    ("/v1/completions", {"prompt": [1, -5]}, 400, "vocabulary"),
    ("/v1/completions", {"prompt": "Hi", "top_p": 0}, 400, "top_p"),
    ("/v1/completions", {"prompt": "Hi", "n": 100}, 400, "n"),
    ("/v1/completions", {"prompt": "Hi", "logprobs": 21}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "Hi", "seed": -1}, 400, "seed"),
    ("/v1/completions", {"prompt": "Hi", "stop": [""]}, 400, "stop"),
    ("/v1/completions", {"prompt": "Hi", "echo": True}, 400, "echo"),
    ("/v1/completions", {"prompt": "Hi", "model": "gpt-4"}, 404, "model"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "Hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "Hi"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"content": "Hi"}]}, 400, "role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0]"),
    ("/v1/chat/completions", {**CHAT, "reasoning_effort": "medium"}, 400, "reasoning_effort"),
    ("/v1/chat/completions", {**CHAT, "tools": "f"}, 400, "tools"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {"name": 5}}]}, 400, "tools[0]"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, 400, "tools[0]"),
    ("/v1/chat/completions", {**CHAT, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": "not a schema"}}]}, 400, "tools[0]"),
    ("/v1/chat/completions", {**CHAT, "tools": [TOOL], "tool_choice": {"type": "function",
                                                                      "function": {"name": "g"}}}, 400, "tool_choice"),
    ("/v1/chat/completions", {**CHAT, "tool_choice": "sometimes"}, 400, "tool_choice"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": -1}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {**CHAT, "response_format": {"type": "yaml"}}, 400, "response_format.type"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}}]}]}, 400, "image_url"),
]


@pytest.mark.parametrize("route, body, status, words", CASES, ids=[f"{i}-{c[3]}" for i, c in enumerate(CASES)])
def test_bad_input_is_a_named_4xx(server, route, body, status, words):
    kwargs = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server.url(route), headers={**server.headers, "Content-Type": "application/json"}, timeout=60,
                   **kwargs)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert words in error["message"] or words in (error["param"] or ""), error
    openai_check.body(httpx.post(server.url(route), headers=server.headers, timeout=60,
                                 json=GOOD if route == "/v1/completions" else CHAT))


def test_unknown_fields_are_ignored(server):
    openai_check.body(httpx.post(server.url("/v1/completions"), headers=server.headers, timeout=60,
                                 json={**GOOD, "frobnicate": True, "metadata": {"a": 1}}))


def test_body_cap(server):
    big = json.dumps({"prompt": "x" * (MAX_BODY + 10)}).encode()
    r = httpx.post(server.url("/v1/completions"), headers=server.headers, content=big, timeout=60)
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]

    def chunked():  # no Content-Length: the cap is counted while reading
        for i in range(0, len(big), 65536):
            yield big[i:i + 65536]
    r = httpx.post(server.url("/v1/completions"), headers=server.headers, content=chunked(), timeout=60)
    assert r.status_code == 413, r.text
    openai_check.body(httpx.post(server.url("/v1/completions"), headers=server.headers, json=GOOD, timeout=60))


def test_stream_errors_before_start_are_plain_4xx(server):
    r = httpx.post(server.url("/v1/chat/completions"), headers=server.headers, timeout=60,
                   json={**CHAT, "stream": True, "messages": [{"role": "wizard", "content": "Hi"}]})
    assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")
