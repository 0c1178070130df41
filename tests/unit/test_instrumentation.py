"""deployments/telemetry/instrumentation.py, engine_instrumentation.py, deployments/grpc/observe.py and
the wiring of metrics and autoscaling into the app, without Ray: per-request tracking (latencies,
finish reasons, aborts by cause), the HTTP middleware, the gRPC method wrapper, an engine replica's instrumentation and
autoscaling stats (from the engine's published snapshot only), and the app's replica options from
config (the renamed keys included)."""

from __future__ import annotations

import asyncio
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from fastapi import FastAPI
from starlette.testclient import TestClient

from cluster.engine.output_aggregator import RequestOutput
from cluster.engine.stats import EngineSnapshot, EngineStats, KVLoad
from deployments.config import RENAMED_KEYS, AppConfig, ConfigError, parse_config
from deployments.errors import BadRequest, Unavailable
from deployments.grpc.observe import grpc_code_name, observe_grpc
from deployments.telemetry import instrumentation as inst
from deployments.telemetry.autoscaling_settings import replica_options
from deployments.telemetry.engine_instrumentation import EngineInstrumentation
from deployments.telemetry.exchange import TimedDispatcher, shard_health
from deployments.telemetry.metrics import PREFIX, MetricDef, MetricSet
from deployments.telemetry.signals import (
    EXCHANGE_LATENCY_KEY,
    EXPERT_LOAD_KEY,
    KV_USAGE_KEY,
    RUNNING_KEY,
    WAITING_KEY,
)

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

    def by(self, name: str, label: str) -> dict[str, float]:
        """Totals of a series per value of one label (series never recorded left out)."""
        return {dict(k)[label]: sum(v) for k, v in self.values[name].items() if v}


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


@pytest.fixture
def default_metrics(fake, monkeypatch):
    """The process-wide metric set (what the ingress records into) is the fake one."""
    from deployments.telemetry import metrics

    f, ms = fake
    monkeypatch.setattr(metrics, "_default", ms)
    return f


class Stream:
    """An engine stream as the ingress sees it (Serve's DeploymentResponseGenerator)."""

    def __init__(self, items):
        self.items, self.cancelled = list(items), False

    async def __anext__(self):
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if isinstance(item, Exception):
            raise item
        return item

    def __aiter__(self):
        return self

    def cancel(self):
        self.cancelled = True


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
    assert f.by("requests_finished_total", "reason") == {"stop": 1}
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
    assert f.by("requests_finished_total", "reason") == ({cause: 1} if cause else {})


def test_a_request_that_never_reached_the_engine_is_not_counted(fake):
    f, ms = fake
    assert inst.RequestTracker(metrics=ms).close(Unavailable("loading"), 503) is None
    assert not f.values["requests_finished_total"]


def test_streams_opened_in_a_tracked_request_are_observed(default_metrics):
    f = default_metrics

    async def main():
        plain = Stream([])
        assert inst.observe_stream(plain) is plain  # outside a tracked request: untouched
        tracker = inst.RequestTracker.begin(deadline_s=30)
        ok, bad = inst.observe_stream(Stream([out(1), out(2, True, "length")])), inst.observe_stream(
            Stream([RuntimeError()]))
        assert [o.token_ids for o in [x async for x in ok]] == [(0,), (0, 1)]
        with pytest.raises(RuntimeError):
            await bad.__anext__()
        bad.cancel()
        assert bad.cancelled  # cancels reach the engine stream
        assert tracker.close() == "error"  # one stream failed before the request completed
        assert inst.observe_stream(plain) is plain  # a closed tracker observes no more

    asyncio.run(main())
    assert f.by("requests_finished_total", "reason") == {"error": 1}
    assert len(f.observed("time_to_first_token_seconds")) == 1


# ---------------------------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------------------------

def http_app() -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat() -> dict:
        async for _ in inst.observe_stream(Stream([out(1, ids=(9,)), out(1, True, "stop", ids=(5,))])):
            pass
        return {}

    @app.post("/v1/completions")
    async def completion() -> dict:
        async for _ in inst.observe_stream(Stream([out(1), RuntimeError("engine gone")])):
            pass
        return {}

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
    app.add_middleware(inst.HttpMetricsMiddleware, get_tool_calls_id=lambda: 9)
    return app


def test_http_requests_are_tracked_to_their_outcome(default_metrics):
    f = default_metrics
    client = TestClient(http_app(), raise_server_exceptions=False)
    assert client.post("/v1/chat/completions").status_code == 200
    assert client.post("/v1/completions").status_code == 500
    assert client.post("/v1/completions/locked").status_code == 401  # refused before the engine: not counted
    assert client.get("/nowhere").status_code == 404
    # A chat answer that called a tool; a server error.
    assert f.by("requests_finished_total", "reason") == {"tool_calls": 1, "error": 1}


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

    @observe_grpc
    async def Generate(self, request, grpc_context):  # noqa: N802
        if request == "bad":  # refused before the engine: a status, not a request
            import grpc

            grpc_context.set_code(grpc.StatusCode.INVALID_ARGUMENT)
            return "empty"
        async for _ in inst.observe_stream(Stream([out(2, True, "length")])):
            pass
        return "reply"

    @observe_grpc
    async def ListModels(self, request, grpc_context):  # noqa: N802
        return "models"

    @observe_grpc
    async def GenerateStream(self, request, grpc_context):  # noqa: N802
        async for o in inst.observe_stream(Stream([out(1), out(1), out(1, True, "length")])):
            yield o


def test_grpc_calls_are_counted_by_method_and_code_and_generation_calls_tracked(default_metrics):
    import inspect
    import time

    from deployments.grpc.proxy_fix import DEADLINE_METADATA

    f = default_metrics
    m = Methods()
    assert inspect.isasyncgenfunction(Methods.GenerateStream) and not inspect.isasyncgenfunction(Methods.Generate)
    assert "grpc_context" in inspect.signature(Methods.Generate).parameters  # Serve passes it by name

    async def main():
        assert await m.Generate("ok", Ctx()) == "reply"
        assert await m.Generate("bad", Ctx()) == "empty"
        assert await m.ListModels("ok", Ctx()) == "models"
        assert len([x async for x in m.GenerateStream("ok", Ctx())]) == 3
        # Cancelled past the deadline the proxy forwarded: a deadline, not a client that left.
        for deadline in (time.time() - 1, time.time() + 60):
            stream = m.GenerateStream("ok", Ctx([(DEADLINE_METADATA, str(deadline))]))
            await stream.__anext__()
            await stream.aclose()

    asyncio.run(main())
    assert f.by("requests_finished_total", "reason") == {"length": 2, "deadline": 1, "client": 1}
    codes = {dict(k)["method"] + " " + dict(k)["code"]: sum(v) for k, v in f.values["grpc_responses_total"].items()}
    assert codes == {"Generate OK": 1, "Generate INVALID_ARGUMENT": 1, "ListModels OK": 1, "GenerateStream OK": 1,
                     "GenerateStream DEADLINE_EXCEEDED": 1, "GenerateStream CANCELLED": 1}


def test_grpc_code_of_a_context_without_a_code_method():
    assert grpc_code_name(SimpleNamespace(code=None)) == "OK"
    assert grpc_code_name(SimpleNamespace(code=None), asyncio.CancelledError()) == "CANCELLED"
    assert grpc_code_name(SimpleNamespace(code="UNAVAILABLE")) == "UNAVAILABLE"


def test_the_proxy_forwards_the_client_deadline(monkeypatch):
    import time

    from ray.serve._private import proxy_request_response as prr

    from deployments.grpc import proxy_fix

    monkeypatch.setattr(prr, "RayServegRPCContext", prr.RayServegRPCContext)
    proxy_fix._forward_deadlines()

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
    deadline = proxy_fix.forwarded_deadline(with_deadline)
    assert deadline == pytest.approx(time.time() + 5.0, abs=1)
    assert ("authorization", "Bearer k") in with_deadline.invocation_metadata()
    assert proxy_fix.forwarded_deadline(prr.RayServegRPCContext(ServicerContext(None))) is None


# ---------------------------------------------------------------------------------------------
# Engine replicas
# ---------------------------------------------------------------------------------------------

def snapshot(generation_tokens: int = 7, expert_tokens: dict | None = None) -> EngineSnapshot:
    stats = EngineStats(num_running=2, num_waiting=1, kv_blocks_used=16, kv_blocks_total=32, num_preemptions=0,
                        forward_calls=1, prompt_tokens=5, generation_tokens=generation_tokens, aborts=0)
    load = KVLoad(free_blocks=24, reserved_blocks=4, total_blocks=32, block_size=16, num_running=2, num_waiting=3)
    return EngineSnapshot(stats, load, expert_tokens if expert_tokens is not None else {0: [1, 3]}, ())


def test_engine_instrumentation_reads_only_what_the_engine_publishes(fake):
    """The instrumentation times exchanges through the dispatcher it composed and reads the
    engine's published snapshot; the engine it is given has nothing else (no lock, no internals)."""
    f, ms = fake
    telemetry = EngineInstrumentation("local", metrics=ms)
    inner = SimpleNamespace(dispatch=lambda *a: "out", shards=[object()], placement=SimpleNamespace(num_ranks=2))
    timed = telemetry.timed(inner)
    engine = SimpleNamespace(snapshot=snapshot())
    telemetry.start(engine, interval_s=0)  # no polling thread: polled by hand below
    # The first report: KV use (used / total of the published load), queue; no expert rate yet.
    assert telemetry.autoscaling_stats() == {KV_USAGE_KEY: 0.25, WAITING_KEY: 3.0, RUNNING_KEY: 2.0}
    assert timed.dispatch(0, "hidden", "ids", "weights") == "out"
    assert len(f.values["expert_exchange_latency_seconds"][(("transport", "local"),)]) == 1
    engine.snapshot = snapshot(generation_tokens=9, expert_tokens={0: [5, 7]})
    second = telemetry.autoscaling_stats()
    assert second[EXCHANGE_LATENCY_KEY] > 0 and second[EXPERT_LOAD_KEY] > 0 and second[KV_USAGE_KEY] == 0.25
    telemetry.poll()
    assert f.total("generation_tokens_total") == 9 and f.values["kv_usage_ratio"][()] == [0.5]
    assert f.total("expert_tokens_total", layer="0", expert="1") == 7
    assert not f.values["shard_up"]  # local transport: no shards of its own
    telemetry.stop()


def test_shard_health_by_transport():
    def timed(inner):
        return TimedDispatcher(inner)

    local = SimpleNamespace(shards=[object()], placement=SimpleNamespace(num_ranks=1))
    assert shard_health(timed(local)) is None
    deepspeed = timed(SimpleNamespace(placement=SimpleNamespace(num_ranks=2), dispatch=lambda *a: 1 / 0))
    assert shard_health(deepspeed) == {0: True, 1: True}
    with pytest.raises(ZeroDivisionError):
        deepspeed.dispatch(0, None, None, None)
    assert shard_health(deepspeed) == {0: False, 1: False}
    assert deepspeed.totals.count == 1  # a failed exchange is timed too
    assert shard_health(timed(SimpleNamespace(shard_health=lambda: {3: 1}))) == {3: True}


# ---------------------------------------------------------------------------------------------
# Config and app
# ---------------------------------------------------------------------------------------------

def test_replica_options_from_config():
    assert replica_options(AppConfig(num_engine_replicas=2), "engine") == {"num_replicas": 2}
    config = AppConfig(autoscaling={"engine": {"min_replicas": 1, "max_replicas": 3, "target_kv_usage": 0.6},
                                    "ingress": {"max_replicas": 2, "target_ongoing_requests": 8}},
                       num_engine_replicas=2)
    engine = replica_options(config, "engine")["autoscaling_config"]
    assert engine["initial_replicas"] == 2 and engine["max_replicas"] == 3
    assert engine["policy"]["policy_function"] == "deployments.telemetry.autoscaling:EngineAutoscalingPolicy"
    assert engine["policy"]["policy_kwargs"]["target_kv_usage"] == 0.6
    ingress = replica_options(config, "ingress")["autoscaling_config"]
    assert ingress["target_ongoing_requests"] == 8 and "initial_replicas" not in ingress
    # Every ingress replica at its max may send the engine servers its requests.
    assert config.engine_max_ongoing_requests == 2 * config.max_ongoing_requests * config.max_n + 16
    # Engine replicas that are whole expert groups: bounds in groups, the expert targets beside the engine's.
    groups = AppConfig(transport="deepspeed", num_expert_shards=2, num_engine_replicas=2,
                       autoscaling={"experts": {"max_groups": 3, "target_expert_load": 500}})
    engine = replica_options(groups, "engine")["autoscaling_config"]
    assert (engine["min_replicas"], engine["max_replicas"], engine["initial_replicas"]) == (1, 3, 2)
    assert engine["policy"]["policy_kwargs"]["target_expert_load"] == 500


def test_the_old_router_keys_still_work_with_one_warning(caplog, monkeypatch):
    """Configs written before the rename (num_router_replicas, router_num_cpus, router_num_gpus,
    autoscaling.router) deploy as before; each old key is named once in a warning."""
    import logging

    from deployments import renamed_keys

    monkeypatch.setattr(renamed_keys, "_warned", set())  # as in a fresh process
    old = {"num_router_replicas": 2, "router_num_cpus": 3, "router_num_gpus": 1,
           "autoscaling": {"router": {"max_replicas": 3}}}
    with caplog.at_level(logging.WARNING, logger="deployments.renamed_keys"):
        first, second = parse_config(dict(old)), parse_config(dict(old))
    assert first == second
    assert (first.num_engine_replicas, first.engine_num_cpus, first.engine_num_gpus) == (2, 3, 1)
    assert first.autoscaling.engine.max_replicas == 3
    for key in ("num_router_replicas", "router_num_cpus", "router_num_gpus", "autoscaling.router"):
        assert sum(key + " is deprecated" in r.getMessage() for r in caplog.records) == 1, key
    with pytest.raises(ConfigError, match="num_router_replicas is the deprecated name of num_engine_replicas"):
        parse_config({"num_router_replicas": 2, "num_engine_replicas": 2})


@pytest.mark.parametrize(("data", "message"), [
    ({"transport": "ray", "num_expert_shards": 2, "autoscaling": {"experts": {}}}, "under transport 'ray'"),
    ({"transport": "deepspeed", "num_expert_shards": 2, "num_engine_replicas": 4,
      "autoscaling": {"experts": {"max_groups": 3}}}, "num_engine_replicas (4) is the initial"),
    ({"autoscaling": {}, "num_engine_replicas": 9}, "num_engine_replicas (9)"),
    ({"autoscaling": {"engine": {"min_replicas": 3, "max_replicas": 2}}}, "min_replicas (3) is above"),
    ({"autoscaling": {"engine": {"metrics_interval_s": 20}}}, "metrics_interval_s"),
])
def test_autoscaling_config_is_checked(data, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_config(data)


def test_build_app_passes_autoscaling_to_ingress_and_engine(tiny_ckpt):
    from ray.serve._private.build_app import build_app as serve_build
    from ray.serve.config import AutoscalingConfig

    from deployments.app import build_app

    config = AppConfig(model=str(tiny_ckpt), autoscaling={"engine": {"max_replicas": 3, "metrics_interval_s": 1}},
                       vision={"num_replicas": 0})
    built = {d.name: d for d in serve_build(build_app(config), name="app", default_runtime_env={}).deployments}
    assert set(built) == {"Ingress", "EngineServer"}
    engine = built["EngineServer"]._deployment_config.autoscaling_config
    ingress = built["Ingress"]._deployment_config.autoscaling_config
    assert isinstance(engine, AutoscalingConfig) and engine.max_replicas == 3 and engine.metrics_interval_s == 1
    assert engine.policy.policy_function == "deployments.telemetry.autoscaling:EngineAutoscalingPolicy"
    assert ingress.target_ongoing_requests == 32 and ingress.max_replicas == 4
    fixed = {d.name: d for d in serve_build(build_app(config.model_copy(update={"autoscaling": None})), name="app",
                                            default_runtime_env={}).deployments}
    assert fixed["EngineServer"]._deployment_config.autoscaling_config is None


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
    assert not set(args) & set(RENAMED_KEYS) and "router" not in args["autoscaling"]  # the current names
    scaling = AppConfig.model_validate(args).autoscaling
    assert scaling is not None and scaling.engine.max_replicas >= 2
    assert AppConfig().host == "127.0.0.1"


def test_the_serve_command_takes_the_engine_replicas_flag_and_its_old_name(tiny_ckpt):
    from deployments.cli import _parser
    from deployments.serve_command import config_from_args

    for flag in ("--num-engine-replicas", "--num-router-replicas"):
        args = _parser().parse_args(["serve", "--model", str(tiny_ckpt), flag, "3"])
        assert config_from_args(args).num_engine_replicas == 3
