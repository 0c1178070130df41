"""Pieces of the ingress checked without Ray: readiness and UNAVAILABLE while no engine server answers,
the chat output parser against the stream's stop-string-safe text."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2
from starlette.testclient import TestClient

from cluster.model.tokenizer import Tokenizer
from deployments.api.chat_parser import ChatParser
from deployments.api.http_app import create_http_app
from deployments.config import AppConfig
from deployments.errors import Overloaded
from deployments.frontend.admission import Admission
from deployments.frontend.ingress_core import IngressCore
from deployments.grpc.service import GrpcMethods
from deployments.protos import moe_cluster_pb2 as pb


class LoadingEngine:
    """An EngineServer handle whose replica is not up: every call fails."""

    def options(self, **_):
        return self

    def __getattr__(self, name):
        async def fail(*_):
            raise TimeoutError(f"{name}: no replica yet")
        return SimpleNamespace(remote=fail)


class FakeContext:
    def __init__(self, metadata=()):
        self._metadata, self.code, self.details = list(metadata), None, None

    def invocation_metadata(self):
        return self._metadata

    def set_code(self, code):
        self.code = code

    def set_details(self, details):
        self.details = details


@pytest.fixture(scope="module")
def loading(tiny_ckpt):
    config = AppConfig(model=str(tiny_ckpt), api_keys=["k"])
    ingress = GrpcMethods()
    ingress.core = IngressCore(LoadingEngine(), config)
    return ingress, config


def test_not_ready_until_an_engine_server_answers(loading):
    ingress, config = loading
    http = TestClient(create_http_app(lambda: ingress.core, config))
    r = http.get("/ready")
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert http.get("/health").status_code == 200
    r = http.post("/v1/completions", json={"prompt": "Hi"}, headers={"Authorization": "Bearer k"})
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"

    check = asyncio.run(ingress.Check(health_pb2.HealthCheckRequest(), FakeContext()))
    assert check.status == health_pb2.HealthCheckResponse.NOT_SERVING
    ctx = FakeContext([("authorization", "Bearer k")])
    asyncio.run(ingress.Generate(pb.GenerateRequest(text="Hi"), ctx))
    assert ctx.code == grpc.StatusCode.UNAVAILABLE and "not loaded" in ctx.details
    assert ingress.core.admission.in_flight == 0


def test_admission_refuses_past_the_limit():
    admission = Admission(2, retry_after_s=3)
    a, b = admission.enter(), admission.enter()
    with pytest.raises(Overloaded) as err:
        admission.enter()
    assert err.value.status == 429 and err.value.headers() == {"Retry-After": "3"}
    a.release()
    a.release()  # idempotent
    assert admission.in_flight == 1
    admission.enter()
    b.release()


def test_chat_parser_never_shows_more_than_the_engine_text(tiny_ckpt):
    t = Tokenizer.from_model_dir(tiny_ckpt)
    ids = [t.think_id, *t.encode_text("Plan it", bos=False), t.end_think_id,
           *t.encode_text("Done. STOP here", bos=False)]
    full = t.decode(ids)
    cut = full.index(" STOP")  # the stream's text was cut at the stop string " STOP"
    parser = ChatParser(t)
    shown, released = "", 0
    for n in range(1, len(ids) + 1):
        visible = min(len(t.decode(ids[:n])), cut - 4)  # and held back a possible prefix while streaming
        d = parser.feed(ids[n - 1:n], visible - released)
        released = visible
        shown += d.reasoning + d.content
    d = parser.feed([], cut - released, finished=True)
    shown += d.reasoning + d.content
    assert (parser.reasoning, parser.content) == ("Plan it", "Done.")
    assert shown == full[:cut]


def test_chat_parser_takes_a_forced_call_prefix(tiny_ckpt):
    t = Tokenizer.from_model_dir(tiny_ckpt)
    parser = ChatParser(t)
    parser.prime([t.tool_calls_id, *t.encode_text("get_weather", bos=False), t.args_id])
    assert [c.name for c in parser.calls] == ["get_weather"]
    args = t.encode_text('{"city": "Paris"}', bos=False)  # what the model generates after the prefix
    first = parser.feed(args[:1], len(t.decode(args[:1])))
    assert first.tool_calls[0].id and first.tool_calls[0].name == "get_weather"  # the call starts at once
    parser.feed(args[1:], len(t.decode(args)) - len(t.decode(args[:1])), finished=True)
    assert parser.calls[0].arguments == '{"city": "Paris"}' and parser.content == ""
    assert parser.finish_reason("stop") == "tool_calls"
    with pytest.raises(ValueError, match="content"):
        ChatParser(t).prime(t.encode_text("hello", bos=False))
