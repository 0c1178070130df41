"""The KV load an engine reports for request routing: free blocks net of what the prompts already
admitted or waiting will still take, published by the async engine after every change."""

from __future__ import annotations

import asyncio
from pathlib import Path

from cluster.engine.async_engine import AsyncEngine
from cluster.engine.engine_config import EngineConfig
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.sampling_params import SamplingParams
from cluster.experts.dispatchers import load_local_dispatcher


def test_kv_load_counts_prompts_not_yet_prefilled(tiny_ckpt: Path) -> None:
    engine = LLMEngine(tiny_ckpt, EngineConfig(num_kv_blocks=64, block_size=16, max_num_batched_tokens=32),
                       load_local_dispatcher(tiny_ckpt))
    try:
        assert engine.kv_load().available_blocks == 64
        engine.add_request("long", list(range(1000, 1100)), SamplingParams(max_tokens=4, temperature=0))
        load = engine.kv_load()  # 100 tokens: 7 blocks still to take, none taken
        assert (load.free_blocks, load.reserved_blocks, load.available_blocks, load.num_waiting) == (64, 7, 57, 1)
        engine.step()  # a 32-token chunk: 2 blocks taken, 5 still to come
        load = engine.kv_load()
        assert (load.free_blocks, load.reserved_blocks, load.available_blocks, load.num_running) == (62, 5, 57, 1)
        while engine.has_unfinished():
            engine.step()
        assert engine.kv_load().available_blocks == 64
    finally:
        engine.close()


def test_async_engine_publishes_its_load(tiny_ckpt: Path) -> None:
    engine = AsyncEngine(LLMEngine(tiny_ckpt, EngineConfig(num_kv_blocks=64, block_size=16),
                                   load_local_dispatcher(tiny_ckpt)))
    try:
        async def run() -> list[int]:
            seen = []
            async for _ in engine.generate("r", list(range(1000, 1040)), SamplingParams(max_tokens=3, temperature=0)):
                seen.append(engine.snapshot.load.free_blocks)
            return seen

        seen = asyncio.run(run())
        assert seen[0] == 61  # 40 prompt tokens + 1: 3 blocks
        assert engine.snapshot.load.free_blocks == 64 and engine.snapshot.load.reserved_blocks == 0
    finally:
        engine.shutdown()


def test_async_engine_publishes_a_snapshot_after_every_change(tiny_ckpt: Path) -> None:
    """Stats, load and the dispatcher's expert token counts, published after adds, steps and
    aborts, as copies that later steps do not change."""
    engine = AsyncEngine(LLMEngine(tiny_ckpt, EngineConfig(num_kv_blocks=64, block_size=16),
                                   load_local_dispatcher(tiny_ckpt)))
    text = engine.engine.text
    try:
        start = engine.snapshot
        assert start.stats.generation_tokens == 0 and all(int(c.sum()) == 0 for c in start.expert_tokens.values())

        async def run(request_id: str, prompt: list[int]) -> None:
            async for _ in engine.generate(request_id, prompt, SamplingParams(max_tokens=3, temperature=0)):
                pass

        asyncio.run(run("a", list(range(1000, 1040))))
        first = engine.snapshot
        assert (first.stats.generation_tokens, first.stats.prompt_tokens, first.stats.num_running) == (3, 40, 0)
        # Every token fed to the model (the prompt and all generated tokens but the last) sends
        # num_experts_per_tok pairs through each MoE layer.
        assert sorted(first.expert_tokens) == text.moe_layers
        assert all(int(c.sum()) == 42 * text.num_experts_per_tok for c in first.expert_tokens.values())
        asyncio.run(run("b", list(range(1000, 1010))))
        assert all(int(c.sum()) == 42 * text.num_experts_per_tok for c in first.expert_tokens.values())
        assert engine.snapshot.stats.generation_tokens == 6 and first.stats.generation_tokens == 3
        assert first.reform_seconds == ()
    finally:
        engine.shutdown()
