"""The expert group of an engine replica under Serve, and where the `ray` transport's shared
registry lives: a deployment-scoped actor of the EngineServer deployment (Serve 2.60
`deployment_actors`, alpha).

Why there: its lifetime is then the application's. Serve starts it before the deployment's first
replica and shares it among the replicas of one code version; replicas that come and go
(autoscaling, a crashed replica restarted) leave it alone; Serve kills it when the deployment goes
(serve.delete, serve.shutdown; for the old version after a redeploy, once its replicas are gone)
and recreates it when it fails its health check (engines then join the new one: `find_registry`).
Serve's controller creates it as a detached actor; the shards it starts are owned by it and their
placement group is created by it, so both go with it. (It used to be a detached named actor made
by the first engine replica, which outlived the application.)

Under `deepspeed` each engine replica owns its group instead (`owned_registry`): a process group
pairs one engine with its own shards, which leave with the replica."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from cluster.errors import ConfigError
from cluster.experts.group import GroupMember, GroupSpec, ShardRegistry, owned_registry
from deployments.config import AppConfig, resolve_model_dir

EXPERT_REGISTRY = "expert-registry"  # the deployment actor's name within the EngineServer deployment
FIND_TIMEOUT_S = 60.0


def group_spec(config: AppConfig, model_dir: Path) -> GroupSpec:
    """The expert group of `config`: the same in every engine replica and in the registry."""
    if config.num_expert_shards < 1:
        raise ConfigError(f"transport {config.transport!r} needs num_expert_shards >= 1")
    # num_engines sizes the shards' request coalescing (ray: every engine replica shares them, up to
    # the autoscaling ceiling); a deepspeed group pairs one engine with its own shards.
    engines = 1 if config.transport == "deepspeed" else (
        config.autoscaling.engine_bounds()[1] if config.autoscaling else config.num_engine_replicas)
    return GroupSpec(str(model_dir), config.num_expert_shards, config.transport, config.engine.to_engine_config(),
                     num_engines=engines, exchange_deadline_s=config.exchange_deadline_s,
                     placement_timeout_s=config.expert_placement_timeout_s, shard_num_gpus=config.shard_num_gpus,
                     engine_num_gpus=config.engine_num_gpus)


class ExpertRegistry(ShardRegistry):
    """The ray transport's registry as Serve starts it: from the AppConfig, resolved on its own node."""

    def __init__(self, config: AppConfig) -> None:
        super().__init__(group_spec(config, resolve_model_dir(config.model)))


def expert_registry_options(config: AppConfig) -> dict[str, Any]:
    """The EngineServer deployment's options for its expert registry (transport `ray` only)."""
    if config.transport != "ray":
        return {}
    if config.num_expert_shards < 1:
        raise ConfigError("transport 'ray' needs num_expert_shards >= 1")
    import ray
    from ray.serve.config import DeploymentActorConfig

    return {"deployment_actors": [DeploymentActorConfig(
        name=EXPERT_REGISTRY, actor_class=ray.remote(ExpertRegistry), init_args=(config,),
        actor_options={"num_cpus": 0, "max_concurrency": 4})]}


def find_registry(timeout_s: float = FIND_TIMEOUT_S) -> Any:
    """This engine replica's registry. Right after Serve recreates it the name is missing for a
    moment, so it is looked up until `timeout_s`."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return serve.get_deployment_actor(EXPERT_REGISTRY)
        except ValueError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"the engine deployment's expert registry ({EXPERT_REGISTRY!r}) did not appear "
                                   f"within {timeout_s:g}s") from None
            time.sleep(0.5)


def engine_group(config: AppConfig, model_dir: Path) -> GroupMember:
    """The GroupMember of one engine replica: the deployment's shared registry under `ray`, a group
    of its own under `deepspeed`."""
    from ray import serve

    spec = group_spec(config, model_dir)
    if config.transport == "ray":
        return GroupMember(spec, find_registry(), find_registry=find_registry)
    name = f"{config.app_name}-experts-{serve.get_replica_context().replica_id.unique_id}"
    return GroupMember(spec, owned_registry(spec, name), owns_registry=True)
