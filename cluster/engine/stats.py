"""A point-in-time snapshot of the engine, for metrics export and autoscaling."""

from __future__ import annotations

from dataclasses import dataclass


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

    @property
    def kv_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks_total if self.kv_blocks_total else 0.0


@dataclass(frozen=True)
class KVLoad:
    """What request routing needs of a router's KV cache, cheap enough to take after every step."""

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
