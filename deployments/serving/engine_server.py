"""The EngineServer deployment: one attention engine (AsyncEngine over LLMEngine) per replica, fed
with typed requests through a streaming DeploymentHandle. The expert dispatcher is the configured
transport's, timed by the replica's telemetry from the start. Everything the replica reports
(stats for readiness, KV load for request routing, autoscaling signals, metrics) is read from the
snapshot the engine loop publishes, so none of it waits for an engine step."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from cluster.engine.async_engine import AsyncEngine, EngineDeadError
from cluster.engine.sequence import EngineOutput
from cluster.engine.stats import EngineStats
from cluster.errors import RequestError
from deployments.config import AppConfig, resolve_model_dir, served_name
from deployments.errors import Unavailable, request_error
from deployments.serving.engine_builder import build_engine
from deployments.serving.request import GenerateRequest, ModelInfo
from deployments.telemetry.engine_instrumentation import EngineInstrumentation

logger = logging.getLogger("ray.serve")


class EngineServer:
    def __init__(self, config: AppConfig) -> None:
        model_dir = resolve_model_dir(config.model)
        self._telemetry = EngineInstrumentation(config.transport)
        engine = build_engine(config, model_dir, self._telemetry.timed)  # every expert exchange timed
        self.engine = AsyncEngine(engine)
        self._telemetry.start(self.engine)  # records the engine's published snapshots
        self.replica_id = _replica_id()
        self._requests = 0  # generate calls received
        self._reports = 0
        mc = engine.model_config
        self._info = ModelInfo(name=served_name(config, model_dir), model_dir=str(model_dir),
                               vocab_size=engine.text.vocab_size, max_model_len=engine.max_model_len,
                               has_vision=mc.vision is not None)
        logger.info("engine server ready: %s (%s); %s", self._info.name, model_dir, engine.limits.describe())

    async def generate(self, request: GenerateRequest) -> AsyncIterator[EngineOutput]:
        """What each engine step made of one request (new token ids, no text: the ingress makes the
        text and finds stop strings); cancelling the caller's stream aborts it here and frees its KV
        blocks (AsyncEngine.stream aborts when left early)."""
        self._requests += 1
        try:
            # Image embeddings come ready from the VisionEncoder deployment (via the ingress).
            async for out in self.engine.stream(request.request_id, list(request.prompt_token_ids),
                                                request.params, request.images, request.cache_salt):
                yield out
        except RequestError as exc:
            raise request_error(exc) from None
        except EngineDeadError as exc:
            raise Unavailable(str(exc)) from None

    def abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def stats(self) -> EngineStats:
        """The engine's stats as of its latest step, add or abort (what readiness and
        `/v1/engine/stats` ask): answered at once, even in the middle of a long step; Unavailable
        once the engine loop has stopped."""
        if not self.engine.alive:
            raise Unavailable(f"engine loop stopped: {self.engine.error!r}")
        return self.engine.snapshot.stats

    def info(self) -> ModelInfo:
        return self._info

    async def check_integrity(self) -> tuple[str, EngineStats]:
        """The engine's own checks (block counts, queues, requests), run between two steps off the
        event loop; raises what they find. Returns this replica's id and its stats of that moment."""
        def check() -> EngineStats:
            self.engine.check_integrity()
            return self.engine.stats()

        return self.replica_id, await asyncio.to_thread(check)

    def record_routing_stats(self) -> dict[str, Any]:
        """Called by Serve's controller every `routing.stats_period_s`; the KV-aware request router
        (deployments.serving.request_router) reads it in every handle. Never waits for an engine step: the
        engine loop publishes its KV load after every change."""
        load = self.engine.snapshot.load
        self._reports += 1
        return {"replica": self.replica_id, "seq": self._reports, "time": time.time(),
                "free_blocks": load.available_blocks, "total_blocks": load.total_blocks,
                "block_size": load.block_size, "running": load.num_running, "waiting": load.num_waiting,
                "requests": self._requests}

    def record_autoscaling_stats(self) -> dict[str, float]:
        """The signals of deployments.telemetry.autoscaling.EngineAutoscalingPolicy (KV use, waiting
        queue, expert load, exchange latency), from the published snapshot."""
        return self._telemetry.autoscaling_stats()

    def check_health(self) -> None:
        """Serve's health probe: a dead engine loop marks the replica unhealthy (and restarted)."""
        if not self.engine.alive:
            raise RuntimeError(f"engine loop stopped: {self.engine.error!r}")

    def __del__(self) -> None:
        if getattr(self, "_telemetry", None) is not None:
            self._telemetry.stop()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - outside a Serve replica (tests, tools)
        return "local"
