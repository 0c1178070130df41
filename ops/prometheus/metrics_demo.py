"""A local Ray cluster that exports every moe-cluster series with plausible values, for building
dashboards and alerts without a model, and for the tests that query them through a real Prometheus.

    python ops/prometheus/metrics_demo.py --metrics-port 8080 [--seconds 600]

It starts Ray with its metrics export on `--metrics-port` and Serve with two stand-in deployments
that go through the same code paths as the real ones: `Router` records engine, request, expert,
image and API metrics with deployments.telemetry.metrics' recorders and reports KV use and queue through
`record_autoscaling_stats()` to deployments.telemetry.autoscaling:RouterAutoscalingPolicy (which then scales
it up and records its decisions), with the expert load and exchange latency of a router replica
that is a whole expert group (`autoscaling.experts`).
Prints `ready <port>` once the deployments run, then drives requests until stopped (SIGTERM/SIGINT)
or `--seconds` pass.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sys
import time
from types import FrameType


class _Router:
    def __init__(self) -> None:
        from deployments.telemetry.metrics import (
            ApiMetrics,
            EngineMetrics,
            ExpertMetrics,
            RequestMetrics,
            VisionMetrics,
        )

        self.engine = EngineMetrics()
        self.experts = ExpertMetrics(transport="ray")
        self.vision = VisionMetrics()
        self.api = ApiMetrics()
        self._request = RequestMetrics
        self.counts = {layer: [0] * 8 for layer in range(2)}
        self.step = 0
        self.kv_usage = 0.9

    def record_autoscaling_stats(self) -> dict[str, float]:
        from deployments.telemetry.autoscaling import EXCHANGE_LATENCY_KEY, EXPERT_LOAD_KEY, KV_USAGE_KEY, WAITING_KEY

        return {KV_USAGE_KEY: self.kv_usage, WAITING_KEY: 1.0, EXPERT_LOAD_KEY: 500.0, EXCHANGE_LATENCY_KEY: 0.002}

    async def __call__(self, i: int) -> int:
        from cluster.engine.stats import EngineStats

        self.step += 1
        r = self._request()
        for _ in range(4):
            await asyncio.sleep(random.uniform(0.001, 0.01))
            r.on_token()
        r.on_finish(["stop", "length", "client", "deadline"][i % 4])
        for layer, c in self.counts.items():
            for k in range(4):
                c[(k * (layer + 1) + i) % 8] += 1 + (k == 0) * 3
        self.experts.observe_token_counts(self.counts)
        self.experts.observe_exchange(random.uniform(0.0005, 0.005))
        self.experts.set_shards_health({0: True, 1: True})
        self.vision.observe_preprocess(random.uniform(0.002, 0.02))
        self.vision.observe_encoder(random.uniform(0.01, 0.1))
        self.api.http("/v1/chat/completions", 200 if i % 10 else 503)
        self.api.grpc("Generate", "OK" if i % 7 else "INVALID_ARGUMENT")
        self.engine.observe_stats(EngineStats(
            num_running=2 + i % 3, num_waiting=i % 2, kv_blocks_used=90, kv_blocks_total=100,
            num_preemptions=self.step // 5, forward_calls=self.step * 3, prompt_tokens=self.step * 20,
            generation_tokens=self.step * 4, aborts=0))
        self.engine.observe_reforms([0.4] if self.step > 3 else [])
        return i


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=600.0)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)

    import ray
    from ray import serve

    from deployments.telemetry.autoscaling import AutoscalingSettings

    settings = AutoscalingSettings(experts={"min_groups": 1, "max_groups": 2, "upscale_delay_s": 0,
                                            "look_back_period_s": 12, "target_expert_load": 1000.0})
    router_cfg = settings.router_config()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
             _metrics_export_port=args.metrics_port)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": 0})
        router = serve.deployment(_Router, name="Router", autoscaling_config=router_cfg,
                                  ray_actor_options={"num_cpus": 0}).bind()
        handle = serve.run(router, name="moe-cluster", route_prefix=None)
        print(f"ready {args.metrics_port}", flush=True)
        deadline = time.monotonic() + args.seconds
        i = 0
        while time.monotonic() < deadline:
            handle.remote(i).result()
            i += 1
            time.sleep(0.05)
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
