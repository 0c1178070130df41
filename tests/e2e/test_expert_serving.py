"""Engine replicas over expert shards: the served app with the `ray` transport (two engine
replicas sharing one set of shards) and the `deepspeed` transport gives the local app's tokens.
Their lifetime: the ray transport's registry is the engine deployment's own actor, so an engine
replica leaving on downscale leaves it (and the shards) alone, engines join the one Serve
recreates after it died, and deleting the applications leaves no registry, shard or placement
group behind."""

from __future__ import annotations

import time
from typing import Any

import httpx2 as httpx
import pytest
import ray
from ray import serve
from ray.util.state import list_actors

from deployments.app import ENGINE_DEPLOYMENT
from deployments.config import AppConfig
from tests import openai_check
from tests.e2e.support import Server

pytestmark = pytest.mark.slow  # two more applications, each with its expert shards

PROMPTS = [[1, 1784, 1500, 9001, 72], [1] + list(range(2000, 2030))]
EXPERT_CLASSES = ("ShardWorker", "ShardRegistry", "ExpertRegistry")
FAST = {"upscale_delay_s": 1, "downscale_delay_s": 2, "look_back_period_s": 2, "metrics_interval_s": 0.5}


def expert_state() -> tuple[set[str], set[str]]:
    """(alive actors of the expert classes, placement groups not removed)."""
    actors = {a.actor_id for a in list_actors(filters=[("state", "=", "ALIVE")], limit=10_000)
              if a.class_name.split(".")[-1] in EXPERT_CLASSES}
    groups = {pg_id for pg_id, pg in ray.util.placement_group_table().items() if pg["state"] != "REMOVED"}
    return actors, groups


def named_actors_of(apps: tuple[str, ...]) -> list[str]:
    return [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if any(app in a["name"] for app in apps)]


@pytest.fixture(scope="module")
def before_experts(server: Server) -> tuple[set[str], set[str]]:
    """The expert actors and placement groups before this module deploys its apps."""
    server.app("main")
    return expert_state()


@pytest.fixture(scope="module")
def ep_server(server: Server, before_experts) -> Server:
    main = server.apps["main"].model_dump(exclude_unset=True)
    extra = {
        # Two engine replicas to start with, one when idle: the downscale test watches one leave.
        "ep-ray": AppConfig.model_validate({
            **main, "app_name": "ep-ray", "route_prefix": "/ep-ray", "transport": "ray", "num_expert_shards": 2,
            "num_engine_replicas": 2,
            "autoscaling": {"engine": {"min_replicas": 1, "max_replicas": 2, **FAST},
                            "ingress": {"min_replicas": 1, "max_replicas": 1}}}),
        "ep-ds": AppConfig.model_validate({**main, "app_name": "ep-ds", "route_prefix": "/ep-ds",
                                           "transport": "deepspeed", "num_expert_shards": 2}),
    }
    server.apps.update(extra)
    yield server
    for name in extra:
        if name in server.apps:
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


def _registry(app: str) -> tuple[str, Any]:
    """The name and handle of the engine deployment's expert registry (a Serve deployment actor)."""
    prefix = f"SERVE_DEPLOYMENT_ACTOR::{app}::{ENGINE_DEPLOYMENT}::"
    (name,) = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith(prefix)]
    return name, ray.get_actor(name, namespace="serve")


def _running_engines(app: str) -> int:
    deployment = serve.status().applications[app].deployments[ENGINE_DEPLOYMENT]
    return deployment.replica_states.get("RUNNING", 0)


def test_an_engine_replica_leaving_on_downscale_leaves_the_registry(ep_server: Server) -> None:
    expected = _tokens(ep_server, "main", PROMPTS[1])
    assert _tokens(ep_server, "ep-ray", PROMPTS[1]) == expected
    name, registry = _registry("ep-ray")
    shards = ray.get(registry.current.remote())[0]
    ids = [s._actor_id.hex() for s in shards]
    deadline = time.monotonic() + 180
    while _running_engines("ep-ray") != 1:  # idle: the engine policy steps down to min_replicas
        assert time.monotonic() < deadline, f"ep-ray never scaled down: {serve.status().applications['ep-ray']}"
        time.sleep(0.5)
    same_name, same = _registry("ep-ray")
    assert same_name == name and same._actor_id == registry._actor_id
    now = ray.get(same.current.remote())[0]
    assert [s._actor_id.hex() for s in now] == ids
    assert all(ray.get([s.ping.remote() for s in now], timeout=30))
    assert _tokens(ep_server, "ep-ray", PROMPTS[1]) == expected  # the replica left serves on the same shards


def test_engines_join_the_registry_serve_recreates(ep_server: Server) -> None:
    """A registry that dies (its shards and placement group with it) is recreated by Serve; the
    engine's next exchange fails, it finds the successor (new shards, new wire secret) and the
    request still gets the local app's tokens."""
    expected = _tokens(ep_server, "main", PROMPTS[0])
    _, registry = _registry("ep-ray")
    old = {s._actor_id for s in ray.get(registry.current.remote())[0]}
    ray.kill(registry, no_restart=True)
    assert _tokens(ep_server, "ep-ray", PROMPTS[0]) == expected
    _, successor = _registry("ep-ray")
    assert successor._actor_id != registry._actor_id
    assert old.isdisjoint(s._actor_id for s in ray.get(successor.current.remote())[0])


def test_deleting_the_apps_leaves_no_registry_shard_or_placement_group(ep_server: Server, before_experts) -> None:
    apps = ("ep-ray", "ep-ds")
    for app in apps:
        _tokens(ep_server, app, PROMPTS[0])  # deployed and serving
    actors, groups = expert_state()
    assert actors - before_experts[0] and groups - before_experts[1], "no expert actors or placement groups ran"
    assert named_actors_of(apps)
    for app in apps:
        ep_server.remove(app)
    deadline = time.monotonic() + 120
    while (left := expert_state()) != before_experts or named_actors_of(apps):
        assert time.monotonic() < deadline, (
            f"left after serve.delete: actors {left[0] - before_experts[0]}, placement groups "
            f"{left[1] - before_experts[1]}, named actors {named_actors_of(apps)}")
        time.sleep(0.5)
