"""Greedy parity with `transformers` on a 32K-token prompt of the `long` preset (fp32), chunked
prefill across the YaRN scaling boundary many times over.

The reference stays bounded (tests/reference.py): sdpa attention (no [T, T] scores) and logits at
the last position of each forward only; measured at about 0.55 GiB peak on this prompt."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from cluster import LLM, SamplingParams
from cluster.model.config import load_model_config
from tests.reference import assert_matches_reference, reference_greedy

pytestmark = pytest.mark.slow

PROMPT_LEN = 32_771  # past 32K, and not a multiple of the block size
CHUNK = 3_000  # prefill steps that start and end inside the 512-position scaling periods
NEW_TOKENS = 16


def test_32k_prompt_across_the_rope_scaling_boundary(long_ckpt: Path) -> None:
    rope = load_model_config(long_ckpt).text.hf_config().rope_parameters
    original = rope["original_max_position_embeddings"]
    assert PROMPT_LEN >= 32 * 1024 and PROMPT_LEN > 8 * original and PROMPT_LEN % CHUNK > 0, rope
    rng = random.Random(32)
    prompt = [1] + [rng.randrange(1000, 131072) for _ in range(PROMPT_LEN - 1)]
    llm = LLM(long_ckpt, max_num_batched_tokens=CHUNK)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True),
                       use_tqdm=False)[0]
    assert out.finish_reason == "length"
    # prefill in at least ceil(32,771 / 3,000) = 11 steps, then a step per further token
    assert llm.engine.stats().forward_calls >= -(-PROMPT_LEN // CHUNK) + NEW_TOKENS - 1
    assert_matches_reference(out.token_ids, reference_greedy(long_ckpt, prompt, NEW_TOKENS), "32K prompt")
    llm.engine.check_integrity()
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks
