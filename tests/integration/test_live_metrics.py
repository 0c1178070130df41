"""The real application (`deployments.app.build_app`, every deployment of it) on the session's local
Ray cluster, under load, scraped by a real Prometheus on a free port: every panel query of every
Grafana dashboard, with Grafana's variables substituted, parses in Prometheus and names a project
series, and every panel of the serving overview returns data.

The load is what clients do: HTTP chat and completions (whole and streamed), gRPC unary and
streaming calls, an image in a chat message, a client that leaves in the middle of a stream, a gRPC
deadline that passes, refused requests (401, 400). Serve runs on the shared cluster
(tests/ray_session.py) with its own ports and is shut down at the end of the module."""

from __future__ import annotations

import base64
import io
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx2 as httpx
import pytest

from deployments.config import AppConfig
from tests import openai_check
from tests.integration.prom_support import (
    DASHBOARDS,
    PROJECT_SERIES,
    has_data,
    known,
    prom_query,
    queries,
    start_prometheus,
    stop_process,
)
from tests.ray_session import free_port

pytestmark = pytest.mark.slow

KEY = "live-metrics-key"
APP = "moe-live"
SERVING = next(p for p in DASHBOARDS if p.stem == "serving-overview")
ROUTES = {"/health", "/ready", "/v1/models", "/v1/completions", "/v1/chat/completions", "/v1/engine/stats", "/"}


@dataclass
class Live:
    http_port: int
    grpc_port: int
    prom_port: int
    failures: list[str] = field(default_factory=list)
    rounds: int = 0

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {KEY}"}

    def query(self, expr: str) -> list[dict]:
        answer = prom_query(self.prom_port, expr)
        assert answer["status"] == "success", f"{answer.get('error')}: {expr}"
        return answer["data"]["result"]


def _png_data_url() -> str:
    from PIL import Image

    image = Image.new("RGB", (48, 32))
    image.putdata([(x * 5 % 256, y * 8 % 256, (x + y) % 256) for y in range(32) for x in range(48)])
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _round(live: Live, client: httpx.Client, stub: object, image_url: str, stop: threading.Event) -> None:
    """One round of every kind of call (until `stop`); a wrong answer is recorded in live.failures."""
    from deployments.protos import moe_cluster_pb2 as pb

    def expect(what: str, got: object, want: object) -> None:
        if got != want:
            live.failures.append(f"{what}: {got!r} != {want!r}")

    # Whole and streamed answers are checked against the openai types (a failed check fails the round).
    h = live.headers
    chat = {"messages": [{"role": "user", "content": "Hello there"}], "max_tokens": 8, "temperature": 0}
    openai_check.body(client.post(live.url("/v1/chat/completions"), json=chat, headers=h))
    with client.stream("POST", live.url("/v1/chat/completions"), json={**chat, "stream": True}, headers=h) as r:
        expect("chat stream", bool(list(openai_check.chunks(r))), True)
    done = {"prompt": "Once upon a time", "max_tokens": 12, "ignore_eos": True}
    r = openai_check.body(client.post(live.url("/v1/completions"), json=done, headers=h))
    expect("completion", r["choices"][0]["finish_reason"], "length")
    with client.stream("POST", live.url("/v1/completions"), json={**done, "stream": True}, headers=h) as r:
        expect("completion stream", bool(list(openai_check.chunks(r))), True)
    image_chat = {"messages": [{"role": "user", "content": [
        {"type": "text", "text": "What is this?"}, {"type": "image_url", "image_url": {"url": image_url}}]}],
        "max_tokens": 4}
    openai_check.body(client.post(live.url("/v1/chat/completions"), json=image_chat, headers=h))
    if stop.is_set():
        return
    # A client that leaves in the middle of a long stream: an abort by the client.
    long = {"prompt": "Tell me everything", "max_tokens": 200, "ignore_eos": True, "stream": True}
    with client.stream("POST", live.url("/v1/completions"), json=long, headers=h) as r:
        stream = openai_check.chunks(r)
        next(stream), next(stream)
    # Refused: no key (401), bad input (400); unprobed paths; health.
    expect("no key", client.get(live.url("/v1/models")).status_code, 401)
    expect("bad body", client.post(live.url("/v1/completions"), json={"prompt": ""}, headers=h).status_code, 400)
    expect("health", client.get(live.url("/health")).status_code, 200)
    if stop.is_set():
        return
    # gRPC: unary, streamed, cancelled by the client, and past its deadline.
    md = [("authorization", f"Bearer {KEY}")]
    reply = stub.Generate(pb.GenerateRequest(text="Hello", sampling=pb.SamplingOptions(max_tokens=6)), metadata=md,
                          timeout=60)
    expect("grpc generate", bool(reply.token_ids), True)
    chat_req = pb.ChatRequest(messages=[pb.ChatMessage(role="user", content="Hi")],
                              sampling=pb.SamplingOptions(max_tokens=6))
    expect("grpc chat stream", bool(list(stub.ChatStream(chat_req, metadata=md, timeout=60))), True)
    long_req = pb.GenerateRequest(text="Go on", sampling=pb.SamplingOptions(max_tokens=200, ignore_eos=True))
    call = stub.GenerateStream(long_req, metadata=md, timeout=60)
    next(call)
    call.cancel()
    try:
        for _ in stub.GenerateStream(long_req, metadata=md, timeout=0.5):
            pass
        live.failures.append("grpc deadline: the stream ended before its deadline")
    except grpc.RpcError as exc:
        expect("grpc deadline", exc.code(), grpc.StatusCode.DEADLINE_EXCEEDED)
    live.rounds += 1


@pytest.fixture(scope="module")
def live(ray_session, tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    import ray
    from ray import serve

    from deployments.app import build_app, grpc_options, http_options
    from deployments.protos import moe_cluster_pb2_grpc

    tmp = tmp_path_factory.mktemp("live-metrics")
    # Autoscaling within [1, 1]: the policies run (and export their decisions) without moving.
    fixed = {"min_replicas": 1, "max_replicas": 1, "look_back_period_s": 4, "metrics_interval_s": 1}
    config = AppConfig(model=str(tiny_ckpt), app_name=APP, api_keys=[KEY], http_port=free_port(),
                       grpc_port=free_port(), ingress_num_cpus=0, engine_num_cpus=0, vision={"num_cpus": 0},
                       engine={"max_model_len": 1024}, autoscaling={"ingress": fixed, "engine": fixed})
    ray_session.serve(http_options(config), grpc_options(config))
    prom = None
    stop = threading.Event()
    try:
        serve.run(build_app(config), name=APP, route_prefix="/")
        targets = [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray.nodes() if n["Alive"]]
        prom, prom_port = start_prometheus(tmp, targets)
        state = Live(config.http_port, config.grpc_port, prom_port)
        channel = grpc.insecure_channel(f"127.0.0.1:{config.grpc_port}")
        stub = moe_cluster_pb2_grpc.MoeClusterStub(channel)
        image_url = _png_data_url()

        def drive() -> None:
            with httpx.Client(timeout=60) as client:
                while not stop.is_set():
                    try:
                        _round(state, client, stub, image_url, stop)
                    except Exception as exc:  # noqa: BLE001 - reported by the test
                        state.failures.append(f"round failed: {exc!r}")
                    stop.wait(1.0)

        driver = threading.Thread(target=drive, name="load", daemon=True)
        driver.start()
        started = time.monotonic()
        try:
            # Ray exports every ~10 s: wait until every serving-overview panel has two samples
            # in its rate window (or give up and let the test name the empty ones).
            serving = queries(SERVING)
            deadline = time.monotonic() + 150
            while time.monotonic() < deadline and state.rounds < 1000:
                if state.rounds >= 2 and all(has_data(prom_port, expr) for _, expr in serving):
                    break
                time.sleep(2)
            print(f"serving-overview data after {time.monotonic() - started:.1f}s of load, {state.rounds} rounds")
            yield state
        finally:
            stop.set()
            driver.join(timeout=60)
            channel.close()
    finally:
        if prom is not None:
            stop_process(prom)
        ray_session.stop_serve()


def test_load_ran_without_unexpected_answers(live: Live) -> None:
    assert live.rounds >= 2
    assert not live.failures, live.failures


def test_every_dashboard_query_parses_and_names_a_project_series(live: Live) -> None:
    for path in DASHBOARDS:
        for where, expr in queries(path):
            answer = prom_query(live.prom_port, expr)
            assert answer["status"] == "success", f"{where}: {answer.get('error')}: {expr}"
            names = PROJECT_SERIES.findall(expr)
            assert names and all(known(n) for n in names), f"{where}: {expr}"


def test_every_serving_overview_panel_returns_data(live: Live) -> None:
    empty = [f"{where}: {expr}" for where, expr in queries(SERVING) if not live.query(expr)]
    assert not empty, "serving-overview panels without data:\n" + "\n".join(empty)


def test_series_carry_what_the_app_did(live: Live) -> None:
    def labels(expr: str, label: str) -> set[str]:
        return {r["metric"][label] for r in live.query(expr)}

    app = f'application="{APP}"'
    assert {"length", "client", "deadline"} <= labels(f"ray_moe_cluster_requests_finished_total{{{app}}}", "reason")
    # Serve's own HTTP counts: route templates only (bounded; "/" for a path no route matches), with
    # the statuses the load produced.
    http = live.query(f"ray_serve_num_http_requests_total{{{app}}}")
    assert {r["metric"]["route"] for r in http} <= ROUTES
    codes = {(r["metric"]["route"], r["metric"]["status_code"]) for r in http}
    assert {("/v1/chat/completions", "200"), ("/v1/completions", "200"), ("/v1/completions", "400"),
            ("/v1/models", "401"), ("/health", "200")} <= codes
    grpc_codes = {(r["metric"]["method"], r["metric"]["code"])
                  for r in live.query(f"ray_moe_cluster_grpc_responses_total{{{app}}}")}
    # (A client's cancel reaches the ingress as CANCELLED when Serve's proxy passes it on in time;
    # a deadline always does, as DEADLINE_EXCEEDED.)
    assert {("Generate", "OK"), ("ChatStream", "OK"), ("GenerateStream", "DEADLINE_EXCEEDED")} <= grpc_codes
    # Engine-side series come from the engine replica, request-side ones from the ingress.
    assert labels(f"ray_moe_cluster_kv_blocks_capacity{{{app}}}", "deployment") == {"EngineServer"}
    assert labels(f"ray_moe_cluster_time_to_first_token_seconds_count{{{app}}}", "deployment") == {"Ingress"}
    assert labels(f"ray_moe_cluster_expert_exchange_latency_seconds_count{{{app}}}", "transport") == {"local"}
    assert live.query(f'ray_moe_cluster_image_preprocess_seconds_count{{{app}}} > 0')
    assert live.query(f'ray_moe_cluster_vision_encoder_seconds_count{{{app}}} > 0')
    # The engine policy runs in the controller and reports the replicas' KV use.
    assert live.query(f'ray_moe_cluster_autoscaling_signal{{{app},deployment="EngineServer",signal="kv_usage"}}')
