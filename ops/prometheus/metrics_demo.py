"""A local Ray cluster that exports every moe-cluster series with plausible values, for building
dashboards and alerts without a model, and for the tests that query them through a real Prometheus.

    python ops/prometheus/metrics_demo.py --metrics-port 8080 [--seconds 600]

It starts Ray with its metrics export on `--metrics-port` and Serve with a stand-in `EngineServer`
deployment that goes through the same code paths as the real ones: it records engine snapshots,
request, expert and image metrics with deployments.telemetry.recorders, answers HTTP
(`POST /v1/completions`, sometimes 503) and gRPC (`MoeCluster/Generate`, sometimes
INVALID_ARGUMENT or UNAVAILABLE, counted as the ingress counts them) through Serve's proxies, which count the
HTTP ones (`ray_serve_num_http_requests_total`), and
reports its signals through `record_autoscaling_stats()` to
deployments.telemetry.autoscaling:EngineAutoscalingPolicy (which then scales it up and records its
decisions), with the expert load and exchange latency of an engine replica that is a whole expert
group (`autoscaling.experts`).
Prints `ready <port>` once the deployment runs, then drives requests until stopped (SIGTERM/SIGINT)
or `--seconds` pass.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from types import FrameType
from typing import Any

from fastapi import FastAPI, Response
from ray import serve

app = FastAPI()


@serve.ingress(app)
class _EngineServer:
    def __init__(self) -> None:
        from deployments.telemetry.recorders import EngineMetrics, GrpcMetrics, RequestMetrics, VisionMetrics

        self.engine = EngineMetrics(transport="ray")
        self.vision = VisionMetrics()
        self.grpc = GrpcMetrics()
        self._request = RequestMetrics
        self.counts = {layer: [0] * 8 for layer in range(2)}
        self.step = 0
        self.kv_usage = 0.9

    def record_autoscaling_stats(self) -> dict[str, float]:
        from deployments.telemetry.signals import EXCHANGE_LATENCY_KEY, EXPERT_LOAD_KEY, KV_USAGE_KEY, WAITING_KEY

        return {KV_USAGE_KEY: self.kv_usage, WAITING_KEY: 1.0, EXPERT_LOAD_KEY: 500.0, EXCHANGE_LATENCY_KEY: 0.002}

    @app.post("/v1/completions")
    async def completions(self, i: int) -> Response:
        await self._record(i)
        return Response(status_code=200 if i % 10 else 503)

    async def Generate(self, request: Any, grpc_context: Any) -> Any:  # noqa: N802 - the RPC's name
        import grpc

        from deployments.protos import moe_cluster_pb2 as pb

        i = request.sampling.max_tokens
        await self._record(i)
        code = (grpc.StatusCode.INVALID_ARGUMENT if i % 7 == 0 else grpc.StatusCode.UNAVAILABLE if i % 11 == 0
                else grpc.StatusCode.OK)
        grpc_context.set_code(code)
        self.grpc.response("Generate", code)
        return pb.GenerateResponse()

    async def _record(self, i: int) -> None:
        from cluster.engine.stats import EngineSnapshot, EngineStats, KVLoad

        self.step += 1
        r = self._request()
        for _ in range(4):
            await asyncio.sleep(random.uniform(0.001, 0.01))
            r.on_token()
        r.on_cached_tokens(16 * (i % 3))
        r.on_finish(["stop", "length", "client", "deadline"][i % 4])
        for layer, c in self.counts.items():
            for k in range(4):
                c[(k * (layer + 1) + i) % 8] += 1 + (k == 0) * 3
        self.engine.experts.observe_exchange(random.uniform(0.0005, 0.005))
        self.engine.experts.set_shards_health({0: True, 1: True})
        self.vision.observe_preprocess(random.uniform(0.002, 0.02))
        self.vision.observe_encoder(random.uniform(0.01, 0.1))
        stats = EngineStats(num_running=2 + i % 3, num_waiting=i % 2, kv_blocks_used=90, kv_blocks_total=100,
                            num_preemptions=self.step // 5, forward_calls=self.step * 3, prompt_tokens=self.step * 20,
                            generation_tokens=self.step * 4, aborts=0, prefix_queried_tokens=self.step * 32,
                            prefix_cached_tokens=self.step * 16, prefix_cached_blocks=self.step % 7)
        load = KVLoad(free_blocks=10, reserved_blocks=0, total_blocks=100, block_size=16,
                      num_running=stats.num_running, num_waiting=stats.num_waiting)
        self.engine.observe(EngineSnapshot(stats, load, {k: list(v) for k, v in self.counts.items()},
                                           (0.4,) if self.step > 3 else ()))


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _drive(i: int, http_port: int, stub: Any) -> None:
    """One HTTP and one gRPC call through Serve's proxies (refusals are part of the demo)."""
    import grpc

    from deployments.protos import moe_cluster_pb2 as pb

    request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/completions?i={i}", method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30):
            pass
    except urllib.error.HTTPError:
        pass
    try:
        stub.Generate(pb.GenerateRequest(text="demo", sampling=pb.SamplingOptions(max_tokens=i)), timeout=30)
    except grpc.RpcError:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metrics-port", type=int, required=True)
    parser.add_argument("--seconds", type=float, default=600.0)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)

    import grpc
    import ray
    from ray.serve.config import gRPCOptions

    from deployments.protos import moe_cluster_pb2_grpc
    from deployments.telemetry.autoscaling_settings import AutoscalingSettings

    settings = AutoscalingSettings(experts={"min_groups": 1, "max_groups": 2, "upscale_delay_s": 0,
                                            "look_back_period_s": 12, "target_expert_load": 1000.0})
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False,
             _metrics_export_port=args.metrics_port)
    http_port, grpc_port = _free_port(), _free_port()
    channel = None
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": http_port},
                    grpc_options=gRPCOptions(port=grpc_port, grpc_servicer_functions=[
                        "deployments.protos.moe_cluster_pb2_grpc.add_MoeClusterServicer_to_server"]))
        engine = serve.deployment(_EngineServer, name="EngineServer", autoscaling_config=settings.engine_config(),
                                  ray_actor_options={"num_cpus": 0}).bind()
        serve.run(engine, name="moe-cluster", route_prefix="/")
        channel = grpc.insecure_channel(f"127.0.0.1:{grpc_port}")
        stub = moe_cluster_pb2_grpc.MoeClusterStub(channel)
        print(f"ready {args.metrics_port}", flush=True)
        deadline = time.monotonic() + args.seconds
        i = 1
        while time.monotonic() < deadline:
            _drive(i, http_port, stub)
            i += 1
            time.sleep(0.05)
    finally:
        try:
            if channel is not None:
                channel.close()
            serve.shutdown()
        finally:
            ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
