"""What a request's settings do to its logits before temperature and the filters of the sampler:
`logit_bias`, the repetition, presence and frequency penalties, and the `min_tokens` hold on EOS
and the stop token ids, each as one batched operation over the rows that use it. Rows that use
none of them cost a look at their params; with no such row the logits are returned as they are.

The penalties read each sequence's `TokenCounts`, made at its first sampling and updated with
each token it takes (`record`), so a step reads the counts rather than every token so far.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

import torch

from cluster.engine.sampling_params import SamplingParams
from cluster.engine.sequence import Sequence, TokenCounts


def adjust_logits(logits: torch.Tensor, seqs: Seq[Sequence], eos_ids: frozenset[int]) -> torch.Tensor:
    """logits [S, V], one row per sampling sequence -> the logits its sampling sees (fp32 where
    anything changed): biases added, penalties applied, then EOS (unless `ignore_eos`) and the stop
    token ids at -inf for sequences with fewer than `min_tokens` output tokens."""
    biased = [i for i, s in enumerate(seqs) if s.params.logit_bias]
    penalized = [i for i, s in enumerate(seqs) if s.params.penalized]
    held = [i for i, s in enumerate(seqs) if s.num_output < s.params.min_tokens]
    if not (biased or penalized or held):
        return logits
    out = logits.float().clone()  # [S, V]
    if biased:
        _add_bias(out, [seqs[i] for i in biased], biased)
    if penalized:
        vocab = out.shape[-1]
        counts = []
        for i in penalized:
            seq = seqs[i]
            if seq.counts is None:
                seq.counts = TokenCounts(seq.token_ids, seq.num_prompt_tokens, vocab)
            counts.append(seq.counts)
        out[penalized] = apply_penalties(out[penalized], [seqs[i].params for i in penalized], counts)
    if held:
        rows, ids = [], []
        for i in held:
            params = seqs[i].params
            stops = {t for t in params.stop_token_ids if t < out.shape[-1]} | (set() if params.ignore_eos else eos_ids)
            rows += [i] * len(stops)
            ids += sorted(stops)
        index = (torch.tensor(rows, dtype=torch.long, device=out.device),
                 torch.tensor(ids, dtype=torch.long, device=out.device))
        out[index] = float("-inf")
    return out


def _add_bias(out: torch.Tensor, seqs: list[Sequence], rows: list[int]) -> None:
    row_ids = [r for r, s in zip(rows, seqs, strict=True) for _ in s.params.logit_bias]
    token_ids = [t for s in seqs for t, _ in s.params.logit_bias]
    biases = [b for s in seqs for _, b in s.params.logit_bias]
    index = (torch.tensor(row_ids, dtype=torch.long, device=out.device),
             torch.tensor(token_ids, dtype=torch.long, device=out.device))
    out.index_put_(index, torch.tensor(biases, dtype=out.dtype, device=out.device), accumulate=True)


def apply_penalties(logits: torch.Tensor, params: Seq[SamplingParams], counts: Seq[TokenCounts]) -> torch.Tensor:
    """logits [P, V] fp32 of sequences with penalties, their params and counts -> penalised logits
    [P, V]: repetition over prompt and output tokens (positive logits divided, negative
    multiplied), then frequency (per occurrence) and presence (once) over output tokens, subtracted."""
    device, dtype = logits.device, logits.dtype
    output = torch.stack([c.output for c in counts]).to(device=device, dtype=dtype)  # [P, V]
    seen = torch.stack([c.seen for c in counts]).to(device)  # [P, V]

    def column(values: list[float]) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=device)[:, None]  # [P, 1]

    repetition = column([p.repetition_penalty for p in params])
    frequency = column([p.frequency_penalty for p in params])
    presence = column([p.presence_penalty for p in params])
    repeated = torch.where(logits > 0, logits / repetition, logits * repetition)  # [P, V]
    logits = torch.where(seen, repeated, logits)
    return logits - frequency * output - presence * (output > 0).to(dtype)


def record(seqs: Seq[Sequence], tokens: list[int]) -> None:
    """Adds each sampled token to its sequence's counts (sequences with penalties only)."""
    for seq, token in zip(seqs, tokens, strict=True):
        if seq.counts is not None:
            seq.counts.add(token)
