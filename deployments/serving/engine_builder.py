"""An EngineServer replica's engine for the configured transport: `local` keeps every expert in the
replica; `ray` makes engine replicas share one set of expert shards (the deployment's registry,
M:N); `deepspeed` gives each replica its own group of shards (deployments.serving.expert_registry).
The replica's telemetry wraps the transport's dispatcher (`wrap`) before the engine is built over it."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from cluster.engine.llm_engine import LLMEngine
from cluster.model.dispatch import Dispatcher
from deployments.config import AppConfig

logger = logging.getLogger("ray.serve")


def build_engine(config: AppConfig, model_dir: Path, wrap: Callable[[Dispatcher], Dispatcher]) -> LLMEngine:
    return LLMEngine(model_dir, config.engine.to_engine_config(), wrap(transport_dispatcher(config, model_dir)))


def transport_dispatcher(config: AppConfig, model_dir: Path) -> Dispatcher:
    """The expert dispatcher of `config.transport` for one engine replica."""
    if config.transport == "local":  # the experts on the engine's device, in its dtype
        from cluster.experts.dispatchers import load_local_dispatcher
        from cluster.model.config import load_model_config
        from cluster.model.weight_source import open_weights

        engine = config.engine.to_engine_config()
        device, dtype = engine.resolved_device(), engine.torch_dtype
        weights = open_weights(model_dir, load_model_config(model_dir), engine.load_format, device, dtype)
        return load_local_dispatcher(weights, max(config.num_expert_shards, 1), device=device, dtype=dtype)
    from deployments.serving.expert_registry import engine_group

    member = engine_group(config, model_dir)
    logger.info("engine joined its expert group (%s, %d shards)", config.transport, config.num_expert_shards)
    return member.dispatcher
