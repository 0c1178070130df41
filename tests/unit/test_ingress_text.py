"""The ingress makes the text of the engine's token deltas (no Ray: the engine server's handle is
stood in for by an in-process AsyncEngine): a request that ends inside a multi-byte character keeps
its tail over HTTP, whole and streamed; a stop string found by the ingress aborts the request in
the engine and frees its blocks."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from starlette.testclient import TestClient

from cluster import LLM
from cluster.engine.async_engine import AsyncEngine
from cluster.model.tokenizer import Tokenizer
from deployments.api.http_app import create_http_app
from deployments.config import AppConfig
from deployments.frontend.ingress_core import IngressCore
from deployments.serving.request import GenerateRequest, ModelInfo
from tests import openai_check
from tests.unit.test_outputs import utf8_tail_script

KEY = "k"
HEADERS = {"Authorization": f"Bearer {KEY}"}


class _Call:
    """One streaming `generate` call; `cancel` does what Serve's cancellation does at the replica."""

    def __init__(self, engine: AsyncEngine, request: GenerateRequest) -> None:
        self._engine, self._id = engine, request.request_id
        self._gen = engine.stream(request.request_id, list(request.prompt_token_ids), request.params, request.images)

    async def __anext__(self) -> Any:
        return await self._gen.__anext__()

    def cancel(self) -> None:
        self._engine.abort(self._id)


class LocalEngineHandle:
    """The calls the ingress makes on the engine server's DeploymentHandle, on an in-process engine."""

    def __init__(self, engine: AsyncEngine, info: ModelInfo) -> None:
        self.engine, self._info = engine, info
        self.generate = SimpleNamespace(remote=lambda request: _Call(engine, request))
        self.info = SimpleNamespace(remote=self._answer(lambda: self._info))
        self.stats = SimpleNamespace(remote=self._answer(engine.stats))

    def options(self, **_: Any) -> LocalEngineHandle:
        return self

    @staticmethod
    def _answer(value: Any) -> Any:
        async def remote() -> Any:
            return value()
        return remote


@pytest.fixture(scope="module")
def served(tiny_ckpt: Path, make_ckpt) -> Iterator[tuple[TestClient, AsyncEngine, Tokenizer]]:
    t = Tokenizer.from_model_dir(tiny_ckpt)
    model_dir = make_ckpt("utf8-tail", preset="tiny", seed=3, script=utf8_tail_script(t))
    engine = AsyncEngine(LLM(model_dir, max_model_len=256).engine)
    info = ModelInfo(name="scripted", model_dir=str(model_dir), vocab_size=t.vocab_size, max_model_len=256,
                     has_vision=False)
    config = AppConfig(model=str(model_dir), api_keys=[KEY])
    core = IngressCore(LocalEngineHandle(engine, info), config)
    with TestClient(create_http_app(lambda: core, config)) as http:
        yield http, engine, t
    engine.shutdown()


def _events(http: TestClient, path: str, body: dict[str, Any]) -> list[dict[str, Any]]:
    with http.stream("POST", path, json={**body, "stream": True}, headers=HEADERS) as r:
        return list(openai_check.chunks(r))


def _whole(http: TestClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    return openai_check.body(http.post(path, json=body, headers=HEADERS))


def test_http_answers_ending_inside_a_character_keep_their_tail(served) -> None:
    http, engine, t = served
    script = utf8_tail_script(t)
    cut = len(script) - 1  # two of the euro sign's three bytes
    want = t.decode(script[:cut])
    assert want.endswith("\ufffd")
    body = {"prompt": [1, 5000], "max_tokens": cut, "temperature": 0, "return_token_ids": True}
    whole = _whole(http, "/v1/completions", body)["choices"][0]
    assert whole["text"] == want and whole["finish_reason"] == "length"
    chunks = _events(http, "/v1/completions", body)
    assert "".join(c["choices"][0]["text"] for c in chunks) == want

    chat = {"messages": [{"role": "user", "content": "Price?"}], "max_tokens": cut, "temperature": 0}
    assert _whole(http, "/v1/chat/completions", chat)["choices"][0]["message"]["content"] == want
    chunks = _events(http, "/v1/chat/completions", chat)
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) == want
    assert engine.stats().kv_blocks_used == 0


def test_a_stop_string_found_by_the_ingress_aborts_the_request_in_the_engine(served) -> None:
    http, engine, t = served
    before = engine.stats()
    body = {"prompt": [1, 5000], "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stop": [": 5"]}
    chunks = _events(http, "/v1/completions", body)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Prix"
    last = chunks[-1]["choices"][0]
    assert last["finish_reason"] == "stop" and last["stop_reason"] == ": 5"
    whole = _whole(http, "/v1/completions", {**body, "stop": ["€"]})
    assert whole["choices"][0]["text"] == "Prix: 5" and whole["choices"][0]["stop_reason"] == "€"
    after = engine.stats()  # drains the aborts the ingress sent
    assert after.aborts == before.aborts + 2 and after.kv_blocks_used == 0 and after.num_running == 0
    assert after.generation_tokens - before.generation_tokens < 2 * 20  # not run on to max_tokens
