"""A memory plan: which processes go on which GPU, and how much KV cache each engine gets.

The memory model (docs/OPERATIONS.md, "Memory plan"): every GPU offers `gpu_memory x
memory_fraction`. An engine holds the dense part, its KV pool and an activation reserve (and, with
the `local` transport, every routed expert); an expert shard holds `ceil(E / shards)` experts of
every MoE layer and a small reserve; the vision encoder holds the tower and projector and a
reserve for a batch of full-size images. The layout is the first that fits of:

1. `local`: one engine per GPU, each holding every expert (no exchange at all);
2. `ray`: as few expert shards as hold the experts (one per GPU, spread over nodes first), then
   one engine on every GPU with room for one, the vision encoder where it fits most tightly.

Every engine gets the same KV pool (the Serve config has one `engine` for all replicas): what the
tightest engine GPU has left. A layout that does not fit raises `LayoutDoesNotFitError` naming
the shortfall.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from cluster.errors import ConfigError
from cluster.model.footprint import ModelFootprint
from cluster.model.footprint import fmt_bytes as fmt
from deployments.config import EngineSettings
from deployments.settings import VisionSettings


class LayoutDoesNotFitError(ConfigError):
    """The model and the asked context x batch do not fit the GPUs; the message names the shortfall."""


@dataclass(frozen=True)
class ClusterSpec:
    nodes: int
    gpus_per_node: int
    gpu_memory: int  # bytes per GPU
    memory_fraction: float = 0.9
    accelerator: str = "gpu"  # "cpu": each "GPU" is a memory slot of a CPU node; nothing asks Ray for GPUs

    def __post_init__(self) -> None:
        for name in ("nodes", "gpus_per_node", "gpu_memory"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 < self.memory_fraction <= 1:
            raise ConfigError(f"memory_fraction must be in (0, 1], got {self.memory_fraction}")

    @property
    def num_gpus(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def usable(self) -> int:
        return int(self.gpu_memory * self.memory_fraction)


@dataclass(frozen=True)
class Workload:
    context: int  # tokens of one sequence
    batch: int  # concurrent sequences of `context` tokens every engine must hold
    block_size: int = EngineSettings().block_size
    max_num_batched_tokens: int = EngineSettings().max_num_batched_tokens
    engine_reserve: int | None = None  # None: the estimate below

    def __post_init__(self) -> None:
        for name in ("context", "batch", "block_size", "max_num_batched_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def max_num_seqs(self) -> int:
        return max(self.batch, EngineSettings().max_num_seqs)


@dataclass(frozen=True)
class Reserves:
    """Activation memory set aside per process (bytes)."""

    engine: int  # a prefill chunk at the end of a full context expands its latents per head; the step's logits
    shard: int  # a step's routed rows through gate/up/down, and one expert dequantized (FP8)
    vision: int  # a batch of full-size images through one tower layer


def reserves(fp: ModelFootprint, work: Workload) -> Reserves:
    t, act = fp.config.text, fp.act_bytes
    engine = work.engine_reserve if work.engine_reserve is not None else (
        work.context * t.num_attention_heads * (t.qk_head_dim + t.v_head_dim) * act
        + work.max_num_seqs * t.vocab_size * 4)
    h, inter = t.hidden_size, t.moe_intermediate_size
    shard = work.max_num_batched_tokens * t.num_experts_per_tok * (h + 3 * inter) * act
    if fp.quant is not None:
        shard += 3 * h * inter * act
    vision = 0
    if fp.config.vision is not None:
        from cluster.model.preflight import vision_field

        patches = (vision_field(fp.config, "image_size") // vision_field(fp.config, "patch_size")) ** 2
        per_image = patches * (4 * vision_field(fp.config, "hidden_size")
                               + 2 * vision_field(fp.config, "intermediate_size")) * act
        vision = per_image * VisionSettings().max_batch_size
    return Reserves(engine, shard, vision)


@dataclass(frozen=True)
class GpuUse:
    index: int
    node: int
    items: tuple[tuple[str, int], ...]  # (what, bytes)

    @property
    def used(self) -> int:
        return sum(b for _, b in self.items)


@dataclass(frozen=True)
class MemoryPlan:
    footprint: ModelFootprint
    cluster: ClusterSpec
    workload: Workload
    reserves: Reserves
    transport: str  # "local" or "ray"
    num_expert_shards: int  # 0 with the local transport
    experts_per_shard: int  # of every MoE layer
    num_engines: int
    engine_kv_bytes: int  # each engine's KV pool
    gpus: tuple[GpuUse, ...]

    @property
    def kv_bytes_per_sequence(self) -> int:
        """One sequence of `context` tokens, in whole KV blocks."""
        w = self.workload
        return math.ceil(w.context / w.block_size) * w.block_size * self.footprint.kv_bytes_per_token

    @property
    def sequences_per_engine(self) -> int:
        return self.engine_kv_bytes // self.kv_bytes_per_sequence

    def engine_bytes(self) -> int:
        fp = self.footprint
        experts = fp.expert_bytes + self.reserves.shard if self.transport == "local" else 0
        return fp.dense_bytes + experts + self.engine_kv_bytes + self.reserves.engine

    def shard_bytes(self) -> int:
        fp = self.footprint
        return self.experts_per_shard * fp.moe_layers * fp.bytes_per_expert + self.reserves.shard

    def vision_bytes(self) -> int:
        return self.footprint.vision_bytes + self.reserves.vision if self.footprint.config.vision is not None else 0


def plan_layout(fp: ModelFootprint, cluster: ClusterSpec, work: Workload) -> MemoryPlan:
    res = reserves(fp, work)
    kv_seq = math.ceil(work.context / work.block_size) * work.block_size * fp.kv_bytes_per_token
    kv_min = work.batch * kv_seq
    base = MemoryPlan(fp, cluster, work, res, "local", 0, fp.num_experts, 0, kv_min, ())
    order = [node * cluster.gpus_per_node + local for local in range(cluster.gpus_per_node)
             for node in range(cluster.nodes)]  # shards on distinct nodes first (one `expert_slot` each)
    local = _place(base, order, shards=0)
    if local is not None:
        return local
    experts = fp.num_experts
    for shards in range(1, min(cluster.num_gpus, experts) + 1):
        per_shard = math.ceil(experts / shards)
        sharded = MemoryPlan(fp, cluster, work, res, "ray", shards, per_shard, 0, kv_min, ())
        if sharded.shard_bytes() > cluster.usable:
            continue
        placed = _place(sharded, order, shards)
        if placed is not None:
            return placed
    raise LayoutDoesNotFitError(_shortfall(base, order))


def _place(plan: MemoryPlan, order: list[int], shards: int) -> MemoryPlan | None:
    """Shards on the first GPUs of `order`, an engine on every GPU with room for one, the vision
    encoder on the tightest GPU that still holds it; None when no engine or no vision encoder fits."""
    cluster, usable = plan.cluster, plan.cluster.usable
    items: dict[int, list[tuple[str, int]]] = {g: [] for g in range(cluster.num_gpus)}
    for rank in range(shards):
        items[order[rank]].append((f"expert shard {rank} ({plan.experts_per_shard} experts x "
                                   f"{plan.footprint.moe_layers} layers)", plan.shard_bytes()))

    def free(g: int) -> int:
        return usable - sum(b for _, b in items[g])

    engine_min = plan.engine_bytes()
    engines = [g for g in order if free(g) >= engine_min]
    if not engines:
        return None
    vision = plan.vision_bytes()
    if vision:
        # Tightest fit first, not counting an engine GPU's room below its own minimum.
        room = {g: free(g) - (engine_min if g in engines else 0) for g in order}
        fits = [g for g in order if room[g] >= vision]
        if not fits:
            return None
        items[min(fits, key=lambda g: room[g])].append(("vision encoder", vision))
    kv = plan.engine_kv_bytes + min(free(g) for g in engines) - engine_min  # every engine the same
    placed = replace(plan, num_engines=len(engines), engine_kv_bytes=kv)
    for rank, g in enumerate(engines):
        items[g].append((f"engine {rank}", placed.engine_bytes()))
    gpus = tuple(GpuUse(g, g // cluster.gpus_per_node, tuple(items[g])) for g in range(cluster.num_gpus))
    return replace(placed, gpus=gpus)


def _shortfall(base: MemoryPlan, order: list[int]) -> str:
    """The one-line refusal: the total when that is short, else the first GPU that cannot hold its part."""
    fp, c, w, res = base.footprint, base.cluster, base.workload, base.reserves
    total_usable = c.usable * c.num_gpus
    kv = w.batch * base.kv_bytes_per_sequence
    reserve = res.engine + res.shard + (res.vision if fp.config.vision is not None else 0)
    need = fp.total_bytes + kv + reserve
    gpus = f"{c.num_gpus} x {fmt(c.gpu_memory)} x {c.memory_fraction:g} = {fmt(total_usable)} usable"
    if need > total_usable:
        return (f"does not fit: needs {fmt(need)} (weights {fmt(fp.total_bytes)}, KV {fmt(kv)} for {w.batch} x "
                f"{w.context:,} tokens, activation reserves {fmt(reserve)}) but {gpus}: short by "
                f"{fmt(need - total_usable)}")
    engine = fp.dense_bytes + kv + res.engine
    if engine > c.usable:
        return (f"does not fit: one engine needs {fmt(engine)} on one GPU (dense {fmt(fp.dense_bytes)}, KV "
                f"{fmt(kv)} for {w.batch} x {w.context:,} tokens, reserve {fmt(res.engine)}) but a GPU offers "
                f"{fmt(c.usable)}: short by {fmt(engine - c.usable)}")
    shards = max(1, math.ceil(fp.expert_bytes / max(c.usable - res.shard, 1)))
    if shards > c.num_gpus:
        per = math.ceil(fp.num_experts / c.num_gpus) * fp.moe_layers * fp.bytes_per_expert + res.shard
        return (f"does not fit: the experts over {c.num_gpus} GPU(s) need {fmt(per)} each but a GPU offers "
                f"{fmt(c.usable)}: short by {fmt(per - c.usable)}")
    shard = replace(base, transport="ray", num_expert_shards=shards,
                    experts_per_shard=math.ceil(fp.num_experts / shards))
    rooms = [c.usable - (shard.shard_bytes() if rank < shards else 0) for rank in range(c.num_gpus)]
    where = f"does not fit per GPU ({gpus} in total): after {shards} expert shard(s) of {fmt(shard.shard_bytes())}"
    if max(rooms) < engine:
        return (f"{where} the most room left on a GPU is {fmt(max(rooms))}, but one engine needs {fmt(engine)} "
                f"(dense {fmt(fp.dense_bytes)}, KV {fmt(kv)} for {w.batch} x {w.context:,} tokens, reserve "
                f"{fmt(res.engine)}): short by {fmt(engine - max(rooms))}")
    room = max(r - engine if r >= engine else r for r in rooms)
    return (f"{where} and the engines the most room left on a GPU is {fmt(room)}, but the vision encoder needs "
            f"{fmt(base.vision_bytes())}: short by {fmt(base.vision_bytes() - room)}")
