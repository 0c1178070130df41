"""An engine replica that dies under a request (no Ray: the engine server's handle is stood in for
by an in-process AsyncEngine whose calls fail as Serve's do when the replica's actor died): a call
that had received nothing is sent again and the client sees a normal answer; a call that had
received outputs ends with a retryable error: an SSE error event (503, service_unavailable) then
[DONE], or a 503 for a whole answer. The engine is left with nothing running and no block held."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from ray.exceptions import ActorDiedError
from starlette.testclient import TestClient

from cluster import LLM
from cluster.engine.async_engine import AsyncEngine
from cluster.model.tokenizer import Tokenizer
from deployments.api.http_app import create_http_app
from deployments.config import AppConfig
from deployments.frontend.engine_client import RETRIES_BEFORE_OUTPUT
from deployments.frontend.ingress_core import IngressCore
from deployments.serving.request import GenerateRequest, ModelInfo
from tests.unit.test_ingress_text import LocalEngineHandle, _Call

KEY = "k"
HEADERS = {"Authorization": f"Bearer {KEY}"}
BODY = {"prompt": [1, 1784, 1500, 9001], "max_tokens": 8, "temperature": 0, "ignore_eos": True,
        "return_token_ids": True}


class _DyingCall(_Call):
    """A call whose replica dies after `outputs` outputs (the engine request is aborted, as the
    replica's death takes it along)."""

    def __init__(self, engine: AsyncEngine, request: GenerateRequest, outputs: int) -> None:
        super().__init__(engine, request)
        self._left = outputs

    async def __anext__(self) -> Any:
        if self._left == 0:
            self.cancel()
            raise ActorDiedError()
        self._left -= 1
        return await super().__anext__()


class DyingEngineHandle(LocalEngineHandle):
    """The first `deaths` calls die after `outputs` outputs each; later calls run normally."""

    def __init__(self, engine: AsyncEngine, info: ModelInfo) -> None:
        super().__init__(engine, info)
        self.deaths, self.outputs, self.calls = 0, 0, 0
        self.generate = SimpleNamespace(remote=self._generate)

    def _generate(self, request: GenerateRequest) -> _Call:
        self.calls += 1
        if self.calls <= self.deaths:
            return _DyingCall(self.engine, request, self.outputs)
        return _Call(self.engine, request)

    def arm(self, deaths: int, outputs: int) -> None:
        self.deaths, self.outputs, self.calls = deaths, outputs, 0


@pytest.fixture(scope="module")
def served(tiny_ckpt: Path) -> Iterator[tuple[TestClient, DyingEngineHandle]]:
    t = Tokenizer.from_model_dir(tiny_ckpt)
    engine = AsyncEngine(LLM(tiny_ckpt, max_model_len=256).engine)
    info = ModelInfo(name="tiny", model_dir=str(tiny_ckpt), vocab_size=t.vocab_size, max_model_len=256,
                     has_vision=False)
    config = AppConfig(model=str(tiny_ckpt), api_keys=[KEY])
    handle = DyingEngineHandle(engine, info)
    core = IngressCore(handle, config)
    with TestClient(create_http_app(lambda: core, config)) as http:
        yield http, handle
    engine.shutdown()


def _events(http: TestClient) -> list[dict[str, Any]]:
    with http.stream("POST", "/v1/completions", json={**BODY, "stream": True}, headers=HEADERS) as r:
        assert r.status_code == 200
        lines = [line.removeprefix("data: ") for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def _idle(handle: DyingEngineHandle) -> None:
    handle.engine.check_integrity()
    stats = handle.engine.stats()
    assert stats.num_running == stats.num_waiting == stats.kv_blocks_used == 0, stats


def test_a_call_whose_replica_died_before_any_output_is_sent_again(served) -> None:
    http, handle = served
    handle.arm(0, 0)
    expected = [t for e in _events(http) for t in e["choices"][0].get("token_ids") or []]
    assert len(expected) == BODY["max_tokens"]
    handle.arm(RETRIES_BEFORE_OUTPUT, 0)  # dies before its first output, as many times as are retried
    events = _events(http)
    assert handle.calls == RETRIES_BEFORE_OUTPUT + 1
    assert [t for e in events for t in e["choices"][0].get("token_ids") or []] == expected
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    _idle(handle)


def test_a_call_whose_replica_died_mid_stream_ends_with_a_retryable_error(served) -> None:
    http, handle = served
    handle.arm(1, 3)  # three outputs, then the replica dies
    events = _events(http)
    assert handle.calls == 1  # not sent again: the client had its first tokens
    error = events[-1]["error"]
    assert error["code"] == 503 and error["type"] == "service_unavailable" and "retry" in error["message"]
    assert 1 <= sum(len(e["choices"][0].get("token_ids") or []) for e in events[:-1] if e.get("choices")) <= 3
    _idle(handle)


def test_retries_exhausted_is_a_503(served) -> None:
    http, handle = served
    handle.arm(RETRIES_BEFORE_OUTPUT + 1, 0)
    r = http.post("/v1/completions", json=BODY, headers=HEADERS)
    assert r.status_code == 503 and r.headers["Retry-After"] == "1", r.text
    assert r.json()["error"]["type"] == "service_unavailable"
    assert handle.calls == RETRIES_BEFORE_OUTPUT + 1
    _idle(handle)


def test_a_chat_streams_every_token_id(served) -> None:
    """What the fault tests compare: a streamed chat's token ids are the whole answer's, including
    tokens whose text the chat parser holds back or that make none (this prompt has one)."""
    http, handle = served
    handle.arm(0, 0)
    body = {"messages": [{"role": "user", "content": "Request 5: tell me a story about the number 35."}],
            "max_tokens": 48, "temperature": 0, "ignore_eos": True, "return_token_ids": True}
    whole = http.post("/v1/chat/completions", json=body, headers=HEADERS).json()["choices"][0]["token_ids"]
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream": True}, headers=HEADERS) as r:
        chunks = [json.loads(line.removeprefix("data: ")) for line in r.iter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    streamed = [t for c in chunks for ch in c["choices"] for t in ch.get("token_ids") or []]
    assert len(whole) == 48 and streamed == whole
