"""The Serve application: Ingress -> EngineServer (and VisionEncoder), built from one AppConfig. `build_app` for Python,
`app_builder` for Serve config files (`import_path: deployments.app:app_builder`, `args:` the
AppConfig fields)."""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import BackpressureConfig, gRPCOptions

from deployments.config import GRPC_SERVICER_FUNCTIONS, AppConfig, api_keys_from_env, parse_config
from deployments.ingress import Ingress
from deployments.serving.engine_server import EngineServer
from deployments.serving.expert_registry import expert_registry_options
from deployments.serving.request_router import request_router_options
from deployments.serving.vision_deployment import vision_deployment
from deployments.telemetry.autoscaling_settings import replica_options

ENGINE_DEPLOYMENT = "EngineServer"


def build_app(config: AppConfig) -> Application:
    engine = serve.deployment(name=ENGINE_DEPLOYMENT)(EngineServer).options(
        **replica_options(config, "engine"),  # fixed, or autoscaled on KV use + waiting queue (config.autoscaling)
        max_ongoing_requests=config.engine_max_ongoing_requests,
        ray_actor_options={"num_cpus": config.engine_num_cpus, "num_gpus": config.engine_num_gpus},
        health_check_period_s=10, graceful_shutdown_timeout_s=config.graceful_shutdown_timeout_s,
        **request_router_options(config.routing),  # KV-aware request routing (deployments.serving.request_router)
        **expert_registry_options(config),  # transport ray: the shared expert registry, the deployment's own actor
    ).bind(config)
    ingress = serve.deployment(name="Ingress")(Ingress).options(
        **replica_options(config, "ingress"),  # fixed, or autoscaled on ongoing requests
        max_ongoing_requests=config.ingress_max_ongoing_requests,
        max_queued_requests=config.max_queued_requests,
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=config.retry_after_s),
        ray_actor_options={"num_cpus": config.ingress_num_cpus},
        graceful_shutdown_timeout_s=config.graceful_shutdown_timeout_s,
    )
    return ingress.bind(engine, config, vision_deployment(config))


def app_builder(args: dict[str, Any]) -> Application:
    """Serve config files; without `api_keys` in the args, keys come from MOE_CLUSTER_API_KEYS."""
    args = dict(args)
    if not args.get("api_keys"):
        args["api_keys"] = list(api_keys_from_env())
    return build_app(parse_config(args))


def grpc_options(config: AppConfig) -> gRPCOptions:
    return gRPCOptions(port=config.grpc_port, grpc_servicer_functions=GRPC_SERVICER_FUNCTIONS,
                       enable_reflection=config.grpc_reflection, request_timeout_s=config.request_timeout_s)


def http_options(config: AppConfig) -> dict[str, Any]:
    return {"host": config.host, "port": config.http_port, "request_timeout_s": config.request_timeout_s}
