"""The OpenAI-compatible HTTP API, through the official `openai` client and raw HTTP."""

from __future__ import annotations

import json

import httpx2 as httpx
import openai
import pytest

from cluster.model.tokenizer import Tokenizer
from tests import openai_check
from tests.e2e.support import ANSWER_TEXT, KEY, THINK_TEXT, TOOL_ARGS, TOOL_NAME
from tests.reference import assert_matches_reference, reference_greedy

WEATHER_TOOL = {"type": "function", "function": {
    "name": TOOL_NAME, "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


def client(server, app: str = "main") -> openai.OpenAI:
    return openai_check.client(server.url("/v1", app), KEY)


def test_models(server):
    models = client(server).models.list().data
    assert [m.id for m in models] == [server.model_dirs["main"].name]


def test_chat(server):
    c = client(server)
    r = c.chat.completions.create(model=server.model_dirs["main"].name, max_tokens=8, temperature=0,
                                  messages=[{"role": "system", "content": "Be brief."},
                                            {"role": "user", "content": "Hello"}])
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens >= 1 and r.usage.prompt_tokens > 2
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_with_usage(server):
    c = client(server)
    whole = c.chat.completions.create(model="", max_tokens=12, temperature=0,
                                      messages=[{"role": "user", "content": "Count"}],
                                      extra_body={"ignore_eos": True})
    chunks = list(c.chat.completions.create(model="", max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": "Count"}],
                                            extra_body={"ignore_eos": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert all(ch.usage is None for ch in chunks[:-1])


def test_completions_text_and_stream(server):
    c = client(server)
    r = c.completions.create(model="", prompt="The capital of France is", max_tokens=10, temperature=0,
                             logprobs=2, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 10
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 10 and len(lp.top_logprobs) == 10 and "".join(lp.tokens) == r.choices[0].text
    streamed = list(c.completions.create(model="", prompt="The capital of France is", max_tokens=10,
                                         temperature=0, stream=True, extra_body={"ignore_eos": True}))
    assert "".join(ch.choices[0].text for ch in streamed) == r.choices[0].text


def test_completions_n_and_batch(server):
    body = {"prompt": ["Hello", "The sky is"], "n": 2, "max_tokens": 4, "temperature": 0, "ignore_eos": True}
    r = openai_check.body(httpx.post(server.url("/v1/completions"), json=body, headers=server.headers, timeout=60))
    assert [c["index"] for c in r["choices"]] == [0, 1, 2, 3]
    assert r["choices"][0]["text"] == r["choices"][1]["text"]  # greedy: the same twice
    assert r["usage"]["completion_tokens"] == 16


def test_greedy_completions_match_transformers(server):
    prompts = [[1, 1784, 1500, 9001, 72], [1] + list(range(2000, 2040))]
    for prompt in prompts:
        r = openai_check.body(httpx.post(server.url("/v1/completions"), headers=server.headers, timeout=60, json={
            "prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "return_token_ids": True}))
        choice = r["choices"][0]
        assert choice["prompt_token_ids"] == prompt
        ref = reference_greedy(server.model_dirs["main"], prompt, 24)
        assert_matches_reference(choice["token_ids"], ref, f"prompt of {len(prompt)} tokens")


def test_return_token_ids_streamed(server):
    body = {"prompt": "Hello", "max_tokens": 6, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    whole = openai_check.body(httpx.post(server.url("/v1/completions"), json=body, headers=server.headers, timeout=60))
    ids, prompt_ids = [], None
    with httpx.stream("POST", server.url("/v1/completions"), json={**body, "stream": True},
                      headers=server.headers, timeout=60) as r:
        for chunk in openai_check.chunks(r):
            choice = chunk["choices"][0]
            ids += choice["token_ids"]
            prompt_ids = prompt_ids or choice.get("prompt_token_ids")
    assert ids == whole["choices"][0]["token_ids"] and prompt_ids == whole["choices"][0]["prompt_token_ids"]


@pytest.mark.parametrize("stream", [False, True])
def test_reasoning_split(server, stream):
    c = client(server, "think")
    kwargs = dict(model="think", messages=[{"role": "user", "content": "What is 2+2?"}], reasoning_effort="high",
                  max_tokens=64, temperature=0)
    if not stream:
        msg = c.chat.completions.create(**kwargs).choices[0].message
        reasoning, content = msg.reasoning_content, msg.content
    else:
        parts = {"reasoning": "", "content": ""}
        for ch in c.chat.completions.create(stream=True, **kwargs):
            delta = ch.choices[0].delta
            parts["reasoning"] += getattr(delta, "reasoning_content", None) or ""
            parts["content"] += delta.content or ""
        reasoning, content = parts["reasoning"], parts["content"]
    assert reasoning == THINK_TEXT
    assert content == ANSWER_TEXT


@pytest.mark.parametrize("stream", [False, True])
def test_tool_call_parsed(server, stream):
    c = client(server, "tool")
    kwargs = dict(model="tool", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER_TOOL],
                  tool_choice="auto", max_tokens=64, temperature=0)
    if not stream:
        choice = c.chat.completions.create(**kwargs).choices[0]
        calls = [(t.id, t.function.name, t.function.arguments) for t in choice.message.tool_calls]
        finish, content = choice.finish_reason, choice.message.content
    else:
        acc: dict[int, list] = {}
        finish, content = None, ""
        for ch in c.chat.completions.create(stream=True, **kwargs):
            delta = ch.choices[0].delta
            content += delta.content or ""
            for t in delta.tool_calls or []:
                entry = acc.setdefault(t.index, [None, None, ""])
                entry[0] = entry[0] or t.id
                entry[1] = entry[1] or (t.function.name if t.function else None)
                entry[2] += (t.function.arguments or "") if t.function else ""
            finish = ch.choices[0].finish_reason or finish
        calls = [tuple(acc[i]) for i in sorted(acc)]
    assert len(calls) == 1
    call_id, name, arguments = calls[0]
    assert name == TOOL_NAME and json.loads(arguments) == json.loads(TOOL_ARGS)
    assert len(call_id) == 9 and call_id.isalnum()
    assert finish == "tool_calls" and not content

    # The call goes back into the conversation as mistral-common expects it.
    follow = c.chat.completions.create(model="tool", max_tokens=4, temperature=0, tools=[WEATHER_TOOL], messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": "22 C, sunny"}])
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")


def _tool_calls(c, stream: bool, **kwargs) -> tuple[list[tuple[str, str]], str | None]:
    """(name, arguments) of each call, and the finish reason, from a whole or streamed answer."""
    if not stream:
        choice = c.chat.completions.create(**kwargs).choices[0]
        return [(t.function.name, t.function.arguments) for t in choice.message.tool_calls or []], choice.finish_reason
    acc: dict[int, list] = {}
    finish = None
    for ch in c.chat.completions.create(stream=True, **kwargs):
        for t in ch.choices[0].delta.tool_calls or []:
            entry = acc.setdefault(t.index, ["", ""])
            entry[0] = entry[0] or (t.function.name if t.function and t.function.name else "")
            entry[1] += (t.function.arguments or "") if t.function else ""
        finish = ch.choices[0].finish_reason or finish
    return [tuple(acc[i]) for i in sorted(acc)], finish


@pytest.mark.parametrize("stream", [False, True])
def test_named_tool_choice_makes_the_answer_a_call(server, stream):
    # The think app's model never calls a tool on its own ... (the arguments follow the tool's schema
    # under a forced choice: a bounded one, so that off its script the model closes them in time)
    c = client(server, "think")
    bounded = {"type": "function", "function": {**WEATHER_TOOL["function"], "parameters": {
        "type": "object", "properties": {"city": {"enum": ["Paris", "Rome"]}}, "required": ["city"],
        "additionalProperties": False}}}
    base = dict(model="think", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[bounded],
                max_tokens=32, temperature=0)
    assert _tool_calls(c, stream, **base, tool_choice="auto")[0] == []
    # ... a named choice makes its answer that call.
    calls, finish = _tool_calls(c, stream, **base, tool_choice={"type": "function",
                                                                 "function": {"name": TOOL_NAME}})
    assert [name for name, _ in calls] == [TOOL_NAME] and finish == "tool_calls"


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": TOOL_NAME}}])
def test_forced_tool_call_continues_as_the_model_would(server, choice):
    # The tool app's model calls get_weather by itself: forcing the call's first tokens changes nothing.
    c = client(server, "tool")
    base = dict(model="tool", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER_TOOL],
                max_tokens=64, temperature=0)
    calls, finish = _tool_calls(c, False, **base, tool_choice=choice)
    assert len(calls) == 1 and calls[0][0] == TOOL_NAME and json.loads(calls[0][1]) == json.loads(TOOL_ARGS)
    assert finish == "tool_calls"
    # ... and the call's first tokens were indeed forced: the prompt the model saw ends with them.
    t = Tokenizer.from_model_dir(server.model_dirs["tool"])
    forced = [t.tool_calls_id] if choice == "required" else [
        t.tool_calls_id, *t.encode_text(TOOL_NAME, bos=False), t.args_id]
    body = {**base, "tool_choice": choice, "return_token_ids": True}
    r = openai_check.body(httpx.post(server.url("/v1/chat/completions", "tool"), json=body, headers=server.headers,
                                     timeout=60))
    assert r["choices"][0]["prompt_token_ids"][-len(forced):] == forced


def test_health_and_ready_need_no_key(server):
    for path in ("/health", "/ready"):
        r = httpx.get(server.url(path), timeout=30)
        assert r.status_code == 200, (path, r.text)
    assert httpx.get(server.url("/ready"), timeout=30).json() == {"status": "ready"}


def test_streamed_choices_and_chat_logprobs(server):
    body = {"prompt": "Hello", "n": 2, "max_tokens": 5, "temperature": 0, "ignore_eos": True, "stream": True}
    texts, finishes = {0: "", 1: ""}, {}
    with httpx.stream("POST", server.url("/v1/completions"), json=body, headers=server.headers, timeout=60) as r:
        for chunk in openai_check.chunks(r):
            for choice in chunk["choices"]:
                texts[choice["index"]] += choice["text"]
                if choice["finish_reason"]:
                    finishes[choice["index"]] = choice["finish_reason"]
    assert texts[0] == texts[1] != "" and finishes == {0: "length", 1: "length"}

    r = client(server).chat.completions.create(model="", max_tokens=4, temperature=0, logprobs=True, top_logprobs=2,
                                               messages=[{"role": "user", "content": "Hi"}],
                                               extra_body={"ignore_eos": True})
    content = r.choices[0].logprobs.content
    assert len(content) == 4 and all(len(t.top_logprobs) == 2 for t in content)
    assert all(t.top_logprobs[0].logprob >= t.logprob - 1e-6 for t in content)  # greedy picks the best


def test_chat_with_an_image(server):
    import base64
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (48, 32), (200, 30, 30)).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    text_only = [{"role": "user", "content": "What colour is it?"}]
    with_image = [{"role": "user", "content": [{"type": "text", "text": "What colour is it?"},
                                               {"type": "image_url", "image_url": {"url": url}}]}]
    c = client(server)
    plain = c.chat.completions.create(model="", messages=text_only, max_tokens=3, temperature=0)
    seen = c.chat.completions.create(model="", messages=with_image, max_tokens=3, temperature=0)
    assert seen.usage.prompt_tokens > plain.usage.prompt_tokens  # the image's [IMG] tokens
    assert seen.choices[0].finish_reason in ("stop", "length")


def test_stop_strings_end_the_text_and_abort_the_request(server):
    """The ingress makes the text and finds stop strings: nothing past the stop is sent, whole or
    streamed, and the engine aborts the request (it would run on for 400 tokens) and frees it."""
    body = {"prompt": "The capital of France is", "max_tokens": 16, "temperature": 0, "ignore_eos": True}
    base = openai_check.body(httpx.post(server.url("/v1/completions"), json=body, headers=server.headers, timeout=60))
    text = base["choices"][0]["text"]
    stop = text[6:10]
    want = text[:text.index(stop)]
    before = server.wait_idle()
    long = {**body, "max_tokens": 400, "stop": [stop]}
    whole = openai_check.body(httpx.post(server.url("/v1/completions"), json=long, headers=server.headers, timeout=60))
    choice = whole["choices"][0]
    assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == (want, "stop", stop)
    shown = ""
    for chunk in client(server).completions.create(model="", prompt=long["prompt"], max_tokens=400, temperature=0,
                                                   stop=[stop], stream=True, extra_body={"ignore_eos": True}):
        shown += chunk.choices[0].text
        assert want.startswith(shown), "streamed text went past the stop string"
    assert shown == want and chunk.choices[0].finish_reason == "stop"
    after = server.wait_idle()
    assert after["aborts"] == before["aborts"] + 2
    assert after["generation_tokens"] - before["generation_tokens"] < 100
