"""Batched sampling against a per-row reference written out plainly, and seeded rows that pick
the same tokens alone as in any batch (in the sampler and through the engine)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cluster import LLM, SamplingParams
from cluster.engine.sampler import filter_logits, logprobs, sample

VOCAB = 1000
ROWS = [  # (temperature, top_k, top_p)
    (1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (1.0, 50, 0.5), (0.5, 1, 1.0), (2.0, VOCAB + 5, 0.95),
    (1.0, -1, 0.999), (0.9, 200, 1.0),
]


def _reference_filter(row: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """One row [V] the plain way: scale, keep logits >= the k-th largest, then drop the sorted tail
    whose preceding probability mass already reaches top_p."""
    row = row / temperature
    if 0 < top_k < row.shape[0]:
        kth = torch.sort(row, descending=True).values[top_k - 1]
        row = torch.where(row >= kth, row, torch.tensor(float("-inf")))
    if top_p < 1:
        probs = row.softmax(-1)
        order = sorted(range(row.shape[0]), key=lambda i: -float(probs[i]))
        kept, mass = [], 0.0
        for i in order:
            if mass >= top_p:
                break
            kept.append(i)
            mass += float(probs[i])
        mask = torch.ones_like(row, dtype=torch.bool)
        mask[kept] = False
        row = row.masked_fill(mask, float("-inf"))
    return row


def _batch_params(rows: list[tuple[float, int, float]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return (torch.tensor([t for t, _, _ in rows]),
            torch.tensor([k if k > 0 else VOCAB for _, k, _ in rows]),
            torch.tensor([p for _, _, p in rows]))


def test_filter_matches_the_per_row_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(len(ROWS), VOCAB, generator=gen) * 3  # [S, V]
    got = filter_logits(logits, *_batch_params(ROWS))
    for i, (t, k, p) in enumerate(ROWS):
        want = _reference_filter(logits[i], t, k, p)
        survivors = torch.isfinite(want)
        assert torch.equal(torch.isfinite(got[i]), survivors), f"row {i} ({t}, {k}, {p}): different tokens survive"
        assert torch.allclose(got[i][survivors], want[survivors])
        if 0 < k < VOCAB:
            assert int(survivors.sum()) <= k
    assert int(torch.isfinite(got[4]).sum()) == 1, "top_k 1 keeps one token"
    assert torch.isfinite(got[0]).all(), "no filter, nothing masked"


def test_top_k_alone_and_mixed_with_unfiltered_rows() -> None:
    rows = [(1.0, 3, 1.0), (1.0, 0, 1.0), (0.8, 10, 1.0)]  # only top-k: the topk path, not a sort
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(3, VOCAB, generator=gen)
    got = filter_logits(logits, *_batch_params(rows))
    for i, (t, k, p) in enumerate(rows):
        assert torch.equal(torch.isfinite(got[i]), torch.isfinite(_reference_filter(logits[i], t, k, p)))


def test_sampled_tokens_stay_among_the_survivors_and_greedy_rows_take_the_argmax() -> None:
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(len(ROWS) + 2, VOCAB, generator=gen) * 3
    params = [SamplingParams(temperature=0)] + [SamplingParams(temperature=t, top_k=k, top_p=p) for t, k, p in ROWS] \
        + [SamplingParams(temperature=0)]
    allowed = [torch.isfinite(_reference_filter(logits[i + 1], t, k, p)) for i, (t, k, p) in enumerate(ROWS)]
    seen: list[set[int]] = [set() for _ in ROWS]
    for _ in range(40):
        tokens = sample(logits, params, [None] * len(params))
        assert tokens.shape == (len(params),) and tokens.dtype == torch.long
        assert int(tokens[0]) == int(logits[0].argmax()) and int(tokens[-1]) == int(logits[-1].argmax())
        for i in range(len(ROWS)):
            tok = int(tokens[i + 1])
            assert allowed[i][tok], f"row {i} sampled a filtered token"
            seen[i].add(tok)
    assert len(seen[0]) > 5, "an unfiltered row at temperature 1 should vary"
    assert seen[4] == {int(logits[5].argmax())}, "top_k 1 is greedy"


def test_sampling_follows_the_distribution() -> None:
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2] + [1e-9] * 7]))  # [1, 10]
    counts = torch.zeros(10)
    params = [SamplingParams(temperature=1.0)] * 4000
    tokens = sample(logits.expand(4000, -1), params, [None] * 4000)
    counts += torch.bincount(tokens, minlength=10)
    assert torch.allclose(counts[:3] / 4000, torch.tensor([0.5, 0.3, 0.2]), atol=0.03)


def test_a_seeded_row_draws_the_same_alone_and_in_any_batch() -> None:
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, VOCAB, generator=gen) * 2
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=11)

    def draws(rows: list[int], params: list[SamplingParams], seeds: list[int | None]) -> list[int]:
        gens = [None if s is None else torch.Generator().manual_seed(s) for s in seeds]
        at = params.index(seeded)
        return [int(sample(logits[rows], params, gens)[at]) for _ in range(30)]

    alone = draws([2], [seeded], [11])
    mixed = draws([0, 2, 4, 5], [SamplingParams(temperature=1.0), seeded, SamplingParams(temperature=0),
                                 SamplingParams(temperature=0.5, top_k=20, seed=4)], [None, 11, None, 4])
    assert alone == mixed
    assert len(set(alone)) > 1


def test_batched_logprobs_match_per_row_log_softmax() -> None:
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(4, VOCAB, generator=gen)
    tokens = torch.tensor([3, 17, 999, 0])
    got = logprobs(logits, tokens, [2, None, 0, 5])
    assert got[1] is None
    for i, n in ((0, 2), (2, 0), (3, 5)):
        lp = got[i]
        assert lp is not None
        ref = logits[i].log_softmax(-1)
        assert lp.token_id == int(tokens[i]) and lp.logprob == pytest.approx(float(ref[tokens[i]]), abs=1e-5)
        want = torch.topk(ref, n) if n else None
        assert [t for t, _ in lp.top] == ([] if want is None else want.indices.tolist())
        assert [v for _, v in lp.top] == pytest.approx([] if want is None else want.values.tolist(), abs=1e-5)


def test_a_seeded_request_gives_the_same_tokens_alone_and_in_a_mixed_batch(tiny_ckpt: Path) -> None:
    llm = LLM(tiny_ckpt, max_num_batched_tokens=256, max_model_len=512)
    prompt = [1, 1500, 1600, 1700, 1800]
    seeded = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=7, max_tokens=16, ignore_eos=True)
    alone = llm.generate([prompt], seeded, use_tqdm=False)[0].token_ids
    others = [
        ([1, 2100, 2200], SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)),
        ([1] + list(range(3000, 3060)), SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)),
        ([1, 4000], SamplingParams(temperature=1.2, top_k=5, seed=99, max_tokens=16, ignore_eos=True)),
        ([1, 5000, 5001], SamplingParams(n=2, temperature=0.7, seed=3, max_tokens=10, ignore_eos=True)),
    ]
    prompts = [p for p, _ in others[:2]] + [prompt] + [p for p, _ in others[2:]]
    params = [s for _, s in others[:2]] + [seeded] + [s for _, s in others[2:]]
    mixed = llm.generate(prompts, params, use_tqdm=False)
    assert mixed[2].token_ids == alone
    assert len(set(alone)) > 1, "the request should really sample"
    llm.engine.check_integrity()
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks
