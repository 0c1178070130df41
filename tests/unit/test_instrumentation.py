"""deployments/instrumentation.py and the wiring of metrics and autoscaling into the app, without Ray:
per-request tracking (latencies, finish reasons, aborts by cause), the HTTP middleware (route
templates, statuses), the gRPC method wrapper, the router's instrumentation and autoscaling stats,
and the app's replica options from config."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from fastapi import FastAPI, HTTPException
from starlette.testclient import TestClient

from cluster.engine.output_aggregator import RequestOutput
from cluster.engine.stats import EngineStats, KVLoad
from deployments.config import AppConfig, ConfigError, parse_config
from deployments.errors import BadRequest, Unavailable
from deployments.telemetry import instrumentation as inst
from deployments.telemetry.autoscaling import (
    EXCHANGE_LATENCY_KEY,
    EXPERT_LOAD_KEY,
    KV_USAGE_KEY,
    RUNNING_KEY,
    WAITING_KEY,
    replica_options,
)
from deployments.telemetry.metrics import PREFIX, MetricDef, MetricSet, TimedDispatcher, shard_health

ROOT = Path(__file__).resolve().parents[2]


class Fake:
    """A MetricSet factory that keeps what each series got."""

    def __init__(self) -> None:
        self.values: dict[str, dict[tuple, list[float]]] = defaultdict(lambda: defaultdict(list))

    def __call__(self, definition: MetricDef) -> SimpleNamespace:
        store = self.values[definition.name.removeprefix(PREFIX)]

        def record(value: float = 1.0, tags: dict | None = None) -> None:
            store[tuple(sorted((tags or {}).items()))].append(value)

        return SimpleNamespace(inc=record, set=record, observe=record)

    def total(self, name: str, **tags: str) -> float:
        return sum(self.values[name][tuple(sorted(tags.items()))])

    def observed(self, name: str) -> list[float]:
        return self.values[name][()]


@pytest.fixture
def fake() -> tuple[Fake, MetricSet]:
    f = Fake()
    return f, MetricSet(f)


def out(tokens: int, finished: bool = False, reason: str | None = None, ids: tuple[int, ...] | None = None
        ) -> RequestOutput:
    """A delta output with `tokens` new tokens (what the ingress's engine streams yield)."""
    token_ids = ids if ids is not None else tuple(range(tokens))
    return RequestOutput("r", None, token_ids, "", finished, reason if finished else None)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# ---------------------------------------------------------------------------------------------
# RequestTracker
# ---------------------------------------------------------------------------------------------

def test_tracker_records_latencies_and_the_finish_reason_once_every_stream_ends(fake):
    f, ms = fake
    clock = Clock()
    t = inst.RequestTracker(metrics=ms, clock=clock)
    t.wrap(object()), t.wrap(object())
    clock.now = 100.5
    t.output(0, out(1))  # the request's first token: time to first token
    clock.now = 100.7
    t.output(1, out(2))
    clock.now = 101.0
    t.output(0, out(2, True, "length"))
    assert f.total("requests_finished_total", reason="length") == 0  # stream 1 still runs
    clock.now = 101.5
    t.output(1, out(0, True, "stop"))
    clock.now = 109.0
    assert t.close(None, 200) == "stop"
    assert f.observed("time_to_first_token_seconds") == [pytest.approx(0.5)]
    assert len(f.observed("inter_token_latency_seconds")) == 4
    assert f.observed("e2e_request_latency_seconds") == [pytest.approx(1.5)]  # at the last token, not at close
    assert f.total("requests_finished_total", reason="stop") == 1 and not f.values["aborts_total"]
    assert t.close(None, 200) == "stop" and f.total("requests_finished_total", reason="stop") == 1


def test_tracker_counts_chat_tool_calls(fake):
    f, ms = fake
    t = inst.RequestTracker(tool_calls_id=9, metrics=ms)
    t.wrap(object())
    t.output(0, out(1, ids=(9,)))
    t.output(0, out(2, True, "stop", ids=(5, 6)))  # the tool-calls token came in an earlier delta
    assert t.close() == "tool_calls"


@pytest.mark.parametrize(("exc", "status", "failed", "past_deadline", "cause"), [
    (asyncio.CancelledError(), None, False, False, "client"),
    (asyncio.CancelledError(), None, False, True, "deadline"),
    (None, inst.CLIENT_CLOSED, False, False, "client"),
    (None, 200, False, False, "client"),  # the response ended early without an error: the client left
    (None, 200, True, False, "error"),  # an error sent in-band in a stream
    (None, 504, False, False, "deadline"),
    (TimeoutError(), None, False, False, "deadline"),
    (Unavailable("gone"), None, False, False, "error"),
    (RuntimeError("bug"), None, False, False, "error"),
    (None, 500, False, False, "error"),
    (BadRequest("no"), None, False, False, None),  # refused, not a request that ran
    (None, 429, False, False, None),
])
def test_tracker_counts_an_unfinished_request_as_an_abort_by_cause(fake, exc, status, failed, past_deadline, cause):
    f, ms = fake
    clock = Clock()
    t = inst.RequestTracker(deadline_at=101.0, metrics=ms, clock=clock)
    t.wrap(object())
    t.output(0, out(1))
    if failed:
        t.failed()
    clock.now = 102.0 if past_deadline else 100.5
    assert t.close(exc, status) == cause
    assert f.total("aborts_total", cause=cause) == (1 if cause else 0)
    assert sum(sum(v) for v in f.values["requests_finished_total"].values()) == (1 if cause else 0)


def test_a_request_that_never_reached_the_engine_is_not_counted(fake):
    f, ms = fake
    assert inst.RequestTracker(metrics=ms).close(Unavailable("loading"), 503) is None
    assert not f.values["requests_finished_total"]


def test_streams_opened_in_a_tracked_request_are_observed():
    class Gen:
        def __init__(self, items):
            self.items, self.cancelled = list(items), False

        async def __anext__(self):
            if not self.items:
                raise StopAsyncIteration
            item = self.items.pop(0)
            if isinstance(item, Exception):
                raise item
            return item

        def cancel(self):
            self.cancelled = True

    async def main():
        plain = Gen([])
        assert inst.observe_stream(plain) is plain  # outside a tracked request: untouched
        tracker = inst.RequestTracker.begin(deadline_s=30)
        ok, bad = inst.observe_stream(Gen([out(1), out(2, True, "length")])), inst.observe_stream(Gen([RuntimeError()]))
        assert [o.token_ids for o in [x async for x in ok]] == [(0,), (0, 1)]
        with pytest.raises(RuntimeError):
            await bad.__anext__()
        bad.cancel()
        assert bad._inner.cancelled and tracker._error and tracker.streams == 2
        tracker.close()
        assert inst.observe_stream(plain) is plain  # a closed tracker observes no more

    asyncio.run(main())


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------

def http_app(ms: MetricSet) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/items/{item_id}")
    async def item(item_id: str) -> dict:
        if item_id == "boom":
            raise RuntimeError("boom")
        if item_id == "missing":
            raise HTTPException(404)
        return {"id": item_id}

    class Guard:  # answers before routing, like deployments.api.http_guards
        def __init__(self, app):
            self.app = app

        async def __call__(self, scope, receive, send):
            if scope["type"] == "http" and scope["path"].endswith("/locked"):
                await send({"type": "http.response.start", "status": 401, "headers": []})
                await send({"type": "http.response.body", "body": b""})
                return
            await self.app(scope, receive, send)

    app.add_middleware(Guard)
    app.add_middleware(inst.HttpMetricsMiddleware, metrics=ms)
    return app


def test_http_statuses_are_counted_by_route_template(fake):
    f, ms = fake
    client = TestClient(http_app(ms), raise_server_exceptions=False)
    for path in ("/v1/items/a", "/v1/items/b", "/v1/items/missing", "/v1/items/locked", "/nowhere", "/v1/items/boom"):
        client.get(path)
    client.post("/v1/items/a")
    got = {dict(k)["route"] + " " + dict(k)["code"]: sum(v) for k, v in f.values["http_responses_total"].items()}
    assert got == {"/v1/items/{item_id} 200": 2, "/v1/items/{item_id} 404": 1, "/v1/items/{item_id} 401": 1,
                   "<unmatched> 404": 1, "/v1/items/{item_id} 500": 1, "/v1/items/{item_id} 405": 1}


def test_the_ingress_app_counts_guard_refusals_under_their_route(fake, tiny_ckpt, monkeypatch):
    from deployments.api.http_app import create_http_app

    f, ms = fake
    monkeypatch.setattr(inst, "ApiMetrics", lambda metrics=None, _real=inst.ApiMetrics: _real(ms))
    app = create_http_app(lambda: None, AppConfig(model=str(tiny_ckpt), api_keys=["k"]))
    client = TestClient(app)
    assert client.post("/v1/chat/completions", json={}).status_code == 401
    assert client.get("/health").status_code == 200
    routes = {dict(k)["route"] + " " + dict(k)["code"] for k in f.values["http_responses_total"]}
    assert routes == {"/v1/chat/completions 401", "/health 200"}


# ---------------------------------------------------------------------------------------------
# gRPC
# ---------------------------------------------------------------------------------------------

class Ctx:
    def __init__(self, metadata=()):
        self._metadata, self._code = list(metadata), None

    def invocation_metadata(self):
        return self._metadata

    def set_code(self, code):
        self._code = code

    def code(self):
        return self._code


class Methods:
    core = SimpleNamespace(config=SimpleNamespace(request_timeout_s=None), tokenizer=SimpleNamespace(tool_calls_id=9))

    @inst.observe_grpc
    async def Generate(self, request, grpc_context):  # noqa: N802
        if request == "bad":
            import grpc

            grpc_context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
        return "reply"

    @inst.observe_grpc
    async def GenerateStream(self, request, grpc_context):  # noqa: N802
        for i in range(3):
            await asyncio.sleep(0)
            yield i


def test_grpc_calls_are_counted_by_method_and_code(fake, monkeypatch):
    import inspect

    f, ms = fake
    monkeypatch.setattr(inst, "ApiMetrics", lambda metrics=None, _real=inst.ApiMetrics: _real(ms))
    m = Methods()
    assert inspect.isasyncgenfunction(Methods.GenerateStream) and not inspect.isasyncgenfunction(Methods.Generate)
    assert "grpc_context" in inspect.signature(Methods.Generate).parameters  # Serve passes it by name

    async def main():
        assert await m.Generate("ok", Ctx()) == "reply"
        await m.Generate("bad", Ctx())
        assert [x async for x in m.GenerateStream("ok", Ctx())] == [0, 1, 2]
        # Cancelled past the deadline the proxy forwarded: DEADLINE_EXCEEDED, not CANCELLED.
        import time

        for deadline in (time.time() - 1, time.time() + 60):
            stream = m.GenerateStream("ok", Ctx([(inst.DEADLINE_METADATA, str(deadline))]))
            await stream.__anext__()
            await stream.aclose()

    asyncio.run(main())
    codes = {dict(k)["method"] + " " + dict(k)["code"]: sum(v) for k, v in f.values["grpc_responses_total"].items()}
    assert codes == {"Generate OK": 1, "Generate INVALID_ARGUMENT": 1, "GenerateStream OK": 1,
                     "GenerateStream DEADLINE_EXCEEDED": 1, "GenerateStream CANCELLED": 1}


def test_grpc_code_of_a_context_without_a_code_method():
    assert inst.grpc_code_name(SimpleNamespace(code=None)) == "OK"
    assert inst.grpc_code_name(SimpleNamespace(code=None), asyncio.CancelledError()) == "CANCELLED"
    assert inst.grpc_code_name(SimpleNamespace(code="UNAVAILABLE")) == "UNAVAILABLE"


def test_the_proxy_forwards_the_client_deadline(monkeypatch):
    import time

    from ray.serve._private import proxy_request_response as prr

    from deployments.grpc import proxy_fix as grpc_proxy_fix

    monkeypatch.setattr(prr, "RayServegRPCContext", prr.RayServegRPCContext)
    grpc_proxy_fix._forward_deadlines()

    class ServicerContext:
        def __init__(self, remaining):
            self.remaining = remaining

        def time_remaining(self):
            return self.remaining

        def invocation_metadata(self):
            return [("authorization", "Bearer k")]

        def trailing_metadata(self):
            return []

        def __getattr__(self, name):
            return lambda *a: None

    with_deadline = prr.RayServegRPCContext(ServicerContext(5.0))
    deadline = inst._deadline_unix(with_deadline)
    assert deadline == pytest.approx(time.time() + 5.0, abs=1)
    assert ("authorization", "Bearer k") in with_deadline.invocation_metadata()
    assert inst._deadline_unix(prr.RayServegRPCContext(ServicerContext(None))) is None


# ---------------------------------------------------------------------------------------------
# Router
# ---------------------------------------------------------------------------------------------

class FakeAsyncEngine:
    def __init__(self, load=True):
        import threading

        self._lock = threading.Lock()
        self.engine = SimpleNamespace(
            counters=SimpleNamespace(reforms=[]),
            dispatcher=SimpleNamespace(dispatch=lambda *a: "out", token_counts=lambda: {0: [1, 3]}))
        self.load = KVLoad(free_blocks=24, reserved_blocks=4, total_blocks=32, block_size=16, num_running=2,
                           num_waiting=3) if load else None

    def stats(self):
        return EngineStats(num_running=2, num_waiting=1, kv_blocks_used=16, kv_blocks_total=32, num_preemptions=0,
                           forward_calls=1, prompt_tokens=5, generation_tokens=7, aborts=0)


def test_router_instrumentation_times_exchanges_and_reports_autoscaling_stats(fake):
    f, ms = fake
    engine = FakeAsyncEngine()
    router = inst.RouterInstrumentation(engine, "local", metrics=ms, start=False)
    assert isinstance(engine.engine.dispatcher, TimedDispatcher)
    assert engine.engine.dispatcher.dispatch(0) == "out"
    assert len(f.values["expert_exchange_latency_seconds"][(("transport", "local"),)]) == 1
    assert router.autoscaling_stats() == {KV_USAGE_KEY: 0.25, WAITING_KEY: 3.0, RUNNING_KEY: 2.0}
    assert inst.RouterInstrumentation(FakeAsyncEngine(load=False), "local", metrics=ms,
                                      start=False).autoscaling_stats()[KV_USAGE_KEY] == 0.5
    router.poll()
    assert f.total("generation_tokens_total") == 7 and f.values["kv_usage_ratio"][()] == [0.5]
    assert not f.values["shard_up"]  # local transport: no shards of its own
    # After a poll the expert signals ride along: the exchange timed above, no load rate yet (one reading).
    after = router.autoscaling_stats()
    assert after[EXCHANGE_LATENCY_KEY] > 0 and after[EXPERT_LOAD_KEY] == 0.0 and after[KV_USAGE_KEY] == 0.25


def test_shard_health_by_transport():
    local = SimpleNamespace(shards=[object()], placement=SimpleNamespace(num_ranks=1))
    assert shard_health(local) is None
    deepspeed = TimedDispatcher(SimpleNamespace(placement=SimpleNamespace(num_ranks=2), dispatch=lambda: 1 / 0),
                                SimpleNamespace(observe_exchange=lambda s: None))
    assert shard_health(deepspeed) == {0: True, 1: True}
    with pytest.raises(ZeroDivisionError):
        deepspeed.dispatch()
    assert shard_health(deepspeed) == {0: False, 1: False}
    assert shard_health(SimpleNamespace(shard_health=lambda: {3: 1})) == {3: True}


# ---------------------------------------------------------------------------------------------
# Config and app
# ---------------------------------------------------------------------------------------------

def test_replica_options_from_config():
    assert replica_options(AppConfig(num_router_replicas=2), "router") == {"num_replicas": 2}
    config = AppConfig(autoscaling={"router": {"min_replicas": 1, "max_replicas": 3, "target_kv_usage": 0.6},
                                    "ingress": {"max_replicas": 2, "target_ongoing_requests": 8}},
                       num_router_replicas=2)
    router = replica_options(config, "router")["autoscaling_config"]
    assert router["initial_replicas"] == 2 and router["max_replicas"] == 3
    assert router["policy"]["policy_function"] == "deployments.telemetry.autoscaling:RouterAutoscalingPolicy"
    assert router["policy"]["policy_kwargs"]["target_kv_usage"] == 0.6
    ingress = replica_options(config, "ingress")["autoscaling_config"]
    assert ingress["target_ongoing_requests"] == 8 and "initial_replicas" not in ingress
    # Every ingress replica at its max may send the routers its requests.
    assert config.router_max_ongoing_requests == 2 * config.max_ongoing_requests * config.max_n + 16
    # Routers that are whole expert groups: bounds in groups, the expert targets beside the router's.
    groups = AppConfig(transport="deepspeed", num_expert_shards=2, num_router_replicas=2,
                       autoscaling={"experts": {"max_groups": 3, "target_expert_load": 500}})
    router = replica_options(groups, "router")["autoscaling_config"]
    assert (router["min_replicas"], router["max_replicas"], router["initial_replicas"]) == (1, 3, 2)
    assert router["policy"]["policy_kwargs"]["target_expert_load"] == 500


@pytest.mark.parametrize(("data", "message"), [
    ({"transport": "ray", "num_expert_shards": 2, "autoscaling": {"experts": {}}}, "under transport 'ray'"),
    ({"transport": "deepspeed", "num_expert_shards": 2, "num_router_replicas": 4,
      "autoscaling": {"experts": {"max_groups": 3}}}, "num_router_replicas (4) is the initial"),
    ({"autoscaling": {}, "num_router_replicas": 9}, "num_router_replicas (9)"),
    ({"autoscaling": {"router": {"min_replicas": 3, "max_replicas": 2}}}, "min_replicas (3) is above"),
    ({"autoscaling": {"router": {"metrics_interval_s": 20}}}, "metrics_interval_s"),
])
def test_autoscaling_config_is_checked(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_config(data)


def test_build_app_passes_autoscaling_to_ingress_and_router(tiny_ckpt):
    from ray.serve._private.build_app import build_app as serve_build
    from ray.serve.config import AutoscalingConfig

    from deployments.app import build_app

    config = AppConfig(model=str(tiny_ckpt), autoscaling={"router": {"max_replicas": 3, "metrics_interval_s": 1}},
                       vision={"num_replicas": 0})
    built = {d.name: d for d in serve_build(build_app(config), name="app", default_runtime_env={}).deployments}
    router = built["Router"]._deployment_config.autoscaling_config
    ingress = built["Ingress"]._deployment_config.autoscaling_config
    assert isinstance(router, AutoscalingConfig) and router.max_replicas == 3 and router.metrics_interval_s == 1
    assert router.policy.policy_function == "deployments.telemetry.autoscaling:RouterAutoscalingPolicy"
    assert ingress.target_ongoing_requests == 32 and ingress.max_replicas == 4
    fixed = {d.name: d for d in serve_build(build_app(config.model_copy(update={"autoscaling": None})), name="app",
                                            default_runtime_env={}).deployments}
    assert fixed["Router"]._deployment_config.autoscaling_config is None


def test_app_builder_takes_keys_from_the_environment(monkeypatch, tiny_ckpt):
    import deployments.app as app_module

    seen = []
    monkeypatch.setattr(app_module, "build_app", seen.append)
    monkeypatch.setenv("MOE_CLUSTER_API_KEYS", " k1, k2 ,")
    app_module.app_builder({"model": str(tiny_ckpt)})
    app_module.app_builder({"model": str(tiny_ckpt), "api_keys": []})
    app_module.app_builder({"model": str(tiny_ckpt), "api_keys": ["own"]})
    assert [c.api_keys for c in seen] == [("k1", "k2"), ("k1", "k2"), ("own",)]
    monkeypatch.delenv("MOE_CLUSTER_API_KEYS")
    app_module.app_builder({"model": str(tiny_ckpt)})
    assert seen[-1].api_keys == ()


def test_project_serve_config_is_the_cluster_one():
    """deployments/serve_config.yaml deploys on Kubernetes (proxies on every interface) with
    autoscaling; `moe-cluster serve` keeps loopback by default."""
    config = yaml.safe_load((ROOT / "deployments" / "serve_config.yaml").read_text())
    assert config["http_options"]["host"] == "0.0.0.0"
    args = config["applications"][0]["args"]
    scaling = AppConfig.model_validate(args).autoscaling
    assert scaling is not None and scaling.router.max_replicas >= 2
    assert AppConfig().host == "127.0.0.1"
