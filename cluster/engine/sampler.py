"""Next-token choice for each sequence that completed its step: greedy or sampled."""

from __future__ import annotations

import torch

from cluster.engine.sampling_params import SamplingParams
from cluster.engine.sequence import TokenLogprobs


def _filter(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [V] fp32 -> temperature-scaled logits with top-k / top-p masked to -inf."""
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= params.top_p  # keep the token that crosses top_p
        logits = logits.clone()
        logits[order[drop]] = float("-inf")
    return logits


def sample(logits: torch.Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int]:
    """logits [S, V] -> one token id per row."""
    logits = logits.float()
    if all(p.greedy for p in params):
        return logits.argmax(-1).tolist()
    out = []
    for row, p, g in zip(logits, params, generators, strict=True):
        if p.greedy:
            out.append(int(row.argmax()))
            continue
        probs = _filter(row, p).softmax(-1)
        out.append(int(torch.multinomial(probs, 1, generator=g)))
    return out


def logprobs_of(logits: torch.Tensor, token_id: int, top_n: int) -> TokenLogprobs:
    """The chosen token's log-probability and the top-n alternatives, from raw logits [V]."""
    logp = logits.float().log_softmax(-1)
    top = torch.topk(logp, top_n) if top_n else None
    pairs = tuple(zip(top.indices.tolist(), top.values.tolist(), strict=True)) if top is not None else ()
    return TokenLogprobs(token_id, float(logp[token_id]), pairs)
