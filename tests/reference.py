"""The `transformers` reference: greedy tokens of each request run alone, with the top-two
logit gap at every step, so a test can allow a divergence only at a near-tie."""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

TIE_GAP = 1e-4


@dataclass(frozen=True)
class Reference:
    tokens: list[int]
    gaps: list[float]  # top-1 minus top-2 logit at each generated position


@lru_cache(maxsize=4)
def load_reference(model_dir: str):  # noqa: ANN201 - a transformers model
    from transformers import AutoModelForImageTextToText

    # sdpa (transformers' default, pinned): no [T, T] score matrix, so 32K-token prompts fit in memory
    return AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32,
                                                       attn_implementation="sdpa").eval()


def pixel_inputs(images: list) -> dict[str, torch.Tensor]:
    """transformers' image layout from mistral-common's [C, H, W] arrays: a zero-padded batch
    [B, C, Hmax, Wmax] plus image_sizes [B, 2]."""
    hmax, wmax = max(im.shape[1] for im in images), max(im.shape[2] for im in images)
    pixels = torch.zeros(len(images), images[0].shape[0], hmax, wmax)
    for b, im in enumerate(images):
        pixels[b, :, : im.shape[1], : im.shape[2]] = torch.from_numpy(im)
    return {"pixel_values": pixels, "image_sizes": torch.tensor([im.shape[1:] for im in images])}


def reference_greedy(model_dir: Path, prompt: list[int], max_new_tokens: int, **inputs) -> Reference:
    model = load_reference(str(model_dir))
    with torch.no_grad():
        # logits_to_keep=1: each forward's logits at its last position only (generate's default,
        # pinned): a 32K-token prompt's logits at every position would be 16 GiB in fp32
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, eos_token_id=None,
                             pad_token_id=0, logits_to_keep=1, **inputs)
    tokens = out.sequences[0, len(prompt):].tolist()
    gaps = []
    for step in out.logits:
        top = step[0].float().topk(2).values
        gaps.append(float(top[0] - top[1]))
    return Reference(tokens, gaps)


def assert_matches_reference(got: list[int], ref: Reference, what: str = "") -> None:
    """Equal tokens, or a first divergence where the reference's top-two gap is below TIE_GAP
    (after which the continuations legitimately differ)."""
    got = list(got)
    assert len(got) == len(ref.tokens), f"{what}: {len(got)} tokens, reference has {len(ref.tokens)}"
    for i, (a, b) in enumerate(zip(got, ref.tokens, strict=True)):
        if a != b:
            assert ref.gaps[i] < TIE_GAP, (
                f"{what}: token {i} is {a}, reference {b}, with a top-two gap of {ref.gaps[i]:.3g} (not a tie)")
            return
