"""The sampling knobs, seeded choices and parallel_tool_calls through HTTP and gRPC, and
`/tokenize` / `/detokenize` (vLLM's shapes) against the chat endpoint's own encoding."""

from __future__ import annotations

import grpc
import httpx2 as httpx
import pytest

from cluster.model.tokenizer import Tokenizer
from deployments.protos import moe_cluster_pb2 as pb
from deployments.protos import moe_cluster_pb2_grpc as pb_grpc
from tests import openai_check
from tests.e2e.support import MAX_MODEL_LEN

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"}]
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def tokenizer(server) -> Tokenizer:
    return Tokenizer.from_model_dir(server.model_dirs["main"])


@pytest.fixture(scope="module")
def stub(server):
    channel = server.channel()
    yield pb_grpc.MoeClusterStub(channel)
    channel.close()


def completion(server, **body) -> dict:
    r = httpx.post(server.url("/v1/completions"), headers=server.headers, timeout=60,
                   json={"prompt": PROMPT, "return_token_ids": True, **body})
    return openai_check.body(r)


def choice_ids(response: dict) -> list[tuple[int, ...]]:
    return [tuple(c["token_ids"]) for c in sorted(response["choices"], key=lambda c: c["index"])]


def test_n_seeded_choices_differ_and_repeat(server, stub):
    body = {"n": 3, "temperature": 0.8, "seed": 4242, "max_tokens": 10, "ignore_eos": True}
    first = choice_ids(completion(server, **body))
    assert len(set(first)) == 3, "three different choices"
    assert choice_ids(completion(server, **body)) == first, "the same three on a repeat"
    chat = {"messages": MESSAGES, "return_token_ids": True, **body}
    answers = [choice_ids(openai_check.body(httpx.post(server.url("/v1/chat/completions"), headers=server.headers,
                                                       json=chat, timeout=60))) for _ in range(2)]
    assert len(set(answers[0])) == 3 and answers[1] == answers[0]
    # gRPC streams the same choices, each message tagged with its index.
    sampling = pb.SamplingOptions(n=3, temperature=0.8, seed=4242, max_tokens=10, ignore_eos=True)
    parts = list(stub.GenerateStream(pb.GenerateRequest(text=PROMPT, sampling=sampling), metadata=server.metadata(),
                                     timeout=60))
    streamed: dict[int, list[int]] = {}
    for p in parts:
        streamed.setdefault(p.index, []).extend(p.token_ids)
    assert [tuple(streamed[i]) for i in range(3)] == first
    assert sum(1 for p in parts if p.finish_reason) == 3 and parts[-1].usage.completion_tokens == 30
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(pb.GenerateRequest(text=PROMPT, sampling=sampling), metadata=server.metadata(), timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "n" in err.value.details()


def test_bias_and_min_tokens_hold_back_eos(server, stub, tokenizer):
    eos = tokenizer.eos_id
    ended = completion(server, temperature=0, max_tokens=10, logit_bias={str(eos): 100})
    assert choice_ids(ended) == [(eos,)] and ended["choices"][0]["finish_reason"] == "stop"
    held = completion(server, temperature=0, max_tokens=10, logit_bias={str(eos): 100}, min_tokens=3)
    assert [len(t) for t in choice_ids(held)] == [4] and choice_ids(held)[0][-1] == eos
    assert eos not in choice_ids(held)[0][:3]
    over_grpc = stub.Generate(pb.GenerateRequest(text=PROMPT, sampling=pb.SamplingOptions(
        temperature=0, max_tokens=10, logit_bias={eos: 100}, min_tokens=3)), metadata=server.metadata(), timeout=60)
    assert tuple(over_grpc.token_ids) == choice_ids(held)[0] and over_grpc.finish_reason == "stop"


def test_penalties_min_p_and_stop_strings(server, stub, tokenizer):
    greedy = completion(server, temperature=0, max_tokens=16, ignore_eos=True)
    tokens, text = choice_ids(greedy)[0], greedy["choices"][0]["text"]
    prompt = tokenizer.encode_text(PROMPT)
    assert len(set(tokens)) < len(tokens), "the unpenalised greedy answer repeats itself"
    fresh = choice_ids(completion(server, temperature=0, max_tokens=16, ignore_eos=True, repetition_penalty=1e6))[0]
    assert len(set(fresh)) == len(fresh) and not set(fresh) & set(prompt)
    penalised = completion(server, temperature=0, max_tokens=16, ignore_eos=True, presence_penalty=2,
                           frequency_penalty=2)
    assert choice_ids(penalised)[0] != tokens
    over_grpc = stub.Generate(pb.GenerateRequest(text=PROMPT, sampling=pb.SamplingOptions(
        temperature=0, max_tokens=16, ignore_eos=True, presence_penalty=2, frequency_penalty=2)),
        metadata=server.metadata(), timeout=60)
    assert tuple(over_grpc.token_ids) == choice_ids(penalised)[0]
    assert choice_ids(completion(server, temperature=1.5, min_p=1.0, seed=1, max_tokens=16,
                                 ignore_eos=True))[0] == tokens
    stop = text[4:7]
    kept = completion(server, temperature=0, max_tokens=16, ignore_eos=True, stop=[stop],
                      include_stop_str_in_output=True)["choices"][0]
    assert kept["text"] == text[:text.index(stop) + len(stop)] and kept["stop_reason"] == stop


@pytest.mark.parametrize("body, param", [
    ({"presence_penalty": 3}, "presence_penalty"), ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"min_p": 1.1}, "min_p"),
    ({"logit_bias": {"7": 101}}, "logit_bias"), ({"logit_bias": {"seven": 1}}, "logit_bias"),
    ({"logit_bias": {"999999999": 1}}, "logit_bias"), ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
])
def test_bad_knobs_are_400s_naming_the_field(server, body, param):
    r = httpx.post(server.url("/v1/completions"), headers=server.headers, timeout=60,
                   json={"prompt": "Hi", "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(param), r.json()


def test_bad_knobs_over_grpc_are_invalid_argument(server, stub):
    for sampling in (pb.SamplingOptions(presence_penalty=3), pb.SamplingOptions(logit_bias={999999999: 1.0})):
        with pytest.raises(grpc.RpcError) as err:
            stub.Generate(pb.GenerateRequest(text="Hi", sampling=sampling), metadata=server.metadata(), timeout=60)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert ("presence_penalty" if sampling.presence_penalty else "logit_bias") in err.value.details()


def test_parallel_tool_calls_false_keeps_one_call(server, stub, tokenizer):
    # Biased to [TOOL_CALLS], the model starts a new call as soon as the grammar of a required call
    # lets it (once a call is whole: its name, [ARGS], `{}`); with parallel calls off the grammar
    # allows one call only.
    no_args = {"type": "function", "function": {"name": "get_weather", "parameters": {}}}
    body = {"messages": MESSAGES, "tools": [no_args], "tool_choice": "required", "max_tokens": 40,
            "temperature": 0, "logit_bias": {str(tokenizer.tool_calls_id): 100}}
    url = server.url("/v1/chat/completions")
    many = openai_check.body(httpx.post(url, headers=server.headers, json=body, timeout=60))
    assert len(many["choices"][0]["message"]["tool_calls"]) > 1
    one = openai_check.body(httpx.post(url, headers=server.headers, timeout=60,
                                       json={**body, "parallel_tool_calls": False}))
    assert [c["function"]["name"] for c in one["choices"][0]["message"]["tool_calls"]] == ["get_weather"]
    assert one["choices"][0]["finish_reason"] == "tool_calls"
    request = pb.ChatRequest(messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in MESSAGES],
                             tools=[pb.Tool(name="get_weather", parameters_json="{}")], tool_choice="required",
                             sampling=pb.SamplingOptions(max_tokens=40, temperature=0,
                                                         logit_bias={tokenizer.tool_calls_id: 100}))
    assert len(stub.Chat(request, metadata=server.metadata(), timeout=60).tool_calls) > 1
    request.parallel_tool_calls = False
    answer = stub.Chat(request, metadata=server.metadata(), timeout=60)
    assert len(answer.tool_calls) == 1 and answer.finish_reason == "tool_calls"


def test_tokenize_then_detokenize_round_trips(server, tokenizer):
    text = "Hello world, ça va? 123"
    r = httpx.post(server.url("/tokenize"), headers=server.headers, timeout=30, json={"prompt": text})
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["tokens"][0] == tokenizer.bos_id and got["count"] == len(got["tokens"])
    assert got["max_model_len"] == MAX_MODEL_LEN
    bare = httpx.post(server.url("/tokenize"), headers=server.headers, timeout=30,
                      json={"prompt": text, "add_special_tokens": False, "return_token_strs": True}).json()
    assert bare["tokens"] == got["tokens"][1:] and "".join(bare["token_strs"]) == text
    back = httpx.post(server.url("/detokenize"), headers=server.headers, timeout=30, json={"tokens": got["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": text}
    completed = completion(server, prompt=text, max_tokens=1)
    assert completed["usage"]["prompt_tokens"] == got["count"]


def test_chat_messages_tokenize_as_the_chat_endpoint_encodes_them(server):
    for extra in ({}, {"tools": [WEATHER_TOOL]}, {"reasoning_effort": "high"}):
        tokens = httpx.post(server.url("/tokenize"), headers=server.headers, timeout=30,
                            json={"messages": MESSAGES, "add_generation_prompt": True, **extra}).json()
        chat = openai_check.body(httpx.post(server.url("/v1/chat/completions"), headers=server.headers, timeout=60,
                                            json={"messages": MESSAGES, "max_tokens": 1, "return_token_ids": True,
                                                  **extra}))
        assert tokens["tokens"] == chat["choices"][0]["prompt_token_ids"], extra
        assert tokens["count"] == chat["usage"]["prompt_tokens"]


@pytest.mark.parametrize("route, body, status, param", [
    ("/tokenize", {}, 400, "prompt"),
    ("/tokenize", {"prompt": "Hi", "messages": MESSAGES}, 400, "messages"),
    ("/tokenize", {"messages": [{"role": "wizard", "content": "Hi"}]}, 400, "messages"),
    ("/tokenize", {"messages": MESSAGES, "continue_final_message": True}, 400, "continue_final_message"),
    ("/tokenize", {"prompt": "Hi", "model": "gpt-4"}, 404, "model"),
    ("/detokenize", {"tokens": [1, 999999999]}, 400, "tokens"),
    ("/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("/detokenize", {}, 400, "tokens"),
])
def test_bad_tokenize_bodies_are_named_4xx(server, route, body, status, param):
    r = httpx.post(server.url(route), headers=server.headers, timeout=30, json=body)
    assert r.status_code == status, r.text
    assert (r.json()["error"]["param"] or "").startswith(param), r.json()


def test_tokenize_bodies_are_in_the_openapi_schema(server):
    schema = httpx.get(server.url("/openapi.json"), headers=server.headers, timeout=30).json()
    for path, model in (("/tokenize", "TokenizeRequest"), ("/detokenize", "DetokenizeRequest")):
        ref = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith(model) and model in schema["components"]["schemas"]
