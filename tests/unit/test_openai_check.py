"""The tests' check of OpenAI-API answers (tests/openai_check.py) refuses what the `openai`
package's types refuse: a missing required field, a value of the wrong type, a stream without its
end; for raw HTTP and for the official client alike."""

from __future__ import annotations

import copy
import json

import httpx2 as httpx
import pydantic
import pytest

from tests import openai_check

CHAT = {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": "m",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hi", "reasoning_content": None},
                     "finish_reason": "stop", "logprobs": None, "token_ids": [5]}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4}}
CHUNK = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m",
         "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}
COMPLETION = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "m",
              "choices": [{"index": 0, "text": "Hi", "finish_reason": "length", "logprobs": None}]}


def _without(data: dict, *path: str | int) -> dict:
    data = copy.deepcopy(data)
    target = data
    for key in path[:-1]:
        target = target[key]
    del target[path[-1]]
    return data


def _response(path: str, content: bytes, status: int = 200) -> httpx.Response:
    return httpx.Response(status, content=content, request=httpx.Request("POST", f"http://test{path}"))


def _sse(*events: dict | str) -> bytes:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n" for e in events).encode()


def test_valid_answers_pass_with_extra_fields():
    assert openai_check.body(_response("/v1/chat/completions", json.dumps(CHAT).encode())) == CHAT
    assert openai_check.body(_response("/v1/completions", json.dumps(COMPLETION).encode())) == COMPLETION
    streamed = _response("/v1/chat/completions", _sse(CHUNK, CHUNK, "[DONE]"))
    assert list(openai_check.chunks(streamed)) == [CHUNK, CHUNK]


@pytest.mark.parametrize("path", [("created",), ("choices", 0, "index"), ("choices", 0, "finish_reason"),
                                  ("choices", 0, "message", "role"), ("usage", "total_tokens")])
def test_a_missing_required_field_is_refused(path):
    with pytest.raises(pydantic.ValidationError):
        openai_check.body(_response("/v1/chat/completions", json.dumps(_without(CHAT, *path)).encode()))


@pytest.mark.parametrize("change", [{"object": "chat.completion.chunk"}, {"created": "1"}, {"choices": None}])
def test_a_wrong_value_is_refused(change):
    with pytest.raises(pydantic.ValidationError):
        openai_check.check({**CHAT, **change}, openai_check.ChatCompletion)


def test_streams_are_checked_chunk_by_chunk_and_must_end():
    running = {**COMPLETION, "choices": [{**COMPLETION["choices"][0], "finish_reason": None}]}
    assert len(list(openai_check.chunks(_response("/v1/completions", _sse(running, COMPLETION, "[DONE]"))))) == 2
    with pytest.raises(pydantic.ValidationError):  # null only while streaming
        openai_check.body(_response("/v1/completions", json.dumps(running).encode()))
    for bad in (_without(COMPLETION, "choices", 0, "text"), _without(COMPLETION, "choices", 0, "finish_reason")):
        with pytest.raises(pydantic.ValidationError):
            list(openai_check.chunks(_response("/v1/completions", _sse(COMPLETION, bad, "[DONE]"))))
    with pytest.raises(AssertionError, match="without"):
        list(openai_check.chunks(_response("/v1/completions", _sse(COMPLETION))))


def test_the_official_client_validates_bodies_and_chunks():
    answers = {"body": _without(CHAT, "created"), "chunk": _without(CHUNK, "choices", 0, "index")}

    def handler(request: httpx.Request) -> httpx.Response:
        if json.loads(request.content).get("stream"):
            return httpx.Response(200, content=_sse(answers["chunk"], "[DONE]"),
                                  headers={"content-type": "text/event-stream"})
        return httpx.Response(200, json=answers["body"])

    wire = httpx.Client(transport=httpx.MockTransport(handler))
    client = openai_check.client("http://test/v1", "key", http_client=wire)
    messages = [{"role": "user", "content": "Hi"}]
    with pytest.raises(pydantic.ValidationError):
        client.chat.completions.create(model="m", messages=messages)
    with pytest.raises(pydantic.ValidationError):
        list(client.chat.completions.create(model="m", messages=messages, stream=True))
    answers.update(body=CHAT, chunk=CHUNK)
    assert client.chat.completions.create(model="m", messages=messages).choices[0].message.content == "Hi"
    assert [c.choices[0].delta.content for c in client.chat.completions.create(
        model="m", messages=messages, stream=True)] == ["Hi"]
