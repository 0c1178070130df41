"""The ingress makes the text of the engine's token deltas (no Ray: the engine server's handle is
stood in for by an in-process AsyncEngine): a request that ends inside a multi-byte character keeps
its tail over HTTP, whole and streamed; a stop string found by the ingress aborts the request in
the engine and frees its blocks."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import openai.types as oai
import openai.types.chat as oai_chat
import pytest
from starlette.testclient import TestClient

from cluster import LLM
from cluster.engine.async_engine import AsyncEngine
from cluster.model.tokenizer import Tokenizer
from deployments.api.http_app import create_http_app
from deployments.config import AppConfig
from deployments.frontend.ingress_core import IngressCore
from deployments.serving.request import GenerateRequest, ModelInfo
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
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[len("data: "):]) for line in lines[:-1]]


def test_http_answers_ending_inside_a_character_keep_their_tail(served) -> None:
    http, engine, t = served
    script = utf8_tail_script(t)
    cut = len(script) - 1  # two of the euro sign's three bytes
    want = t.decode(script[:cut])
    assert want.endswith("\ufffd")
    body = {"prompt": [1, 5000], "max_tokens": cut, "temperature": 0, "return_token_ids": True}
    whole = oai.Completion.model_validate(http.post("/v1/completions", json=body, headers=HEADERS).json())
    assert whole.choices[0].text == want and whole.choices[0].finish_reason == "length"
    chunks = _events(http, "/v1/completions", body)  # (`Completion` allows no unfinished chunk)
    assert "".join(c["choices"][0]["text"] for c in chunks) == want

    chat = {"messages": [{"role": "user", "content": "Price?"}], "max_tokens": cut, "temperature": 0}
    r = oai_chat.ChatCompletion.model_validate(http.post("/v1/chat/completions", json=chat, headers=HEADERS).json())
    assert r.choices[0].message.content == want
    chunks = [oai_chat.ChatCompletionChunk.model_validate(e) for e in _events(http, "/v1/chat/completions", chat)]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert engine.stats().kv_blocks_used == 0


def test_a_stop_string_found_by_the_ingress_aborts_the_request_in_the_engine(served) -> None:
    http, engine, t = served
    before = engine.stats()
    body = {"prompt": [1, 5000], "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stop": [": 5"]}
    chunks = _events(http, "/v1/completions", body)
    assert "".join(c["choices"][0]["text"] for c in chunks) == "Prix"
    last = oai.Completion.model_validate(chunks[-1]).choices[0]
    assert last.finish_reason == "stop" and last.model_extra["stop_reason"] == ": 5"
    whole = http.post("/v1/completions", json={**body, "stop": ["€"]}, headers=HEADERS).json()
    assert whole["choices"][0]["text"] == "Prix: 5" and whole["choices"][0]["stop_reason"] == "€"
    after = engine.stats()  # drains the aborts the ingress sent
    assert after.aborts == before.aborts + 2 and after.kv_blocks_used == 0 and after.num_running == 0
    assert after.generation_tokens - before.generation_tokens < 2 * 20  # not run on to max_tokens
