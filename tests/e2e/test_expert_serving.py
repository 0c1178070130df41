"""Router replicas over expert shards: the served app with the `ray` transport (two router
replicas sharing one set of shards) and the `deepspeed` transport gives the local app's tokens."""

from __future__ import annotations

import httpx2 as httpx
import pytest

from tests import openai_check
from tests.e2e.support import Server

PROMPTS = [[1, 1784, 1500, 9001, 72], [1] + list(range(2000, 2030))]


@pytest.fixture(scope="module")
def ep_server(server: Server) -> Server:
    main = server.apps["main"]
    extra = {
        "ep-ray": main.model_copy(update={"app_name": "ep-ray", "route_prefix": "/ep-ray", "transport": "ray",
                                          "num_expert_shards": 2, "num_router_replicas": 2}),
        "ep-ds": main.model_copy(update={"app_name": "ep-ds", "route_prefix": "/ep-ds", "transport": "deepspeed",
                                         "num_expert_shards": 2}),
    }
    server.apps.update(extra)
    yield server
    for name in extra:
        server.remove(name)


def _tokens(server: Server, app: str, prompt: list[int]) -> list[int]:
    r = httpx.post(server.url("/v1/completions", app), headers=server.headers, timeout=120, json={
        "prompt": prompt, "max_tokens": 16, "temperature": 0, "ignore_eos": True, "return_token_ids": True})
    return openai_check.body(r)["choices"][0]["token_ids"]


@pytest.mark.parametrize("app", ["ep-ray", "ep-ds"])
def test_expert_parallel_apps_match_local(ep_server: Server, app: str) -> None:
    for prompt in PROMPTS:
        assert _tokens(ep_server, app, prompt) == _tokens(ep_server, "main", prompt), f"{app}: {prompt}"
    ep_server.wait_idle(app)
