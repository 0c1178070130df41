"""Prefix caching: prompts that start alike reuse the KV blocks of their longest cached prefix and
prefill only the rest, with the output tokens of the same run with caching off; the counts stay
right through preemption, abort and eviction; a cache salt keeps tenants apart."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster import LLM, SamplingParams
from cluster.engine.block_manager import BlockManager
from cluster.engine.llm_engine import LLMEngine
from cluster.engine.prefix_hash import block_keys

BS = 16
SYSTEM = [1] + list(range(3000, 3039))  # 40 tokens: 2 full blocks and 8 tokens of a third
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


def _prompts() -> list[list[int]]:
    """Mixed prompts: a shared system prefix with different tails, one prompt of exactly 3 blocks
    (and the same again), a prompt that diverges inside the first block, one unrelated."""
    return [SYSTEM + list(range(4000, 4010)),
            SYSTEM + list(range(4100, 4030 + 100)),
            SYSTEM + list(range(4200, 4208)),  # 48 tokens: exactly 3 blocks
            SYSTEM + list(range(4200, 4208)),
            SYSTEM[:10] + list(range(5000, 5030)),
            [1] + list(range(6000, 6070))]


def _llm(ckpt: Path, caching: bool, **kwargs) -> LLM:
    opts = dict(block_size=BS, num_kv_blocks=256, max_num_batched_tokens=64, max_model_len=512)
    return LLM(ckpt, enable_prefix_caching=caching, **{**opts, **kwargs})


def _run(engine: LLMEngine, requests: list[tuple[str, list[int]]], params: SamplingParams = GREEDY,
         abort_after: dict[str, int] | None = None) -> dict[str, list[int]]:
    """Adds the requests and steps to the end, checking integrity after every step; aborts a
    request once it has the number of output tokens in `abort_after`."""
    tokens: dict[str, list[int]] = {}
    for rid, prompt in requests:
        engine.add_request(rid, prompt, params)
    engine.check_integrity()
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.new_token_ids)
            if abort_after and len(tokens[out.request_id]) >= abort_after.get(out.request_id, 1 << 30) \
                    and not out.finished:
                engine.abort(out.request_id)
        engine.check_integrity()
    return tokens


def _prefilled(engine: LLMEngine) -> list[int]:
    """Counts the prompt tokens each step computes (the runner's inputs, wrapped)."""
    counted: list[int] = []
    execute = engine.runner.execute

    def counting(scheduled, tables, samples):
        counted.append(sum(min(s.num_new, max(s.seq.num_prompt_tokens - s.seq.num_computed, 0)) for s in scheduled))
        return execute(scheduled, tables, samples)

    engine.runner.execute = counting  # type: ignore[method-assign]
    return counted


@pytest.fixture(scope="module")
def cached(tiny_ckpt: Path):
    llm = _llm(tiny_ckpt, True)
    yield llm
    llm.engine.close()


@pytest.fixture(scope="module")
def uncached(tiny_ckpt: Path):
    llm = _llm(tiny_ckpt, False)
    yield llm
    llm.engine.close()


def test_block_keys_chain_tokens_and_salt() -> None:
    a = block_keys(list(range(40)), BS)
    assert len(a) == 2 and len(set(a)) == 2
    assert block_keys(list(range(32)) + [7] * 8, BS) == a, "a partial last block has no key"
    b = block_keys([99] + list(range(1, 40)), BS)
    assert b[0] != a[0] and b[1] != a[1], "a key names the whole prefix, not its block alone"
    assert block_keys(list(range(40)), BS, cache_salt="tenant-a")[0] != a[0]
    assert block_keys(list(range(40)), BS, cache_salt="tenant-a") == block_keys(list(range(40)), BS,
                                                                                cache_salt="tenant-a")


def test_lru_eviction_takes_the_least_recently_freed_cached_block() -> None:
    blocks = BlockManager(4, BS)
    keys = block_keys(list(range(64)), BS)
    assert blocks.ensure(1, 64)
    blocks.cache_blocks(1, keys, 4)
    blocks.free(1)
    blocks.check_integrity()
    assert blocks.num_free == 4 and blocks.num_cached == 4, "freed blocks stay cached"
    assert blocks.cached_prefix(keys) == 4
    assert blocks.ensure(2, 16)  # one new block: the table's last block is evicted first
    assert blocks.num_evictions == 1 and blocks.cached_prefix(keys) == 3
    assert blocks.ensure(3, 64, reuse=keys[:2]) is False, "two cached + two new need 4 of the 3 free"
    assert blocks.table(3) == () and blocks.num_free == 3, "a refused ensure takes nothing"
    assert blocks.ensure(3, 48, reuse=keys[:2])  # the cached third block is the one left to evict
    assert [blocks.refcount(b) for b in blocks.table(3)] == [1, 1, 1]
    assert blocks.num_evictions == 2 and blocks.cached_prefix(keys) == 2
    assert blocks.ensure(4, 32, reuse=keys[:2]) and blocks.table(4) == blocks.table(3)[:2]
    assert [blocks.refcount(b) for b in blocks.table(4)] == [2, 2]
    blocks.check_integrity()
    blocks.check_integrity()
    for seq_id in (2, 3, 4):
        blocks.free(seq_id)
    blocks.check_integrity()
    assert blocks.num_free == 4


def test_outputs_match_caching_off_over_mixed_prompts(cached: LLM, uncached: LLM) -> None:
    prompts = _prompts()
    want = _run(uncached.engine, [(f"r{i}", p) for i, p in enumerate(prompts)])
    want.update(_run(uncached.engine, [(f"again{i}", p) for i, p in enumerate(prompts)]))
    engine = cached.engine
    before = engine.stats()
    got = _run(engine, [(f"r{i}", p) for i, p in enumerate(prompts)])
    got.update(_run(engine, [(f"again{i}", p) for i, p in enumerate(prompts)]))
    assert got == want
    assert want[f"again{2}"] == want["r2"]
    stats = engine.stats()
    assert stats.prefix_cached_tokens - before.prefix_cached_tokens >= 5 * 32, "the second wave reused blocks"
    assert uncached.engine.stats().prefix_cached_tokens == 0
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_exact_block_boundary_recomputes_its_last_block(cached: LLM, uncached: LLM) -> None:
    prompt = [1] + list(range(7000, 7047))  # 48 tokens: 3 full blocks
    engine = cached.engine
    first = engine_outputs(engine, "boundary-1", prompt)
    second = engine_outputs(engine, "boundary-2", prompt)
    assert first[0].num_cached_tokens == 0
    assert second[0].num_cached_tokens == 32, "all but the last block (which the last token writes) come cached"
    ref = engine_outputs(uncached.engine, "boundary-ref", prompt)
    tokens = [[t for o in outs for t in o.new_token_ids] for outs in (first, second, ref)]
    assert tokens[0] == tokens[1] == tokens[2]


def engine_outputs(engine: LLMEngine, rid: str, prompt: list[int], params: SamplingParams = GREEDY) -> list:
    engine.add_request(rid, prompt, params)
    outs = []
    while engine.has_unfinished():
        outs += [o for o in engine.step() if o.request_id == rid]
        engine.check_integrity()
    return outs


def test_second_chat_turn_prefills_only_its_new_tokens(cached: LLM) -> None:
    engine = cached.engine
    counted = _prefilled(engine)
    try:
        turn1 = [1] + list(range(8000, 8069))  # 70 tokens
        out1 = [t for o in engine_outputs(engine, "turn-1", turn1) for t in o.new_token_ids]
        assert sum(counted) == 70
        turn2 = turn1 + out1 + list(range(8500, 8520))  # the answer and 20 new tokens: 96 in all
        counted.clear()
        outs = engine_outputs(engine, "turn-2", turn2)
        # turn 1 computed its 70 prompt tokens and 5 of its 6 output tokens: 4 full blocks (64) cached
        assert outs[0].num_cached_tokens == 64
        assert sum(counted) == len(turn2) - 64 == 32
    finally:
        del engine.runner.execute


def test_refcounts_through_preemption_abort_and_eviction(tiny_ckpt: Path, uncached: LLM) -> None:
    """A pool of 14 blocks for six requests that share prefixes (four of them grow to 6 blocks,
    2 shared): admissions reuse cached blocks,
    growth preempts, aborts free mid-decode, and new prompts evict cached blocks, with the
    integrity checked after every step and the greedy tokens of caching off."""
    small = _llm(tiny_ckpt, True, num_kv_blocks=14, max_num_batched_tokens=32, max_model_len=200)
    try:
        engine = small.engine
        params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
        prompts = [(f"p{i}", SYSTEM + list(range(4000 + 10 * i, 4000 + 10 * i + 5))) for i in range(4)]
        prompts += [("other", [1] + list(range(9000, 9050))), ("p0-again", prompts[0][1])]
        got = _run(engine, prompts, params, abort_after={"p1": 12, "other": 10})
        assert engine.scheduler.num_preemptions > 0
        assert engine.blocks.num_evictions > 0
        assert engine.stats().prefix_cached_tokens > 0
        assert engine.blocks.num_free == engine.blocks.num_blocks, "blocks leaked"
        assert engine.blocks.num_cached > 0, "freed blocks stay cached"
        want = _run(uncached.engine, [(f"ref-{rid}", p) for rid, p in prompts], params)
        for rid, _ in prompts:
            n = len(got[rid])
            assert got[rid] == want[f"ref-{rid}"][:n]
        assert len(got["p1"]) == 12 and len(got["p0"]) == 40
    finally:
        small.engine.close()


def test_cache_salt_isolates_tenants(cached: LLM) -> None:
    prompt = [1] + list(range(9100, 9150))
    outs = cached.generate([{"prompt_token_ids": prompt, "cache_salt": "tenant-a"}], GREEDY, use_tqdm=False)
    engine = cached.engine
    before = engine.stats().prefix_cached_tokens
    cached.generate([{"prompt_token_ids": prompt, "cache_salt": "tenant-b"}], GREEDY, use_tqdm=False)
    cached.generate([prompt], GREEDY, use_tqdm=False)
    assert engine.stats().prefix_cached_tokens == before, "another salt (or none) finds nothing cached"
    again = cached.generate([{"prompt_token_ids": prompt, "cache_salt": "tenant-a"}], GREEDY, use_tqdm=False)
    assert engine.stats().prefix_cached_tokens == before + 48
    assert again[0].token_ids == outs[0].token_ids


def _image_chat(text: str, seed: int) -> dict:
    import base64
    import io

    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 256, (48, 40, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    # an earlier turn first: the image tokens come before the text of their own message
    return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "Send it."},
                         {"role": "user", "content": [{"type": "text", "text": "Here it is."},
                                                      {"type": "image_url", "image_url": {"url": url}}]}]}


def test_images_key_their_blocks_by_pixels(cached: LLM, uncached: LLM) -> None:
    """Two prompts of the same token ids whose images differ share only the blocks before the
    image; the same image again shares the blocks over it too; the tokens are caching off's."""
    text = "Describe the picture below in a few words, and say which colours stand out the most in it."
    first, other, again = _image_chat(text, 1), _image_chat(text, 2), _image_chat(text, 1)
    ids = cached.encode(first)
    assert ids == cached.encode(other), "same size: the same token ids, only the pixels differ"
    image_token = cached.model_config.image_token_id
    before_image = ids.index(image_token) // BS * BS
    assert before_image >= BS
    engine = cached.engine
    outs = []
    cached_counts = []
    for prompt in (first, other, again):
        start = engine.stats().prefix_cached_tokens
        outs.append(cached.generate([prompt], GREEDY, use_tqdm=False)[0].token_ids)
        cached_counts.append(engine.stats().prefix_cached_tokens - start)
        engine.check_integrity()
    assert cached_counts[1] == before_image, "another image: the blocks over it are not reused"
    assert cached_counts[2] == (len(ids) - 1) // BS * BS, "the same pixels: every full block but the last"
    want = [uncached.generate([p], GREEDY, use_tqdm=False)[0].token_ids for p in (first, other)]
    assert outs == [want[0], want[1], want[0]]
    assert outs[0] != outs[1], "the pixels matter here, or this test would hold with images ignored"
