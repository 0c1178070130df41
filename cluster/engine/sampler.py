"""Next-token choice for every sampled row of a step at once: greedy, temperature, top-k, top-p
and min-p as batch tensors, and logprobs over the batch. (What a request's bias, penalties and
min_tokens do to its logits comes before, in `cluster.engine.logit_adjustments`.)

A sampled row's token is the exponential race `argmax(probs / q)` with `q ~ Exp(1)` per token,
which draws from `probs` exactly. Rows with a seed draw their `q` from their own generator (torch
has no batched per-row generator, so this is the one loop over rows), one vocabulary-wide draw per
step whatever else is in the batch: a seeded request picks the same tokens alone as in any batch.
The other rows draw their `q` together from torch's default generator.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from cluster.engine.sampling_params import SamplingParams, choice_seed
from cluster.engine.sequence import TokenLogprobs

__all__ = ["choice_generator", "choice_seed", "filter_logits", "logprobs", "sample"]


def choice_generator(params: SamplingParams, index: int) -> torch.Generator | None:
    """The generator of choice `index` of a seeded request (None without a seed)."""
    if params.seed is None:
        return None
    return torch.Generator().manual_seed(choice_seed(params.seed, index))


def filter_logits(logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor,
                  top_p: torch.Tensor, min_p: torch.Tensor | None = None) -> torch.Tensor:
    """logits [S, V] fp32 -> temperature-scaled logits with the tokens outside each row's top-k,
    then top-p, then min-p masked to -inf. temperature [S] (> 0), top_k [S] (V or more: off), top_p
    [S] (1: off), min_p [S] (0 or None: off). Ties with the k-th logit survive top-k; top-p keeps
    the token that crosses it; min-p keeps the tokens at least `min_p` times as likely as the most
    likely one (a ratio, so the same before or after top-k and top-p renormalise). The settings may
    be host tensors (the sampler's): which filters run is decided from them, without a device read."""
    device = logits.device
    scaled = _top_k_top_p(logits / temperature.to(device)[:, None], top_k, top_p)  # [S, V]
    if min_p is None or not bool((min_p > 0).any()):
        return scaled
    floor = scaled.max(-1, keepdim=True).values + min_p.to(device).log()[:, None]  # [S, 1]; log 0 = -inf: off
    return scaled.masked_fill(scaled < floor, float("-inf"))


def _top_k_top_p(scaled: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    vocab = scaled.shape[-1]
    use_top_k, use_top_p = bool((top_k < vocab).any()), bool((top_p < 1).any())
    if not (use_top_k or use_top_p):
        return scaled
    top_p = top_p.to(scaled.device)
    if not use_top_p:
        on = top_k < vocab  # [S]
        widest = int(top_k[on].max())
        top_k, on = top_k.to(scaled.device), on.to(scaled.device)
        values = torch.topk(scaled, widest, dim=-1).values  # [S, widest], descending
        kth = values.gather(1, (top_k.clamp(max=widest) - 1)[:, None])  # [S, 1]
        kth = kth.masked_fill(~on[:, None], float("-inf"))
        return scaled.masked_fill(scaled < kth, float("-inf"))
    ordered, order = scaled.sort(dim=-1, descending=True, stable=True)  # [S, V]
    top_k = top_k.to(scaled.device)
    if use_top_k:
        kth = ordered.gather(1, (top_k.clamp(max=vocab) - 1)[:, None])  # [S, 1]
        ordered = ordered.masked_fill(ordered < kth, float("-inf"))
    probs = ordered.softmax(-1)  # [S, V]
    drop = (probs.cumsum(-1) - probs >= top_p[:, None]) & (top_p < 1)[:, None]  # [S, V], in sorted order
    if use_top_k:
        drop |= ordered == float("-inf")
    mask = torch.zeros_like(drop).scatter_(1, order, drop)  # [S, V], back in vocabulary order
    return scaled.masked_fill(mask, float("-inf"))


def sample(logits: torch.Tensor, params: Sequence[SamplingParams],
           generators: Sequence[torch.Generator | None]) -> torch.Tensor:
    """logits [S, V] -> token ids [S] (int64): greedy rows by argmax, the others sampled."""
    rows = [i for i, p in enumerate(params) if not p.greedy]
    if not rows:
        return logits.argmax(-1)  # [S]
    vocab = logits.shape[-1]
    tokens = torch.empty(len(params), dtype=torch.long, device=logits.device)  # [S]
    if len(rows) < len(params):
        greedy = [i for i, p in enumerate(params) if p.greedy]
        tokens[greedy] = logits[greedy].argmax(-1)
    chosen = [params[i] for i in rows]
    # On the host: filter_logits decides which filters run from them without reading the device.
    temperature = torch.tensor([p.temperature for p in chosen], dtype=torch.float32)  # [R]
    top_k = torch.tensor([p.top_k if p.top_k > 0 else vocab for p in chosen])  # [R]
    top_p = torch.tensor([p.top_p for p in chosen], dtype=torch.float32)  # [R]
    min_p = torch.tensor([p.min_p for p in chosen], dtype=torch.float32)  # [R]
    picked = logits if len(rows) == len(params) else logits[rows]
    probs = filter_logits(picked.float(), temperature, top_k, top_p, min_p).softmax(-1)  # [R, V]
    noise = torch.empty_like(probs).exponential_()  # [R, V]
    for r, i in enumerate(rows):
        if generators[i] is not None:
            noise[r] = torch.empty(vocab, dtype=noise.dtype).exponential_(generator=generators[i])  # CPU generators
    tokens[rows] = (probs / noise).argmax(-1)
    return tokens


def logprobs(logits: torch.Tensor, tokens: torch.Tensor, top_n: Sequence[int | None]
             ) -> list[TokenLogprobs | None]:
    """Per row of logits [S, V] with `top_n` not None: the log-probability of its token (tokens [S])
    and its top-n alternatives, best first, from the raw logits; None for the other rows."""
    rows = [i for i, n in enumerate(top_n) if n is not None]
    out: list[TokenLogprobs | None] = [None] * len(top_n)
    if not rows:
        return out
    logp = logits[rows].float().log_softmax(-1)  # [R, V]
    ids = tokens[rows]  # [R]
    chosen = logp.gather(1, ids[:, None])[:, 0].tolist()  # [R]
    widest = max(top_n[i] or 0 for i in rows)
    top_ids: list[list[int]] = [[] for _ in rows]
    top_lp: list[list[float]] = [[] for _ in rows]
    if widest:
        top = torch.topk(logp, widest, dim=-1)  # [R, widest]
        top_ids, top_lp = top.indices.tolist(), top.values.tolist()
    for r, (i, tok) in enumerate(zip(rows, ids.tolist(), strict=True)):
        n = top_n[i] or 0
        out[i] = TokenLogprobs(tok, chosen[r], tuple(zip(top_ids[r][:n], top_lp[r][:n], strict=True)))
    return out
