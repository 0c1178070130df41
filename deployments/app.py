"""The Serve application: Ingress -> Router, built from one AppConfig. `build_app` for Python,
`app_builder` for Serve config files (`import_path: deployments.app:app_builder`, `args:` the
AppConfig fields)."""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig, gRPCOptions

from deployments.config import AppConfig, parse_config
from deployments.ingress import Ingress
from deployments.router import Router

GRPC_SERVICER_FUNCTIONS = [
    "deployments.protos.moe_cluster_pb2_grpc.add_MoeClusterServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
    # Not a service: fixes cancellation of streaming calls in Serve's proxy (see the module).
    "deployments.grpc_proxy_fix.add_stream_cancellation_to_server",
]


def build_app(config: AppConfig) -> Application:
    router = serve.deployment(Router, name="Router").options(
        num_replicas=config.num_router_replicas,
        max_ongoing_requests=config.router_max_ongoing_requests,
        ray_actor_options={"num_cpus": config.router_num_cpus, "num_gpus": config.router_num_gpus},
        health_check_period_s=10, graceful_shutdown_timeout_s=10,
    ).bind(config)
    ingress = serve.deployment(Ingress, name="Ingress").options(
        num_replicas=config.num_ingress_replicas,
        max_ongoing_requests=config.ingress_max_ongoing_requests,
        max_queued_requests=config.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=config.retry_after_s),
        ray_actor_options={"num_cpus": config.ingress_num_cpus},
        graceful_shutdown_timeout_s=10,
    )
    return ingress.bind(router, config)


def app_builder(args: dict[str, Any]) -> Application:
    return build_app(parse_config(dict(args)))


def grpc_options(config: AppConfig) -> gRPCOptions:
    return gRPCOptions(port=config.grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS,
                       enable_reflection=config.grpc_reflection, request_timeout_s=config.request_timeout_s)


def http_options(config: AppConfig) -> dict[str, Any]:
    return {"host": config.host, "port": config.http_port, "request_timeout_s": config.request_timeout_s}
