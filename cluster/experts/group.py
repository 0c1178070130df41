"""Engines and their expert shards as Ray actors.

Shards sit on distinct nodes (one `expert_slot` custom resource per node, STRICT_SPREAD
placement group); engines (attention, no routed experts) run in their own actors, so the calling
process never joins a process group. A `ShardRegistry` actor owns the shards and replaces a dead
one in its bundle, loading the same experts; an engine that loses an exchange asks it, re-forms,
and re-runs its step.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cluster.engine.engine_config import EngineConfig
from cluster.engine.output_aggregator import OutputKind, RequestOutput
from cluster.engine.run_requests import EngineRequest, run_requests
from cluster.errors import ConfigError
from cluster.experts.shard_placement import shard_placement_group
from cluster.experts.shard_worker import ShardWorker, free_port

if TYPE_CHECKING:
    from cluster.experts.dispatchers import RemoteDispatcher

log = logging.getLogger(__name__)
TRANSPORTS = ("deepspeed", "ray")


@dataclass(frozen=True)
class GroupSpec:
    model_dir: str
    num_shards: int
    transport: str
    engine: EngineConfig
    num_engines: int = 1  # engines sending to the shards (the ray transport coalesces their calls)
    exchange_deadline_s: float = 30.0
    torch_threads: int = 1
    expert_cache_bytes: int = 0  # each shard's cache of dequantized FP8 experts, over its layers
    placement_timeout_s: float = 45.0  # the shards' placement group, else PlacementError (what is asked, what is free)
    shard_num_gpus: float = 0.0  # each shard's GPUs from Ray (> 0: its experts and exchange buffers on its GPU)
    engine_num_gpus: float = 0.0  # each engine actor's GPUs from Ray (the offline API's; Serve's: engine_num_gpus)

    def shard_device(self) -> Any:
        """The shards' device as the engine sees it (a shard checks its own CUDA when it starts)."""
        from cluster.experts.devices import shard_device

        return shard_device(self.shard_num_gpus, cuda_available=True)


class ShardRegistry:
    """Ray actor: the placement group of the shards and the current shard actor of every rank;
    replaces dead ones in their bundle. It makes the group's wire secret (ray transport) and hands
    it to its shards and, on request, to engines; nothing prints it (WireSecret's repr hides it)."""

    def __init__(self, spec: GroupSpec, require_distinct_nodes: bool | None = None, pg: Any = None) -> None:
        import ray

        from cluster.experts.wire import WireSecret

        self.spec = spec
        self.secret = WireSecret.generate()
        self.pg = pg if pg is not None else shard_placement_group(spec.num_shards, spec.placement_timeout_s,
                                                                  require_distinct_nodes,
                                                                  gpus_per_shard=spec.shard_num_gpus)
        self.generation = [0] * spec.num_shards
        self.shards = [self._start(rank) for rank in range(spec.num_shards)]
        ray.get([s.ready.remote() for s in self.shards])

    def _start(self, rank: int) -> Any:
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        strategy = PlacementGroupSchedulingStrategy(placement_group=self.pg, placement_group_bundle_index=rank)
        options = ray.remote(ShardWorker).options(num_cpus=0.01, num_gpus=self.spec.shard_num_gpus, max_concurrency=8,
                                                  max_restarts=0, scheduling_strategy=strategy)
        return options.remote(self.spec, rank, self.secret)

    def current(self) -> tuple[list[Any], list[int]]:
        return self.shards, self.generation

    def exchange_secret(self) -> Any:
        """The WireSecret engines prove to the shards' exchange servers (ray transport)."""
        return self.secret

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for shard in self.shards:
            ray.kill(shard)
        remove_placement_group(self.pg)

    def replace(self, rank: int, generation: int) -> tuple[list[Any], list[int]]:
        """Replaces rank's shard unless another engine already did (its generation moved on)."""
        import ray

        if self.generation[rank] == generation:
            ray.kill(self.shards[rank], no_restart=True)
            self.shards[rank] = self._start(rank)
            ray.get(self.shards[rank].ready.remote())
            self.generation[rank] += 1
        return self.shards, self.generation


class GroupMember:
    """An engine's membership in an expert group: forms the transport's `dispatcher` (the engine
    is then built over it) and re-forms the group when an exchange fails. Used inside an
    `EngineWorker` actor and inside the Serve `EngineServer` deployment alike. `find_registry`
    looks up the registry anew when the one held has died (Serve recreates a deployment actor that
    fails its health check)."""

    def __init__(self, spec: GroupSpec, registry: Any, owns_registry: bool = False,
                 find_registry: Callable[[], Any] | None = None) -> None:
        import ray

        from cluster.experts.placement import ExpertPlacement
        from cluster.model.config import load_model_config

        self.spec, self.registry, self.find_registry = spec, registry, find_registry
        self.backend = "gloo"  # the deepspeed group's (nccl when the engine and its shards are on GPUs)
        self.reform_seconds: list[float] = []
        text = load_model_config(spec.model_dir).text
        placement = ExpertPlacement.of_model(text, spec.num_shards)
        shards, _ = ray.get(registry.current.remote())
        if spec.transport == "ray":
            from cluster.experts.transport_ray import RayDispatcher

            secret = ray.get(registry.exchange_secret.remote())
            dispatcher: Any = RayDispatcher(placement, shards, secret, spec.exchange_deadline_s)
        else:
            from cluster.experts.devices import backend_device, exchange_backend
            from cluster.experts.transport_deepspeed import DeepSpeedDispatcher

            self.backend = exchange_backend(spec.engine.resolved_device(), spec.shard_device())
            dispatcher = DeepSpeedDispatcher(placement, text.hidden_size, text.num_experts_per_tok,
                                             spec.exchange_deadline_s, device=backend_device(self.backend))
            self._form(dispatcher, shards)
        dispatcher.on_failure = self._reform
        if owns_registry:  # the group leaves with this engine (scale-down, shutdown)
            dispatcher.on_close = self._release_group
        self.dispatcher: RemoteDispatcher = dispatcher

    def _form(self, dispatcher: Any, shards: list[Any]) -> None:
        """(Re-)forms the DeepSpeed process group: rank 0 here, rank r + 1 on shard r."""
        import ray

        from cluster.experts.transport_deepspeed import GroupAddress

        address = GroupAddress(ray.util.get_node_ip_address(), free_port(), self.spec.num_shards + 1, self.backend)
        joins = [s.join_deepspeed.remote(address, self.spec.exchange_deadline_s) for s in shards]
        dispatcher.join(address)
        ray.get(joins)

    def _release_group(self) -> None:
        import ray

        try:
            ray.get(self.registry.shutdown.remote(), timeout=30)  # the shards, then the placement group
            ray.kill(self.registry)
        except Exception:  # noqa: BLE001 - best effort on the way out; the registry's owner is going too
            log.warning("releasing the expert group failed", exc_info=True)

    def _current(self, timeout_s: float = 120.0) -> tuple[list[Any], list[int]]:
        """The registry's shards and generations; when the registry is gone and `find_registry`
        is set, its successor's (looked up until `timeout_s`: Serve recreates it within seconds,
        and a new registry answers once its shards have loaded)."""
        import ray

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return ray.get(self.registry.current.remote())
            except ray.exceptions.RayActorError:
                if self.find_registry is None or time.monotonic() > deadline:
                    raise
                log.warning("the expert registry is gone; joining its successor")
                time.sleep(0.5)
                self.registry = self.find_registry()

    def _reform(self, dispatcher: Any) -> None:
        import ray

        started = time.monotonic()
        shards, generation = self._current()
        for rank, shard in enumerate(shards):
            try:
                ray.get(shard.ping.remote(), timeout=5)
            except (ray.exceptions.RayError, TimeoutError):
                log.warning("expert shard %d is gone; replacing it", rank)
                shards, generation = ray.get(self.registry.replace.remote(rank, generation[rank]))
        if self.spec.transport == "ray":
            dispatcher.replace_shards(shards, ray.get(self.registry.exchange_secret.remote()))
        else:
            dispatcher.leave()
            self._form(dispatcher, shards)
        self.reform_seconds.append(time.monotonic() - started)


class EngineWorker:
    """Ray actor body of an engine for the offline API: a GroupMember and a synchronous loop."""

    def __init__(self, spec: GroupSpec, registry: Any) -> None:
        import torch

        torch.set_num_threads(spec.torch_threads)
        self.spec, self.registry = spec, registry
        self.member: GroupMember | None = None
        self.engine: Any = None
        self._lock = threading.Lock()  # around each engine call
        # One batch at a time: a batch's outputs are made from every delta of its requests, so
        # another caller stepping the same engine must not take them.
        self._batch = threading.Lock()

    def start(self) -> None:
        from cluster.engine.llm_engine import LLMEngine

        self.member = GroupMember(self.spec, self.registry)
        self.engine = LLMEngine(self.spec.model_dir, self.spec.engine, self.member.dispatcher)

    def generate(self, requests: list[EngineRequest]) -> list[RequestOutput]:
        """The finished outputs, in request order."""
        with self._batch:
            done = {out.request_id: out for out in run_requests(self.engine, requests, OutputKind.FINAL_ONLY,
                                                                self._lock)}
        return [done[r.request_id] for r in requests]

    def validate(self, tokens: list[int]) -> None:
        self.engine.validate_prompt(tokens)

    def time_exchange(self, num_tokens: int, repeats: int, seed: int = 0) -> list[float]:
        """Seconds per round trip of one MoE layer's exchange (dispatch + combine) of
        `num_tokens` random tokens through this engine's transport."""
        with self._lock:
            return time_dispatch(self.engine, num_tokens, repeats, seed)

    def stats(self) -> Any:
        return self.engine.stats()

    def reforms(self) -> list[float]:
        return list(self.member.reform_seconds) if self.member is not None else []

    def held(self) -> dict[str, int]:
        return {n: p.numel() for n, p in self.engine.model.named_parameters()}

    def pairs_sent(self) -> dict[int, int]:
        return dict(self.engine.dispatcher.pairs_sent)

    def token_counts(self) -> dict[int, Any]:
        """Per layer, the (token, expert) pairs this engine sent: [E] per layer."""
        return self.engine.dispatcher.token_counts()

    def check_integrity(self) -> tuple[int, int]:
        with self._lock:
            self.engine.check_integrity()
            return self.engine.blocks.num_free, self.engine.blocks.num_blocks

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def close(self) -> None:
        with self._lock:
            self.engine.close()


class ExpertGroup:
    """Starts (or joins) a Ray cluster and places the engines and shards."""

    def __init__(self, spec: GroupSpec, require_distinct_nodes: bool | None = None) -> None:
        import ray

        if spec.transport not in TRANSPORTS:
            raise ConfigError(f"unknown transport {spec.transport!r} for an expert group; known: {TRANSPORTS}")
        if spec.transport == "deepspeed" and spec.num_engines != 1:
            raise ConfigError("the deepspeed transport pairs one engine with its shards (num_engines=1); "
                              "use transport='ray' for engines sharing shards")
        if not ray.is_initialized():
            # Joins the cluster named by RAY_ADDRESS, or starts a local one.
            ray.init(address=os.environ.get("RAY_ADDRESS"), log_to_driver=False)
        self.spec = spec
        # Placed here, so that a placement the cluster cannot hold is refused (PlacementError) in the caller.
        pg = shard_placement_group(spec.num_shards, spec.placement_timeout_s, require_distinct_nodes,
                                   gpus_per_shard=spec.shard_num_gpus)
        # Actor handles are Any here as elsewhere: ray's types give their methods no `.remote`.
        self.registry: Any = ray.remote(ShardRegistry).options(num_cpus=0, max_concurrency=4).remote(spec, pg=pg)
        worker_cls = ray.remote(EngineWorker).options(num_cpus=0.01, num_gpus=spec.engine_num_gpus, max_concurrency=4)
        self.engines: list[Any] = [worker_cls.remote(spec, self.registry) for _ in range(spec.num_engines)]
        try:
            ray.get([e.start.remote() for e in self.engines])
        except BaseException:  # nothing of a group that did not start stays behind
            from ray.util.placement_group import remove_placement_group

            for actor in [*self.engines, self.registry]:
                ray.kill(actor)
            remove_placement_group(pg)
            raise
        self.engine = self.engines[0]

    @property
    def shards(self) -> list[Any]:
        import ray

        return ray.get(self.registry.current.remote())[0]

    def generate(self, requests: list[EngineRequest]) -> list[RequestOutput]:
        """Requests spread round-robin over the engines, which run concurrently; the finished
        outputs, in request order."""
        import ray

        n = len(self.engines)
        refs = [e.generate.remote(requests[i::n]) for i, e in enumerate(self.engines)]
        parts = ray.get(refs)
        return [parts[j % n][j // n] for j in range(len(requests))]  # request j went to engine j % n

    def validate(self, tokens: list[int]) -> None:
        import ray

        ray.get(self.engine.validate.remote(tokens))

    def shutdown(self) -> None:
        import ray

        try:
            ray.get([e.close.remote() for e in self.engines], timeout=60)
        except ray.exceptions.RayError as exc:
            log.warning("closing engines: %s", exc)
        finally:
            ray.get(self.registry.shutdown.remote(), timeout=60)
            for actor in [*self.engines, self.registry]:
                ray.kill(actor)


def time_dispatch(engine: Any, num_tokens: int, repeats: int, seed: int = 0) -> list[float]:
    """Seconds per `engine.dispatcher.dispatch` of the first MoE layer for `num_tokens` random
    tokens (after two warm-up calls): the exchange through a transport, or the experts' compute
    alone with the in-process dispatcher."""
    import torch

    text = engine.text
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(num_tokens, text.hidden_size, generator=gen, dtype=engine.model.dtype)  # [T, H]
    ids = torch.stack([torch.randperm(text.n_routed_experts, generator=gen)[:text.num_experts_per_tok]
                       for _ in range(num_tokens)])  # [T, K]
    weights = torch.rand(num_tokens, text.num_experts_per_tok, generator=gen)  # [T, K]
    layer = text.moe_layers[0]
    times = []
    for _ in range(repeats + 2):
        start = time.perf_counter()
        engine.dispatcher.dispatch(layer, hidden, ids, weights)
        times.append(time.perf_counter() - start)
    return times[2:]


def owned_registry(spec: GroupSpec, name: str) -> Any:
    """The registry of an engine that owns its group (`GroupMember(..., owns_registry=True)`
    releases it on close): it fate-shares with the calling process, and its placement group is
    created here, so that a caller that is itself a detached actor (a Serve replica) takes it along
    if it dies without closing (a placement group lives as long as the job or detached actor that
    created it)."""
    import ray

    pg = shard_placement_group(spec.num_shards, spec.placement_timeout_s, name=name, gpus_per_shard=spec.shard_num_gpus)
    return ray.remote(ShardRegistry).options(num_cpus=0, max_concurrency=4, name=name,
                                             namespace="moe-cluster").remote(spec, pg=pg)
