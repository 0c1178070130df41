"""Serve's proxy, with the lost-replica statuses installed, answers a call whose ingress replica
died with 503 (an OpenAI error body, Retry-After) or, once an HTTP stream has started, a last SSE
error event and [DONE]; gRPC with UNAVAILABLE. Other failures keep Serve's statuses."""

from __future__ import annotations

import json
import types

import grpc
from ray.exceptions import ActorDiedError
from ray.serve._private import proxy

from deployments.grpc import proxy_replica_lost


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
