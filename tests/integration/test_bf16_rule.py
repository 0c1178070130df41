"""The bf16 rule: the engine in bfloat16 (on the CPU, the same code as on CUDA apart from the
kernels) against transformers in fp32, on four checkpoints and over 500 generated positions.

transformers in fp32 scores the engine's own bf16 greedy tokens by teacher forcing. The engine's
token must be fp32's argmax at least as often as transformers' own bf16 greedy run manages (scored
the same way, in the same test) minus 2 points; and wherever it is not, fp32's top-two gap there
must be small: below 0.3 sigma (sigma: the standard deviation of fp32's logits over the
vocabulary at that position), or on a checkpoint with large logits (weights scaled up), below 1.5
times the largest gap at which transformers' own bf16 run disagrees with fp32.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from cluster import LLM, SamplingParams
from tests.fp8_reference import make_fp8_pair
from tests.reference import load_reference

NEW_TOKENS = 64  # per prompt: 4 checkpoints x 2 prompts x 64 = 512 positions
PROMPT_LENGTHS = (7, 29)
SIGMA_SHARE = 0.3
LARGE_LOGITS_FACTOR = 1.5
POINTS = 0.02


@dataclass(frozen=True)
class Scored:
    """fp32's view of a greedy run's tokens, position by position."""

    agree: list[bool]  # the run's token is fp32's argmax
    gaps: list[float]  # fp32's top-1 minus top-2 logit
    sigmas: list[float]  # std of fp32's logits over the vocabulary


def score(fp32: torch.nn.Module, prompt: list[int], tokens: list[int]) -> Scored:
    """Teacher forcing: one fp32 forward over prompt + tokens; position i's logits judge tokens[i]."""
    ids = torch.tensor([prompt + tokens[:-1]])
    with torch.no_grad():
        logits = fp32(input_ids=ids).logits[0, len(prompt) - 1:].float()  # [N, V]
    top = logits.topk(2, dim=-1)
    chosen = torch.tensor(tokens)
    return Scored((top.indices[:, 0] == chosen).tolist(), (top.values[:, 0] - top.values[:, 1]).tolist(),
                  logits.std(dim=-1).tolist())


def hf_greedy(model: torch.nn.Module, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=None,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def _prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[1] + [rng.randrange(1000, 131072) for _ in range(n - 1)] for n in PROMPT_LENGTHS]


@pytest.fixture(scope="module")
def checkpoints(make_ckpt: Callable[..., Path], ckpt_root: Path) -> dict[str, tuple[Path, Path, bool]]:
    """name -> (the engine's checkpoint, transformers' fp32 checkpoint of the same weights, large logits)."""
    fp8, fp8_ref = make_fp8_pair(ckpt_root, "bf16_rule_fp8", "block", "fused", (32, 64), seed=5)
    tiny = make_ckpt("bf16_rule_tiny", preset="tiny", seed=11)
    small = make_ckpt("bf16_rule_small", preset="small", seed=12)
    scaled = make_ckpt("bf16_rule_scaled", preset="tiny", seed=13, text_overrides={"initializer_range": 0.4})
    return {"tiny": (tiny, tiny, False), "small": (small, small, False), "fp8_block": (fp8, fp8_ref, False),
            "scaled_up": (scaled, scaled, True)}


@pytest.mark.slow
def test_engine_bf16_is_as_close_to_fp32_as_transformers_bf16(checkpoints) -> None:
    from transformers import AutoModelForImageTextToText

    engine_agree: list[bool] = []
    hf_agree: list[bool] = []
    report = []
    for seed, (name, (model_dir, ref_dir, large)) in enumerate(checkpoints.items()):
        prompts = _prompts(seed)
        llm = LLM(model_dir, num_kv_blocks=64, dtype="bfloat16")
        assert llm.engine is not None and llm.engine.runner.dtype == torch.bfloat16
        outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=NEW_TOKENS, ignore_eos=True),
                            use_tqdm=False)
        del llm
        fp32 = load_reference(str(ref_dir))
        bf16 = AutoModelForImageTextToText.from_pretrained(ref_dir, dtype=torch.bfloat16,
                                                           attn_implementation="sdpa").eval()
        mine = [score(fp32, p, list(o.token_ids)) for p, o in zip(prompts, outs, strict=True)]
        theirs = [score(fp32, p, hf_greedy(bf16, p)) for p in prompts]
        del bf16
        hf_worst = max((g for s in theirs for g, a in zip(s.gaps, s.agree, strict=True) if not a), default=0.0)
        for s in mine:
            for i, (agrees, gap, sigma) in enumerate(zip(s.agree, s.gaps, s.sigmas, strict=True)):
                bound = max(SIGMA_SHARE * sigma, LARGE_LOGITS_FACTOR * hf_worst if large else 0.0)
                assert agrees or gap < bound, (
                    f"{name}: position {i}: the engine's bf16 token is not fp32's argmax at a top-two gap of "
                    f"{gap:.4g} (sigma {sigma:.4g}, bound {bound:.4g}; transformers' bf16 disagrees at up to "
                    f"{hf_worst:.4g})")
        engine_agree += [a for s in mine for a in s.agree]
        hf_agree += [a for s in theirs for a in s.agree]
        report.append(f"{name}: engine {sum(a for s in mine for a in s.agree)}/{sum(len(s.agree) for s in mine)}, "
                      f"transformers bf16 {sum(a for s in theirs for a in s.agree)}/"
                      f"{sum(len(s.agree) for s in theirs)}, median sigma "
                      f"{sorted(x for s in mine for x in s.sigmas)[len(mine[0].sigmas)]:.3g}")
    assert len(engine_agree) >= 500
    engine_rate, hf_rate = sum(engine_agree) / len(engine_agree), sum(hf_agree) / len(hf_agree)
    print("\n".join(report))
    assert engine_rate >= hf_rate - POINTS, (f"the engine's bf16 agrees with fp32 at {engine_rate:.1%}, transformers' "
                                             f"bf16 at {hf_rate:.1%}:\n" + "\n".join(report))
