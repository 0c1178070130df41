"""Checkpoints saved by transformers' own `save_pretrained` with its default configs load and give
transformers' greedy tokens, in one process and over expert shards. transformers ties lm_head to
the embeddings by the top-level `tie_word_embeddings` of a mistral3 config (default true): such a
save has no lm_head.weight; an untied one has it."""

from __future__ import annotations

import random
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from cluster import LLM, SamplingParams
from cluster.model.tokenizer import write_tekken_v15
from cluster.testing.presets import PRESETS
from tests.reference import assert_matches_reference, reference_greedy

NEW_TOKENS = 24
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def saved(ckpt_root: Path) -> Callable[[bool], Path]:
    """A tiny Mistral3ForConditionalGeneration saved by transformers: its default config (tied), or
    the same with tie_word_embeddings=False."""
    def save(tied: bool) -> Path:
        from transformers import Mistral3Config, Mistral3ForConditionalGeneration, Mistral4Config, PixtralVisionConfig

        out = ckpt_root / ("hf-default-tied" if tied else "hf-untied")
        if out.exists():
            return out
        tiny = PRESETS["tiny"]
        text = {k: v for k, v in tiny.text.items() if k != "tie_word_embeddings"}  # the text config's own default
        extra = {} if tied else {"tie_word_embeddings": False}
        torch.manual_seed(21)
        config = Mistral3Config(text_config=Mistral4Config(**text), vision_config=PixtralVisionConfig(**tiny.vision),
                                **extra)
        Mistral3ForConditionalGeneration(config).save_pretrained(out)
        write_tekken_v15(out / "tekken.json", tiny.vision["patch_size"], config.spatial_merge_size,
                         tiny.max_image_size)
        return out
    return save


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(5)
    return [[1] + [rng.randrange(1000, 131072) for _ in range(n)] for n in (5, 40, 12)]


def _check(outs: list, model_dir: Path, prompts: list[list[int]], what: str) -> None:
    for i, (prompt, out) in enumerate(zip(prompts, outs, strict=True)):
        assert_matches_reference(out.token_ids, reference_greedy(model_dir, prompt, NEW_TOKENS), f"{what} #{i}")


@pytest.mark.parametrize("tied", [True, False])
def test_transformers_save_gives_transformers_tokens(saved, prompts, tied: bool) -> None:
    ckpt = saved(tied)
    with safe_open(ckpt / "model.safetensors", "pt") as f:
        assert any(n.endswith("lm_head.weight") for n in f.keys()) is not tied
    llm = LLM(ckpt)
    assert llm.model_config.text.tie_word_embeddings is tied
    outs = llm.generate(prompts, GREEDY, use_tqdm=False)
    _check(outs, ckpt, prompts, "tied" if tied else "untied")
    shards = LLM(ckpt, num_expert_shards=2)
    assert [o.token_ids for o in shards.generate(prompts, GREEDY, use_tqdm=False)] == [o.token_ids for o in outs]


def test_transformers_saves_over_expert_shards_on_each_transport(expert_nodes, saved, prompts) -> None:
    for transport, tied in (("deepspeed", True), ("ray", False)):
        ckpt = saved(tied)
        llm = LLM(ckpt, transport=transport, num_expert_shards=2)
        try:
            _check(llm.generate(prompts, GREEDY, use_tqdm=False), ckpt, prompts, f"{transport} tied={tied}")
        finally:
            llm.close()
