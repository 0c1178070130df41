"""Readiness never waits for an engine step: while the engine loop is inside a step (an injected
dispatcher holds it on an event), the ingress's `/ready` and the gRPC health service answer
SERVING before the step is let go. The real paths run: the HTTP app and the gRPC servicer over an
IngressCore, whose handle calls a real EngineServer built by the engine builder (only the
dispatcher is swapped for one that can hold a step). No Ray: the handle calls the server's methods
on a thread, as a replica answers while its engine thread steps."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from grpc_health.v1 import health_pb2
from starlette.testclient import TestClient

from cluster.engine.sampling_params import SamplingParams
from cluster.experts import dispatchers
from cluster.model.dispatch import Dispatcher
from deployments.api.http_app import create_http_app
from deployments.config import AppConfig
from deployments.frontend.ingress_core import IngressCore
from deployments.grpc.service import GrpcMethods
from deployments.serving.engine_server import EngineServer
from deployments.serving.request import GenerateRequest
from deployments.telemetry import metrics
from deployments.telemetry.metrics import MetricSet

HOLD_TIMEOUT_S = 30.0  # a deadline for the test's own waits, never a sleep


class HoldingDispatcher(Dispatcher):
    """The transport's dispatcher, which holds the first exchange after `hold` is set (and so that
    step) until `release` is; `fail` makes the next exchange raise (the engine loop dies)."""

    def __init__(self, inner: Dispatcher) -> None:
        self.inner = inner
        self.hold, self.held, self.release = threading.Event(), threading.Event(), threading.Event()
        self.fail = False

    def dispatch(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                 topk_weights: torch.Tensor) -> torch.Tensor:
        if self.fail:
            raise RuntimeError("injected: the expert exchange broke")
        if self.hold.is_set():
            self.hold.clear()
            self.held.set()
            self.release.wait(HOLD_TIMEOUT_S)
        return self.inner.dispatch(layer, hidden, topk_ids, topk_weights)

    def token_counts(self) -> dict[int, torch.Tensor]:
        return self.inner.token_counts()

    def close(self) -> None:
        self.inner.close()


class Handle:
    """A DeploymentHandle of one EngineServer replica: each call runs on a thread."""

    def __init__(self, server: EngineServer) -> None:
        self._server = server

    def __getattr__(self, method: str) -> Any:
        call = getattr(self._server, method)
        return SimpleNamespace(remote=lambda *args: asyncio.to_thread(call, *args))


class HealthServicer(GrpcMethods):
    def __init__(self, core: IngressCore) -> None:
        self.core = core

    def check(self) -> int:
        async def call() -> int:
            reply = await self.Check(health_pb2.HealthCheckRequest(service=""), SimpleNamespace())
            return reply.status
        return asyncio.run(call())


@pytest.fixture
def served(tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, ...]]:
    """(server, its holding dispatcher, the HTTP client of an ingress over it, its gRPC health)."""
    def ignore(*_: Any, **__: Any) -> None:
        return None

    monkeypatch.setattr(metrics, "_default", MetricSet(lambda d: SimpleNamespace(inc=ignore, set=ignore,
                                                                                  observe=ignore)))
    made: list[HoldingDispatcher] = []
    local = dispatchers.load_local_dispatcher

    def holding(model_dir: Any, num_shards: int = 1, cache_bytes: int = 0, device: Any = None,
                dtype: Any = None) -> HoldingDispatcher:
        made.append(HoldingDispatcher(local(model_dir, num_shards, cache_bytes, device, dtype)))
        return made[-1]

    monkeypatch.setattr(dispatchers, "load_local_dispatcher", holding)
    config = AppConfig(model=str(tiny_ckpt), engine={"num_kv_blocks": 64, "max_model_len": 256})
    server = EngineServer(config)
    core = IngressCore(Handle(server), config)
    try:
        yield server, made[0], TestClient(create_http_app(lambda: core, config)), HealthServicer(core)
    finally:
        made[0].release.set()
        server.engine.shutdown()


def test_ready_and_grpc_health_answer_while_a_step_is_held(served: tuple[Any, ...]) -> None:
    server, dispatcher, http, health = served
    assert http.get("/ready").status_code == 200
    outputs: list[Any] = []

    async def consume() -> None:
        request = GenerateRequest("held", (1, 1500, 1600), SamplingParams(max_tokens=4, temperature=0,
                                                                        ignore_eos=True))
        async for out in server.generate(request):
            outputs.append(out)

    dispatcher.hold.set()
    consumer = threading.Thread(target=asyncio.run, args=(consume(),), name="consumer")
    consumer.start()
    assert dispatcher.held.wait(HOLD_TIMEOUT_S), "the step never reached the dispatcher"
    # The engine loop is inside its step, holding the engine's lock until the event is released.
    ready = http.get("/ready")
    status = health.check()
    stats = http.get("/v1/engine/stats").json()
    assert not dispatcher.release.is_set() and consumer.is_alive()  # all answered with the step still held
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}
    assert status == health_pb2.HealthCheckResponse.SERVING
    assert stats["num_running"] + stats["num_waiting"] == 1  # the snapshot published when it was added
    dispatcher.release.set()
    consumer.join(HOLD_TIMEOUT_S)
    assert not consumer.is_alive() and outputs and outputs[-1].finished
    assert sum(len(o.new_token_ids) for o in outputs) == 4


def test_not_ready_once_the_engine_loop_died(served: tuple[Any, ...]) -> None:
    server, dispatcher, http, health = served
    assert http.get("/ready").status_code == 200

    async def consume() -> None:
        request = GenerateRequest("doomed", (1, 1500, 1600), SamplingParams(max_tokens=4))
        with pytest.raises(Exception, match="engine stopped"):
            async for _ in server.generate(request):
                pass

    dispatcher.fail = True
    asyncio.run(consume())
    assert not server.engine.alive
    assert http.get("/ready").status_code == 503
    assert health.check() == health_pb2.HealthCheckResponse.NOT_SERVING
