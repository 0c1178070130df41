"""The KV load a router reports for request routing: free blocks net of what the prompts already
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
                seen.append(engine.load.free_blocks)
            return seen

        seen = asyncio.run(run())
        assert seen[0] == 61  # 40 prompt tokens + 1: 3 blocks
        assert engine.load.free_blocks == 64 and engine.load.reserved_blocks == 0
    finally:
        engine.shutdown()
