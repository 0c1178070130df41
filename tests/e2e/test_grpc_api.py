"""The gRPC API through Ray Serve's gRPC proxy, with grpcio clients: unary and streaming calls,
the standard health service, reflection, auth, deadlines and message limits."""

from __future__ import annotations

import json

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

from deployments.protos import moe_cluster_pb2 as pb
from deployments.protos import moe_cluster_pb2_grpc as pb_grpc
from tests import openai_check
from tests.e2e.support import ANSWER_TEXT, GRPC_APP_MAX, GRPC_PROXY_MAX, THINK_TEXT, TOOL_ARGS, TOOL_NAME

LONG = 900  # tokens: far more than a cancelled call lets run


@pytest.fixture(scope="module")
def channel(server):
    ch = server.channel()
    yield ch
    ch.close()


@pytest.fixture(scope="module")
def stub(channel):
    return pb_grpc.MoeClusterStub(channel)


def greedy(max_tokens: int, **kwargs) -> pb.SamplingOptions:
    return pb.SamplingOptions(max_tokens=max_tokens, temperature=0, ignore_eos=True, **kwargs)


def test_generate_unary_and_stream_agree(server, stub):
    req = pb.GenerateRequest(text="Hello", sampling=greedy(8, logprobs=1))
    whole = stub.Generate(req, metadata=server.metadata(), timeout=60)
    assert len(whole.token_ids) == 8 and whole.finish_reason == "length"
    assert whole.usage.completion_tokens == 8 and whole.usage.prompt_tokens == len(whole.prompt_token_ids)
    assert [lp.token_id for lp in whole.logprobs] == list(whole.token_ids)
    parts = list(stub.GenerateStream(req, metadata=server.metadata(), timeout=60))
    assert "".join(p.text for p in parts) == whole.text
    assert [t for p in parts for t in p.token_ids] == list(whole.token_ids)
    assert list(parts[0].prompt_token_ids) == list(whole.prompt_token_ids)
    assert parts[-1].finish_reason == "length" and all(not p.finish_reason for p in parts[:-1])


def test_generate_matches_http(server, stub):
    import httpx2 as httpx

    prompt = [1, 1784, 1500, 9001]
    got = stub.Generate(pb.GenerateRequest(token_ids=pb.TokenIds(ids=prompt), sampling=greedy(10)),
                        metadata=server.metadata(), timeout=60)
    http = openai_check.body(httpx.post(server.url("/v1/completions"), headers=server.headers, timeout=60, json={
        "prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True, "return_token_ids": True}))
    assert list(got.token_ids) == http["choices"][0]["token_ids"]


def test_list_models(server, stub):
    models = stub.ListModels(pb.ListModelsRequest(), metadata=server.metadata(), timeout=30).models
    assert [m.id for m in models] == [server.model_dirs["main"].name] and models[0].max_model_len > 0


@pytest.mark.parametrize("stream", [False, True])
def test_chat_reasoning_and_tools(server, stub, stream):
    think = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="2+2?")], reasoning_effort="high",
                           sampling=pb.SamplingOptions(max_tokens=64, temperature=0))
    tool = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="Weather in Paris?")],
                          tools=[pb.Tool(name=TOOL_NAME, description="weather",
                                         parameters_json=json.dumps({"type": "object", "properties": {
                                             "city": {"type": "string"}}}))],
                          sampling=pb.SamplingOptions(max_tokens=64, temperature=0))
    if stream:
        def whole(req, app):
            parts = list(stub.ChatStream(req, metadata=server.metadata(app), timeout=60))
            calls: dict[int, list] = {}
            for p in parts:
                for c in p.tool_calls:
                    entry = calls.setdefault(c.index, [c.id, c.name, ""])
                    entry[2] += c.arguments
            return ("".join(p.reasoning_content for p in parts), "".join(p.content for p in parts),
                    [tuple(calls[i]) for i in sorted(calls)], parts[-1].finish_reason)
    else:
        def whole(req, app):
            r = stub.Chat(req, metadata=server.metadata(app), timeout=60)
            return r.reasoning_content, r.content, [(c.id, c.name, c.arguments) for c in r.tool_calls], \
                r.finish_reason
    reasoning, content, calls, finish = whole(think, "think")
    assert (reasoning, content, calls, finish) == (THINK_TEXT, ANSWER_TEXT, [], "stop")
    reasoning, content, calls, finish = whole(tool, "tool")
    assert reasoning == "" and content == "" and finish == "tool_calls"
    assert [(name, json.loads(args)) for _, name, args in calls] == [(TOOL_NAME, json.loads(TOOL_ARGS))]


def test_health_serving_without_key(server, channel):
    health = health_pb2_grpc.HealthStub(channel)
    for service in ("", "moe_cluster.v1.MoeCluster"):
        r = health.Check(health_pb2.HealthCheckRequest(service=service),
                         metadata=server.metadata(key=None), timeout=30)
        assert r.status == health_pb2.HealthCheckResponse.SERVING
    with pytest.raises(grpc.RpcError) as err:
        health.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), metadata=server.metadata(key=None),
                     timeout=30)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    watch = health.Watch(health_pb2.HealthCheckRequest(), metadata=server.metadata(key=None), timeout=30)
    assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
    watch.cancel()


def test_reflection_lists_services(channel):
    db = ProtoReflectionDescriptorDatabase(channel)
    services = set(db.get_services())
    assert {"moe_cluster.v1.MoeCluster", "grpc.health.v1.Health"} <= services
    assert db.FindFileContainingSymbol("moe_cluster.v1.MoeCluster") is not None


@pytest.mark.parametrize("key", [None, "wrong-key"])
def test_auth(server, stub, key):
    calls = [lambda md: stub.Generate(pb.GenerateRequest(text="Hi", sampling=greedy(1)), metadata=md, timeout=30),
             lambda md: list(stub.GenerateStream(pb.GenerateRequest(text="Hi", sampling=greedy(1)), metadata=md,
                                                 timeout=30)),
             lambda md: stub.Chat(pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="Hi")]),
                                  metadata=md, timeout=30),
             lambda md: list(stub.ChatStream(pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="Hi")]),
                                             metadata=md, timeout=30)),
             lambda md: stub.ListModels(pb.ListModelsRequest(), metadata=md, timeout=30)]
    for call in calls:
        with pytest.raises(grpc.RpcError) as err:
            call(server.metadata(key=key))
        assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED, err.value.details()
        assert "API key" in err.value.details()


BAD = [
    (pb.GenerateRequest(sampling=greedy(1)), "prompt"),
    (pb.GenerateRequest(text="", sampling=greedy(1)), "prompt"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1, 131072]), sampling=greedy(1)), "vocabulary"),
    (pb.GenerateRequest(token_ids=pb.TokenIds(ids=[1] * 2000), sampling=greedy(1)), "context"),
    (pb.GenerateRequest(text="Hi", sampling=pb.SamplingOptions(max_tokens=0)), "max_tokens"),
    (pb.GenerateRequest(text="Hi", sampling=pb.SamplingOptions(max_tokens=10**6)), "max_tokens"),
    (pb.GenerateRequest(text="Hi", sampling=pb.SamplingOptions(temperature=-1)), "temperature"),
    (pb.GenerateRequest(text="Hi", sampling=pb.SamplingOptions(top_p=0)), "top_p"),
    (pb.GenerateRequest(text="Hi", model="other-model", sampling=greedy(1)), "model"),
    (pb.ChatRequest(messages=[pb.ChatMessage(role="wizard", content="Hi")]), "role"),
    (pb.ChatRequest(messages=[]), "messages"),
    (pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="Hi")], reasoning_effort="medium"),
     "reasoning_effort"),
    (pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="Hi")],
                    tools=[pb.Tool(name="f", parameters_json="{not json")]), "tools[0]"),
    (pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="Hi")], tool_choice="missing_tool",
                    tools=[pb.Tool(name="f")]), "tool_choice"),
]


@pytest.mark.parametrize("request_, names", BAD, ids=[f"{type(r).__name__}-{n}" for r, n in BAD])
def test_bad_input_is_invalid_argument(server, stub, request_, names):
    for call in ((stub.Generate, stub.GenerateStream) if isinstance(request_, pb.GenerateRequest)
                 else (stub.Chat, stub.ChatStream)):
        with pytest.raises(grpc.RpcError) as err:
            out = call(request_, metadata=server.metadata(), timeout=30)
            list(out) if not isinstance(out, pb.GenerateResponse | pb.ChatResponse) else None
        code = err.value.code()
        assert code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND), (code, err.value.details())
        assert names in err.value.details(), err.value.details()
    ok = stub.Generate(pb.GenerateRequest(text="Hi", sampling=greedy(1)), metadata=server.metadata(), timeout=30)
    assert len(ok.token_ids) == 1


def test_oversized_messages(server, stub):
    # Above the app's limit, below the proxy's: the ingress refuses it by name.
    mid = pb.GenerateRequest(text="x" * (GRPC_APP_MAX + 1000), sampling=greedy(1))
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(mid, metadata=server.metadata(), timeout=30)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "grpc_max_message_bytes" in err.value.details()
    # Above the proxy's transport limit: gRPC itself refuses it, with its own code for size.
    big = pb.GenerateRequest(text="x" * (GRPC_PROXY_MAX + 1000), sampling=greedy(1))
    with pytest.raises(grpc.RpcError) as err:
        stub.Generate(big, metadata=server.metadata(), timeout=30)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "larger than max" in err.value.details()
    ok = stub.Generate(pb.GenerateRequest(text="Hi", sampling=greedy(1)), metadata=server.metadata(), timeout=30)
    assert len(ok.token_ids) == 1


def test_deadlines_cancel_the_request(server, stub):
    before = server.wait_idle()
    for deadline in (0.6, 1.0, 1.4):
        req = pb.GenerateRequest(text="Tell me a long story", sampling=greedy(LONG))
        with pytest.raises(grpc.RpcError) as err:
            for _ in stub.GenerateStream(req, metadata=server.metadata(), timeout=deadline):
                pass
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    with pytest.raises(grpc.RpcError) as err:  # unary: the whole answer would come too late
        stub.Generate(pb.GenerateRequest(text="And another", sampling=greedy(LONG)), metadata=server.metadata(),
                      timeout=0.8)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    after = server.wait_idle()
    assert after["aborts"] == before["aborts"] + 4
    assert after["generation_tokens"] - before["generation_tokens"] < 4 * LONG


def test_client_cancels_abort(server, stub):
    """Cancelled at different points of the stream: the abort reaches the engine every time (the
    proxy may be awaiting the replica or writing to the client when the cancel lands)."""
    before = server.wait_idle()
    n = 12
    for i in range(n):
        stream = stub.GenerateStream(pb.GenerateRequest(text=f"Go on {i}", sampling=greedy(LONG)),
                                     metadata=server.metadata(), timeout=60)
        for _ in range(1 + i % 4):
            next(stream)
        stream.cancel()
    after = server.wait_idle()
    assert after["aborts"] == before["aborts"] + n
    assert after["generation_tokens"] - before["generation_tokens"] < n * LONG


def test_stop_strings_end_the_stream_and_abort_the_request(server, stub):
    base = stub.Generate(pb.GenerateRequest(text="Hello", sampling=greedy(16)), metadata=server.metadata(), timeout=60)
    stop = base.text[6:10]
    want = base.text[:base.text.index(stop)]
    before = server.wait_idle()
    parts = list(stub.GenerateStream(pb.GenerateRequest(text="Hello", sampling=greedy(LONG, stop=[stop])),
                                     metadata=server.metadata(), timeout=60))
    assert "".join(p.text for p in parts) == want
    assert (parts[-1].finish_reason, parts[-1].stop_reason) == ("stop", stop)
    assert parts[-1].usage.completion_tokens == sum(len(p.token_ids) for p in parts)
    after = server.wait_idle()
    assert after["aborts"] == before["aborts"] + 1 and after["generation_tokens"] - before["generation_tokens"] < 50
