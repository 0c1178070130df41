"""An EngineServer replica's engine for the configured transport: `local` keeps every expert in the
replica; `ray` makes engine replicas share one set of expert shards (a named registry, M:N);
`deepspeed` gives each replica its own group of shards. The replica's telemetry wraps the
transport's dispatcher (`wrap`) before the engine is built over it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from cluster.engine.llm_engine import LLMEngine
from cluster.errors import ConfigError
from cluster.model.dispatch import Dispatcher
from deployments.config import AppConfig

logger = logging.getLogger("ray.serve")


def build_engine(config: AppConfig, model_dir: Path, wrap: Callable[[Dispatcher], Dispatcher]) -> LLMEngine:
    return LLMEngine(model_dir, config.engine.to_engine_config(), wrap(transport_dispatcher(config, model_dir)))


def transport_dispatcher(config: AppConfig, model_dir: Path) -> Dispatcher:
    """The expert dispatcher of `config.transport` for one engine replica."""
    if config.transport == "local":
        from cluster.experts.dispatchers import load_local_dispatcher

        return load_local_dispatcher(model_dir, max(config.num_expert_shards, 1))
    if config.num_expert_shards < 1:
        raise ConfigError(f"transport {config.transport!r} needs num_expert_shards >= 1")
    from ray import serve

    from cluster.experts.group import GroupMember, GroupSpec, shared_registry

    # num_engines sizes the shards' request coalescing (ray: every engine replica shares them, up to
    # the autoscaling ceiling); a deepspeed group pairs one engine with its own shards.
    engines = 1 if config.transport == "deepspeed" else (
        config.autoscaling.engine_bounds()[1] if config.autoscaling else config.num_engine_replicas)
    spec = GroupSpec(str(model_dir), config.num_expert_shards, config.transport, config.engine.to_engine_config(),
                     num_engines=engines, exchange_deadline_s=config.exchange_deadline_s)
    name = f"{config.app_name}-experts"
    owned = config.transport == "deepspeed"  # a process group pairs one engine with its own shards
    if owned:  # ... which leave with the replica (scale-down, restart): the group is the unit
        name += f"-{serve.get_replica_context().replica_id.unique_id}"
    member = GroupMember(spec, shared_registry(spec, name, detached=not owned), owns_registry=owned)
    logger.info("engine joined expert registry %s (%s, %d shards)", name, config.transport, config.num_expert_shards)
    return member.dispatcher
