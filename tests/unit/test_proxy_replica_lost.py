"""Serve's proxy, with the lost-replica statuses installed, answers a call whose ingress replica
died with 503 (an OpenAI error body, Retry-After) or, once an HTTP stream has started, a last SSE
error event and [DONE]; gRPC with UNAVAILABLE. Other failures keep Serve's statuses. A request
that had been sent nothing yet is first sent again to another replica (a bounded number of times),
its HTTP body replayed."""

from __future__ import annotations

import asyncio
import json
import pickle
import types
from typing import Any

import grpc
import pytest
from ray.exceptions import ActorDiedError
from ray.serve._private import proxy
from ray.serve._private.proxy_request_response import ASGIProxyRequest
from ray.serve.handle import DeploymentResponseGenerator

from deployments.grpc import proxy_replica_lost, proxy_resend


def _patched() -> types.SimpleNamespace:
    module = types.SimpleNamespace(
        get_http_response_status=proxy.get_http_response_status,
        send_http_response_on_exception=proxy.send_http_response_on_exception,
        get_grpc_response_status=proxy.get_grpc_response_status)
    proxy_replica_lost.install(module)
    return module


def test_a_lost_ingress_replica_is_a_retryable_error() -> None:
    p = _patched()
    status = p.get_http_response_status(ActorDiedError(), None, "r1")
    assert status.code == 503
    before = p.send_http_response_on_exception(status, False)
    assert before[0]["status"] == 503 and (b"retry-after", b"1") in before[0]["headers"]
    assert json.loads(before[1]["body"])["error"]["type"] == "service_unavailable"
    (after,) = p.send_http_response_on_exception(status, True)
    events = after["body"].decode().strip().split("\n\n")
    assert json.loads(events[0].removeprefix("data: "))["error"]["code"] == 503
    assert events[1] == "data: [DONE]" and after["more_body"] is False
    assert p.get_grpc_response_status(ActorDiedError(), None, "r1").code == grpc.StatusCode.UNAVAILABLE


def test_other_failures_keep_serves_statuses() -> None:
    p = _patched()
    status = p.get_http_response_status(RuntimeError("boom"), None, "r1")
    assert status.code == 500
    assert p.send_http_response_on_exception(status, True) == []
    assert p.get_grpc_response_status(RuntimeError("boom"), None, "r1").code == grpc.StatusCode.INTERNAL


# -- resending a request whose ingress replica died before it answered (proxy_resend.py) -------

class _Replica:
    """What a fake handle's `remote()` returns (a unary DeploymentResponse to Serve's proxy): it dies,
    or echoes the request body the proxy relays to it (as pickled ASGI messages)."""

    def __init__(self, dies: bool, queue: Any) -> None:
        self.dies, self.queue = dies, queue

    def __await__(self) -> Any:
        return self._answer().__await__()

    async def _answer(self) -> bytes:
        if self.dies:
            raise ActorDiedError()
        body = b""
        while True:
            await self.queue.wait_for_message()
            messages = self.queue.get_messages_nowait()
            body += b"".join(m.get("body", b"") for m in messages)
            if not messages or not messages[-1].get("more_body", False):
                break
        return pickle.dumps([{"type": "http.response.start", "status": 200, "headers": []},
                             {"type": "http.response.body", "body": b"echo " + body, "more_body": False}])

    def cancel(self) -> None:
        pass

    def cancelled(self) -> bool:
        return False


class _StartedThenDies(DeploymentResponseGenerator):
    """A streaming response that sends its first SSE event, then its replica dies."""

    def __init__(self) -> None:  # noqa: D107 - nothing of Serve's state is needed
        self.sent = False

    async def __anext__(self) -> Any:
        if self.sent:
            raise ActorDiedError()
        self.sent = True
        return pickle.dumps([{"type": "http.response.start", "status": 200, "headers": []},
                             {"type": "http.response.body", "body": b"data: {}\n\n", "more_body": True}])

    def cancel(self) -> None:
        pass

    def cancelled(self) -> bool:
        return False


class _Handle:
    def __init__(self, http: Any, replicas: list[str]) -> None:
        self.http, self.replicas, self.calls = http, replicas, 0

    def remote(self, arg: Any) -> Any:
        kind = self.replicas[min(self.calls, len(self.replicas) - 1)]
        self.calls += 1
        if kind == "started-then-dies":
            return _StartedThenDies()
        if kind == "grpc":
            return _GrpcReply(dies=self.calls == 1)
        return _Replica(kind == "dies", self.http.asgi_receive_queues["internal-1"])


class _GrpcReply(_Replica):
    def __init__(self, dies: bool) -> None:
        super().__init__(dies, None)

    async def _answer(self) -> Any:  # type: ignore[override]
        if self.dies:
            raise ActorDiedError()
        return types.SimpleNamespace(_set_on_grpc_context=lambda context: None), b"answer"


@pytest.fixture
def installed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The patches installed in this process's Serve proxy module, undone afterwards."""
    for name in ("get_http_response_status", "send_http_response_on_exception", "get_grpc_response_status"):
        monkeypatch.setattr(proxy, name, getattr(proxy, name))
    for cls in (proxy.HTTPProxy, proxy.gRPCProxy):
        monkeypatch.setattr(cls, "send_request_to_replica", cls.send_request_to_replica)
    proxy_replica_lost.install(proxy)


def _http_proxy() -> Any:
    http = object.__new__(proxy.HTTPProxy)
    http.request_timeout_s, http.self_actor_name, http.asgi_receive_queues = None, "proxy", {}
    return http


def _http_call(replicas: list[str], body: bytes = b'{"q": 1}') -> tuple[list[Any], _Handle]:
    http = _http_proxy()
    handle = _Handle(http, replicas)
    chunks = [{"type": "http.request", "body": body[:3], "more_body": True},
              {"type": "http.request", "body": body[3:], "more_body": False}]

    async def receive() -> dict[str, Any]:
        if chunks:
            return chunks.pop(0)
        await asyncio.Event().wait()  # the client stays connected
        return {"type": "http.disconnect"}

    scope = {"type": "http", "method": "POST", "path": "/v1/chat/completions", "headers": [], "query_string": b"",
             "root_path": "", "client": ("127.0.0.1", 1)}
    request = ASGIProxyRequest(scope, receive, None)  # type: ignore[arg-type]

    async def run() -> list[Any]:
        return [m async for m in http.send_request_to_replica("r1", "internal-1", handle, request)]
    return asyncio.run(run()), handle


def test_a_request_lost_before_any_output_is_sent_again_with_its_body(installed: None) -> None:
    messages, handle = _http_call(["dies", "answers"])
    assert handle.calls == 2
    assert messages[0]["status"] == 200 and messages[1]["body"] == b'echo {"q": 1}'  # the body, replayed
    assert messages[-1].code == "200"
    assert proxy_resend._attempts == {}


def test_resends_are_bounded_then_the_answer_is_503(installed: None) -> None:
    messages, handle = _http_call(["dies"])
    assert handle.calls == 1 + proxy_resend.MAX_RESENDS
    assert messages[0]["status"] == 503 and messages[-1].code == 503


def test_nothing_is_resent_once_output_started(installed: None) -> None:
    messages, handle = _http_call(["started-then-dies", "answers"])
    assert handle.calls == 1
    assert messages[1]["body"] == b"data: {}\n\n"
    assert json.loads(messages[2]["body"].split(b"\n\n")[0].removeprefix(b"data: "))["error"]["code"] == 503


def test_a_body_over_the_limit_is_not_resent(installed: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(proxy_resend, "REPLAY_BODY_LIMIT", 4)
    messages, handle = _http_call(["dies", "answers"])
    assert handle.calls == 1 and messages[0]["status"] == 503


def test_a_grpc_call_lost_before_any_output_is_sent_again(installed: None) -> None:
    grpc_proxy = object.__new__(proxy.gRPCProxy)
    grpc_proxy.request_timeout_s = None
    grpc_proxy._setup_grpc_tracing = lambda *args: None  # type: ignore[method-assign]
    grpc_proxy._finalize_grpc_tracing = lambda *args: None  # type: ignore[method-assign]
    handle = _Handle(grpc_proxy, ["grpc"])
    request = types.SimpleNamespace(request_type="grpc", has_input_stream=False, context=None,
                                    serialized_replica_arg=lambda: b"request")

    async def run() -> list[Any]:
        return [m async for m in grpc_proxy.send_request_to_replica("r2", "internal-2", handle, request)]
    messages = asyncio.run(run())
    assert handle.calls == 2 and messages[0] == b"answer" and messages[-1].code == grpc.StatusCode.OK
