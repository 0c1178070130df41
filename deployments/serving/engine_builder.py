"""The router replica's engine for the configured transport: `local` keeps every expert in the
replica; `ray` makes router replicas share one set of expert shards (a named registry, M:N);
`deepspeed` gives each replica its own group of shards."""

from __future__ import annotations

import logging
from pathlib import Path

from cluster.engine.llm_engine import LLMEngine
from cluster.errors import ConfigError
from deployments.config import AppConfig

logger = logging.getLogger("ray.serve")


def build_router_engine(config: AppConfig, model_dir: Path) -> LLMEngine:
    engine_config = config.engine.to_engine_config()
    if config.transport == "local":
        from cluster.experts.dispatchers import load_local_dispatcher

        return LLMEngine(model_dir, engine_config, load_local_dispatcher(model_dir, max(config.num_expert_shards, 1)))
    if config.num_expert_shards < 1:
        raise ConfigError(f"transport {config.transport!r} needs num_expert_shards >= 1")
    from ray import serve

    from cluster.experts.group import GroupRouter, GroupSpec, shared_registry

    # num_routers sizes the shards' request coalescing (ray: every router replica shares them, up to
    # the autoscaling ceiling); a deepspeed group pairs one router with its own shards.
    routers = 1 if config.transport == "deepspeed" else (
        config.autoscaling.router_bounds()[1] if config.autoscaling else config.num_router_replicas)
    spec = GroupSpec(str(model_dir), config.num_expert_shards, config.transport, engine_config,
                     num_routers=routers, exchange_deadline_s=config.exchange_deadline_s)
    name = f"{config.app_name}-experts"
    owned = config.transport == "deepspeed"  # a process group pairs one router with its own shards
    if owned:  # ... which leave with the replica (scale-down, restart): the group is the unit
        name += f"-{serve.get_replica_context().replica_id.unique_id}"
    member = GroupRouter(spec, shared_registry(spec, name, detached=not owned), owns_registry=owned)
    logger.info("router joined expert registry %s (%s, %d shards)", name, config.transport, config.num_expert_shards)
    return member.engine
