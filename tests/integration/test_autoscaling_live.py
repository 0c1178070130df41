"""Autoscaling of the real application on the session's local Ray cluster: a load of few long
prompts fills the engines' KV cache while the ongoing requests stay far under the ingress target;
`deployments.telemetry.autoscaling:EngineAutoscalingPolicy`, fed by the engine servers'
`record_autoscaling_stats()`, scales the engine servers up, and the end of the load scales them down
again. A trickle of short requests runs through both changes; no request fails.

The engines run the `deepspeed` transport with `autoscaling.experts`: each engine replica is a
whole expert group (the engine and its own expert shard), so the scale-up adds a group (a second
shard actor appears) and the scale-down removes one (its shard goes with its engine). The replicas
report the expert signals (exchange latency, expert load) beside KV use and queue.

Small KV pools (32 blocks of 16 tokens: one long request takes most of a replica) and short
autoscaling delays and intervals, all from the application's config, keep it to about a minute.
Serve runs with its own ports and is shut down at the end of the module."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx2 as httpx
import pytest

from deployments.app import ENGINE_DEPLOYMENT
from deployments.config import AppConfig
from deployments.telemetry.signals import EXCHANGE_LATENCY_KEY, EXPERT_LOAD_KEY
from tests import openai_check
from tests.ray_session import free_port

pytestmark = pytest.mark.slow

APP = "moe-autoscale"
LONG_PROMPT = list(range(1000, 1300))  # 300 tokens: 19 blocks, 28 with its answer, of a 32-block pool
LONG_TOKENS = 150
SHORT_TOKENS = 4
FAST = {"upscale_delay_s": 1, "downscale_delay_s": 3, "look_back_period_s": 2, "metrics_interval_s": 0.5}


@dataclass
class Results:
    ok: dict[str, int] = field(default_factory=lambda: {"long": 0, "short": 0})
    failed: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def check(self, kind: str, response: httpx.Response, tokens: int) -> None:
        with self.lock:
            try:
                body = openai_check.body(response)
                if body["choices"][0]["finish_reason"] == "length" and body["usage"]["completion_tokens"] == tokens:
                    self.ok[kind] += 1
                    return
            except Exception:  # noqa: BLE001 - reported below
                pass
            self.failed.append(f"{kind}: {response.status_code} {response.text[:300]}")


def _client_loop(stop: threading.Event, url: str, body: dict, kind: str, tokens: int, results: Results,
                 pause_s: float) -> None:
    with httpx.Client(timeout=120) as client:
        while not stop.is_set():
            try:
                results.check(kind, client.post(url, json=body), tokens)
            except Exception as exc:  # noqa: BLE001 - a failed request is what the test looks for
                with results.lock:
                    results.failed.append(f"{kind}: {exc!r}")
            stop.wait(pause_s)


def _running(deployment: str) -> int:
    from ray import serve

    app = serve.status().applications.get(APP)
    if app is None or deployment not in app.deployments:
        return 0
    return app.deployments[deployment].replica_states.get("RUNNING", 0)


def _alive_shards() -> int:
    from ray.util.state import list_actors

    return len(list_actors(filters=[("class_name", "=", "ShardWorker"), ("state", "=", "ALIVE")], limit=1000))


def _free_slots() -> tuple[float, float]:
    """(free, total) `expert_slot` resources: a group's placement group holds one per shard."""
    import ray

    return ray.available_resources().get("expert_slot", 0.0), ray.cluster_resources().get("expert_slot", 0.0)


def _engine_stats() -> dict[str, float]:
    from ray import serve

    return serve.get_deployment_handle(ENGINE_DEPLOYMENT, APP).record_autoscaling_stats.remote().result(timeout_s=30)


def _wait(what: str, condition: Callable[[], bool], timeout_s: float, seen: list) -> float:
    started = time.monotonic()
    while not condition():
        assert time.monotonic() - started < timeout_s, f"{what} not within {timeout_s}s; replicas seen: {seen[-20:]}"
        time.sleep(0.5)
    return time.monotonic() - started


@dataclass(frozen=True)
class Before:
    """The shared cluster before this module's app: shard actors alive, free expert slots."""

    shards: int
    free_slots: float


@pytest.fixture(scope="module")
def before(ray_session, expert_nodes) -> Before:
    return Before(_alive_shards(), _free_slots()[0])


@pytest.fixture(scope="module")
def app_url(ray_session, before: Before, tiny_ckpt: Path):
    from ray import serve

    from deployments.app import build_app, grpc_options, http_options

    config = AppConfig(
        model=str(tiny_ckpt), app_name=APP, http_port=free_port(), grpc_port=free_port(), ingress_num_cpus=0,
        engine_num_cpus=0, vision={"num_replicas": 0}, transport="deepspeed", num_expert_shards=1,
        engine={"block_size": 16, "num_kv_blocks": 32, "max_model_len": 512, "max_num_seqs": 4},
        autoscaling={"ingress": {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 8, **FAST},
                     "engine": {"target_kv_usage": 0.5, "target_waiting": 1},
                     # a latency target this loose never triggers here: KV use drives the groups
                     "experts": {"min_groups": 1, "max_groups": 2, "target_exchange_latency_s": 60, **FAST}})
    ray_session.serve(http_options(config), grpc_options(config))
    try:
        serve.run(build_app(config), name=APP, route_prefix="/")
        yield f"http://127.0.0.1:{config.http_port}/v1/completions"
    finally:
        ray_session.stop_serve()
        # Every group released its placement on the way out: the next tests need the slots.
        _wait("every expert slot free after shutdown", lambda: _free_slots()[0] == before.free_slots, 60, [])


def test_long_prompts_scale_engines_up_and_their_end_scales_them_down(before: Before, app_url: str) -> None:
    results, seen = Results(), []
    stop_long, stop_short = threading.Event(), threading.Event()
    long_body = {"prompt": LONG_PROMPT, "max_tokens": LONG_TOKENS, "ignore_eos": True, "temperature": 0}
    short_body = {"prompt": "Hi", "max_tokens": SHORT_TOKENS, "ignore_eos": True, "temperature": 0}
    threads = [threading.Thread(target=_client_loop, args=(stop_short, app_url, short_body, "short", SHORT_TOKENS,
                                                           results, 0.3), daemon=True)]
    threads += [threading.Thread(target=_client_loop, args=(stop_long, app_url, long_body, "long", LONG_TOKENS,
                                                            results, 0.0), daemon=True) for _ in range(2)]

    def replicas() -> tuple[int, int]:
        now = (_running("Ingress"), _running(ENGINE_DEPLOYMENT))
        seen.append(now)
        return now

    assert replicas() == (1, 1)
    assert _alive_shards() == before.shards + 1  # the first group: one engine, its one shard
    assert _free_slots()[0] == before.free_slots - 1
    for t in threads:
        t.start()
    try:
        # Two long requests at a time: KV use over its target (0.5) on one engine, ongoing requests
        # (2 + the trickle) far under the ingress target of 8.
        up_s = _wait("scale-up to 2 engines", lambda: replicas()[1] == 2, 120, seen)
        assert _alive_shards() == before.shards + 2  # a whole group: the new engine came up with its own shard
        long_before = results.ok["long"]
        _wait("a long request on two engines", lambda: results.ok["long"] > long_before, 60, seen)
        # Measured under load, since the replica's previous report (its first report has none: a rate needs two).
        reported: list[dict[str, float]] = []
        _wait("expert signals in an engine's autoscaling stats", lambda: reported.append(_engine_stats()) or (
            reported[-1].get(EXCHANGE_LATENCY_KEY, 0) > 0 and reported[-1].get(EXPERT_LOAD_KEY, 0) > 0), 30, reported)
        stop_long.set()
        for t in threads[1:]:
            t.join(timeout=120)
        down_s = _wait("scale-down to 1 engine", lambda: replicas()[1] == 1, 90, seen)
        _wait("the removed group's shard gone", lambda: _alive_shards() == before.shards + 1, 60, seen)
        _wait("the removed group's placement released", lambda: _free_slots()[0] == before.free_slots - 1, 60, seen)
        short_before = results.ok["short"]
        _wait("short requests answered past the removal", lambda: results.ok["short"] >= short_before + 2, 30, seen)
    finally:
        stop_long.set()
        stop_short.set()
        for t in threads:
            t.join(timeout=120)
    print(f"scale-up after {up_s:.1f}s, scale-down {down_s:.1f}s after the load; requests: {results.ok}")
    assert not results.failed, results.failed
    assert results.ok["long"] >= 3 and results.ok["short"] >= 10, results.ok
    assert max(ingress for ingress, _ in seen) == 1, f"the ingress scaled on ongoing requests: {seen}"
