"""gRPC requests as the HTTP API's bodies: content parts (text, image bytes, image URL) and
response formats; a plain-string content keeps its old meaning."""

from __future__ import annotations

import base64
import json

import pytest

from deployments.errors import BadRequest
from deployments.grpc.convert import chat_body, completion_body
from deployments.protos import moe_cluster_pb2 as pb


def test_plain_string_content_is_unchanged() -> None:
    body = chat_body(pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="hi")]))
    assert body.messages == [{"role": "user", "content": "hi"}]


def test_parts_become_the_http_apis_content_parts() -> None:
    req = pb.ChatRequest(messages=[pb.ChatMessage(role="user", parts=[
        pb.ContentPart(text="look"), pb.ContentPart(image=pb.ImagePart(data=b"\x89PNG...")),
        pb.ContentPart(image=pb.ImagePart(url="https://example.com/cat.png"))])])
    assert chat_body(req).messages[0]["content"] == [
        {"type": "text", "text": "look"},
        {"type": "image", "image": base64.b64encode(b"\x89PNG...").decode()},
        {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}]


@pytest.mark.parametrize("message", [
    pb.ChatMessage(role="user", content="a", parts=[pb.ContentPart(text="b")]),
    pb.ChatMessage(role="user", parts=[pb.ContentPart()]),
    pb.ChatMessage(role="user", parts=[pb.ContentPart(image=pb.ImagePart())]),
])
def test_malformed_parts_are_refused_naming_the_message(message: pb.ChatMessage) -> None:
    with pytest.raises(BadRequest) as err:
        chat_body(pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="first"), message]))
    assert err.value.param is not None and err.value.param.startswith("messages[1]")


def test_response_format_on_both_methods() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    rf = pb.ResponseFormat(type="json_schema", json_schema=pb.JsonSchema(name="s", schema_json=json.dumps(schema),
                                                                        strict=True))
    want = {"type": "json_schema", "json_schema": {"name": "s", "schema": schema, "strict": True}}
    assert completion_body(pb.GenerateRequest(text="x", response_format=rf)).response_format == want
    assert chat_body(pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="x")],
                                    response_format=rf)).response_format == want
    assert completion_body(pb.GenerateRequest(text="x")).response_format is None
    bad = pb.ResponseFormat(type="json_schema", json_schema=pb.JsonSchema(name="s", schema_json="{"))
    with pytest.raises(BadRequest) as err:
        completion_body(pb.GenerateRequest(text="x", response_format=bad))
    assert err.value.param == "response_format.json_schema.schema_json"
