"""Point-in-time views of the engine, for metrics export, autoscaling, request routing and
readiness: taken by the engine loop after every change and read by anyone without a lock."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class EngineStats:
    num_running: int
    num_waiting: int
    kv_blocks_used: int
    kv_blocks_total: int
    num_preemptions: int
    forward_calls: int
    prompt_tokens: int
    generation_tokens: int
    aborts: int
    prefix_queried_tokens: int = 0  # prompt tokens looked up in the prefix cache (at each admission from scratch)
    prefix_cached_tokens: int = 0  # of those, tokens found cached (not prefilled)
    prefix_cached_blocks: int = 0  # blocks findable in the prefix cache now (held or free)

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_cached_tokens / self.prefix_queried_tokens if self.prefix_queried_tokens else 0.0

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


@dataclass(frozen=True)
class KVLoad:
    """What request routing needs of an engine's KV cache, cheap enough to take after every step."""

    free_blocks: int  # free now
    reserved_blocks: int  # still to be taken by admitted and waiting prompts (their prefill is not done)
    total_blocks: int
    block_size: int
    num_running: int
    num_waiting: int

    @property
    def available_blocks(self) -> int:
        """Free blocks once every prompt already here is prefilled."""
        return max(self.free_blocks - self.reserved_blocks, 0)


@dataclass(frozen=True)
class EngineSnapshot:
    """What the engine loop publishes after every step, add and abort (`AsyncEngine.snapshot`):
    readers (metrics, autoscaling, routing, readiness) take the latest one and never wait for a
    step. Nothing in it is shared with the engine: the counts are copies."""

    stats: EngineStats
    load: KVLoad
    expert_tokens: Mapping[int, torch.Tensor]  # per MoE layer: routed (token, expert) pairs since start, [E]
    reform_seconds: tuple[float, ...]  # how long each expert-group re-formation took, oldest first
