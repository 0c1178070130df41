"""A router and its expert shards as Ray actors: shards on distinct nodes (one `expert_slot`
custom resource per node, STRICT_SPREAD placement group), the router in its own actor, so the
calling process never joins the process group."""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from typing import Any

from cluster.engine_config import EngineConfig
from cluster.errors import ConfigError
from cluster.sampling_params import SamplingParams
from cluster.sequence import ImageRows, RequestOutput

log = logging.getLogger(__name__)
EXPERT_SLOT = "expert_slot"


@dataclass(frozen=True)
class GroupSpec:
    model_dir: str
    num_shards: int
    transport: str
    engine: EngineConfig
    torch_threads: int = 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class ShardWorker:
    """Ray actor body of one expert shard (rank >= 1 in the group)."""

    def __init__(self, spec: GroupSpec, rank: int) -> None:
        import torch

        from cluster.checkpoint import CheckpointReader
        from cluster.config import load_model_config
        from cluster.expert_shard import ExpertShard
        from cluster.placement import ExpertPlacement

        torch.set_num_threads(spec.torch_threads)
        config = load_model_config(spec.model_dir)
        self.text = config.text
        self.placement = ExpertPlacement.contiguous(self.text.moe_layers, self.text.n_routed_experts, spec.num_shards)
        self.rank, self.world = rank, spec.num_shards + 1
        self.shard = ExpertShard(CheckpointReader(spec.model_dir, config), self.placement, rank - 1)

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def join(self, address: Any) -> None:
        from cluster.transport_deepspeed import init_group

        init_group(address, self.rank)

    def serve(self) -> int:
        from cluster.transport_deepspeed import run_shard

        return run_shard(self.shard, self.rank, self.world, self.text.hidden_size, self.text.num_experts_per_tok)

    def held(self) -> dict[str, int]:
        return self.shard.held()

    def reads(self) -> list[str]:
        return self.shard.reads

    def token_counts(self) -> dict[int, Any]:
        return self.shard.token_counts()


class RouterWorker:
    """Ray actor body of the router: the engine with a transport's dispatcher, no experts."""

    def __init__(self, spec: GroupSpec) -> None:
        import torch

        torch.set_num_threads(spec.torch_threads)
        self.spec = spec
        self.port = _free_port()
        self.engine: Any = None

    def address(self) -> tuple[str, int]:
        import ray

        return ray.util.get_node_ip_address(), self.port

    def join(self, address: Any) -> None:
        from cluster.config import load_model_config
        from cluster.engine import LLMEngine
        from cluster.placement import ExpertPlacement
        from cluster.transport_deepspeed import DeepSpeedDispatcher, init_group

        init_group(address, 0)
        text = load_model_config(self.spec.model_dir).text
        placement = ExpertPlacement.contiguous(text.moe_layers, text.n_routed_experts, self.spec.num_shards)
        dispatcher = DeepSpeedDispatcher(placement, text.hidden_size, text.num_experts_per_tok)
        self.engine = LLMEngine(self.spec.model_dir, self.spec.engine, dispatcher=dispatcher)

    def generate(self, requests: list[tuple[list[int], SamplingParams, ImageRows | None]]) -> list[RequestOutput]:
        ids = []
        for i, (tokens, params, images) in enumerate(requests):
            rid = f"r{id(requests)}-{i}"
            self.engine.add_request(rid, tokens, params, images)
            ids.append(rid)
        done: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[r] for r in ids]

    def validate(self, tokens: list[int]) -> None:
        self.engine.validate_prompt(tokens)

    def held(self) -> dict[str, int]:
        return {n: p.numel() for n, p in self.engine.model.named_parameters()}

    def reads(self) -> list[str]:
        return []

    def pairs_sent(self) -> dict[int, int]:
        return dict(self.engine.dispatcher.pairs_sent)

    def check_integrity(self) -> tuple[int, int]:
        self.engine.check_integrity()
        return self.engine.blocks.num_free, self.engine.blocks.num_blocks

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def close(self) -> None:
        self.engine.close()


class ExpertGroup:
    """Starts (or joins) a Ray cluster and places one router and its shards."""

    def __init__(self, spec: GroupSpec, require_distinct_nodes: bool | None = None) -> None:
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        if spec.transport != "deepspeed":
            raise ConfigError(f"transport {spec.transport!r} does not run on Ray actors; use 'deepspeed'")
        if not ray.is_initialized():
            # Joins the cluster named by RAY_ADDRESS, or starts a local one.
            ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)
        slots = int(ray.cluster_resources().get(EXPERT_SLOT, 0))
        distinct = slots >= spec.num_shards
        if require_distinct_nodes and not distinct:
            raise ConfigError(f"{spec.num_shards} expert shards need {spec.num_shards} nodes with an "
                              f"'{EXPERT_SLOT}' resource; the cluster has {slots}")
        if not distinct:
            log.warning("cluster has %d '%s' resources for %d shards: shards may share nodes",
                        slots, EXPERT_SLOT, spec.num_shards)
        bundle = {EXPERT_SLOT: 1, "CPU": 0.01} if distinct else {"CPU": 0.01}
        self.pg = placement_group([bundle] * spec.num_shards, strategy="STRICT_SPREAD" if distinct else "PACK")
        ray.get(self.pg.ready(), timeout=120)
        self.spec = spec
        self.router = ray.remote(num_cpus=0.01)(RouterWorker).remote(spec)
        shard_cls = ray.remote(num_cpus=0.01, max_concurrency=2)(ShardWorker)
        self.shards = [
            shard_cls.options(scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=self.pg, placement_group_bundle_index=i)).remote(spec, i + 1)
            for i in range(spec.num_shards)]
        from cluster.transport_deepspeed import GroupAddress

        host, port = ray.get(self.router.address.remote())
        address = GroupAddress(host, port, spec.num_shards + 1)
        ray.get([self.router.join.remote(address)] + [s.join.remote(address) for s in self.shards])
        self._loops = [s.serve.remote() for s in self.shards]

    def generate(self, requests: list[tuple[list[int], SamplingParams, ImageRows | None]]) -> list[RequestOutput]:
        import ray

        return ray.get(self.router.generate.remote(requests))

    def validate(self, tokens: list[int]) -> None:
        import ray

        ray.get(self.router.validate.remote(tokens))

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        try:
            ray.get(self.router.close.remote(), timeout=60)
            ray.get(self._loops, timeout=60)
        finally:
            for actor in [self.router, *self.shards]:
                ray.kill(actor)
            remove_placement_group(self.pg)
