"""The `ray` transport (engines sharing shards, M:N) and surviving a dead shard with both
distributed transports."""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
import ray

from cluster import LLM, SamplingParams
from tests.reference import assert_matches_reference, reference_greedy

GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def _prompts(n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(1000, 131072) for _ in range(rng.randrange(3, 90))] for _ in range(n)]


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    return _prompts(6, seed=7)


@pytest.fixture(scope="module")
def local_tokens(tiny_ckpt: Path, prompts) -> list[tuple[int, ...]]:
    return [o.token_ids for o in LLM(tiny_ckpt).generate(prompts, GREEDY, use_tqdm=False)]


@pytest.mark.parametrize("num_shards, num_engines", [(2, 1), (4, 1), (2, 2)])
def test_ray_transport_matches_local_and_reference(expert_nodes, tiny_ckpt: Path, prompts, local_tokens,
                                                   num_shards: int, num_engines: int) -> None:
    llm = LLM(tiny_ckpt, transport="ray", num_expert_shards=num_shards, num_engines=num_engines)
    try:
        outs = llm.generate(prompts, GREEDY, use_tqdm=False)
        for i, (prompt, out) in enumerate(zip(prompts, outs, strict=True)):
            assert out.token_ids == local_tokens[i], f"request {i}: ray transport differs from LocalDispatcher"
            assert_matches_reference(out.token_ids, reference_greedy(tiny_ckpt, prompt, GREEDY.max_tokens), f"#{i}")
        shards = llm.group.shards
        assert len(set(ray.get([s.node_id.remote() for s in shards]))) == num_shards
        engines = llm.group.engines
        assert len(engines) == num_engines
        sent = [ray.get(e.pairs_sent.remote()) for e in engines]
        counts = [ray.get(s.token_counts.remote()) for s in shards]
        for layer in sent[0]:
            assert sum(int(c[layer].sum()) for c in counts if layer in c) == sum(s[layer] for s in sent)
        routed = [ray.get(e.token_counts.remote()) for e in engines]  # per expert, as the engines saw it
        for layer in routed[0]:
            assert sum(r[layer] for r in routed).tolist() == sum(c[layer] for c in counts if layer in c).tolist()
        for e in engines:
            free, total = ray.get(e.check_integrity.remote())
            assert free == total
    finally:
        llm.close()


@pytest.mark.parametrize("transport", ["ray", "deepspeed"])
def test_a_killed_shard_is_replaced_and_requests_finish(expert_nodes, tiny_ckpt: Path, transport: str) -> None:
    prompts = _prompts(16, seed=11)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    expected = [o.token_ids for o in LLM(tiny_ckpt).generate(prompts, params, use_tqdm=False)]
    llm = LLM(tiny_ckpt, transport=transport, num_expert_shards=2, exchange_deadline_s=10.0)
    try:
        engine = llm.group.engine
        victim = llm.group.shards[1]
        victim_id = victim._actor_id.hex()
        result: dict[str, object] = {}
        runner = threading.Thread(target=lambda: result.update(outs=llm.generate(prompts, params, use_tqdm=False)))
        started = time.monotonic()
        runner.start()
        while ray.get(engine.stats.remote()).generation_tokens < 16 * 5:  # mid-generation
            assert time.monotonic() - started < 120, "generation never got going"
            time.sleep(0.05)
        ray.kill(victim, no_restart=True)
        runner.join(timeout=180)
        assert not runner.is_alive(), "generation hung after a shard died"
        outs = result["outs"]
        assert [o.token_ids for o in outs] == expected
        reforms = ray.get(engine.reforms.remote())
        assert len(reforms) >= 1 and all(t > 0 for t in reforms)
        assert llm.group.shards[1]._actor_id.hex() != victim_id
        # The re-formed group serves new requests, and every block is free.
        again = llm.generate(prompts[:2], params, use_tqdm=False)
        assert [o.token_ids for o in again] == expected[:2]
        free, total = ray.get(engine.check_integrity.remote())
        assert free == total
    finally:
        llm.close()
