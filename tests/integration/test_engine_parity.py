"""Greedy parity with `transformers` on the same checkpoint, fp32, each reference request alone."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from cluster import LLM, SamplingParams
from tests.reference import assert_matches_reference, reference_greedy

NEW_TOKENS = 32
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


def _prompts(lengths: list[int], seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(1000, 131072) for _ in range(n - 1)] for n in lengths]


def _check(llm: LLM, model_dir: Path, prompts: list[list[int]], what: str) -> None:
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for i, (prompt, out) in enumerate(zip(prompts, outs, strict=True)):
        assert out.finish_reason == "length"
        assert_matches_reference(out.token_ids, reference_greedy(model_dir, prompt, NEW_TOKENS), f"{what} #{i}")
    llm.engine.check_integrity()
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks


def test_batch_of_mixed_lengths(tiny_ckpt: Path) -> None:
    llm = LLM(tiny_ckpt, max_num_batched_tokens=96)
    prompts = _prompts([3, 9, 17, 33, 64, 100, 150, 7, 41, 250], seed=1)
    _check(llm, tiny_ckpt, prompts, "batch")
    assert llm.engine.stats().forward_calls < NEW_TOKENS + 15, "requests were not batched together"


@pytest.mark.slow
def test_long_prompt_chunked_across_query_scaling_boundary(tiny_ckpt: Path) -> None:
    # tiny: original_max_position_embeddings 512, so 2100 tokens cross the llama-4 query-scaling
    # boundary four times; a 256-token budget splits the prompt into 9 chunks.
    llm = LLM(tiny_ckpt, max_num_batched_tokens=256)
    prompts = _prompts([2100, 20], seed=2)
    _check(llm, tiny_ckpt, prompts, "long")
    assert llm.engine.stats().forward_calls >= 2100 // 256 + NEW_TOKENS


def test_preemption_by_recompute(tiny_ckpt: Path) -> None:
    # 8 requests of ~60 tokens + 32 new need ~48 blocks of 16; the pool holds 12.
    llm = LLM(tiny_ckpt, num_kv_blocks=12, block_size=16, max_model_len=192, max_num_batched_tokens=128)
    prompts = _prompts([40, 60, 55, 30, 70, 45, 65, 50], seed=3)
    _check(llm, tiny_ckpt, prompts, "preempt")
    assert llm.engine.scheduler.num_preemptions > 0


VARIANTS = {
    "dense_first": {"first_k_dense_replace": 1, "num_hidden_layers": 3},
    "grouped": {"n_group": 4, "topk_group": 2},
    "no_shared": {"n_shared_experts": 0},
    "two_shared": {"n_shared_experts": 2, "routed_scaling_factor": 2.5, "norm_topk_prob": False},
    "no_q_lora": {"q_lora_rank": None, "rope_interleave": False},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_config_variants(make_ckpt, variant: str) -> None:
    ckpt = make_ckpt(variant, preset="tiny", seed=11, text_overrides=VARIANTS[variant])
    llm = LLM(ckpt, max_num_batched_tokens=64)
    _check(llm, ckpt, _prompts([5, 30, 80], seed=4), variant)


def test_per_expert_layout_in_several_files(make_ckpt) -> None:
    fused = make_ckpt("layout_fused", preset="tiny", seed=5)
    split = make_ckpt("layout_split", preset="tiny", seed=5, expert_layout="per_expert", num_files=3)
    assert (split / "model.safetensors.index.json").is_file()
    llm = LLM(split, max_num_batched_tokens=64)
    # The reference loads the fused twin: the same weights, in the layout transformers reads.
    _check(llm, fused, _prompts([6, 25, 90], seed=6), "per_expert")
