"""The sampling knobs on crafted logits, each against expected values written out plainly per
token: logit_bias, the repetition, presence and frequency penalties, min_p, min_tokens, and their
order (bias and penalties, then temperature, then the filters)."""

from __future__ import annotations

import math

import pytest
import torch

from cluster.engine.logit_adjustments import adjust_logits, record
from cluster.engine.sampler import filter_logits, sample
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.sequence import Sequence
from cluster.errors import InvalidSamplingParamsError

VOCAB = 50
EOS = frozenset({2})


def _seq(prompt: list[int], output: list[int], **params: object) -> Sequence:
    return Sequence("r", prompt + output, len(prompt), SamplingParams(**params), 0)  # type: ignore[arg-type]


def _logits(rows: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 3  # [S, V]


def test_rows_without_knobs_are_left_as_they_are() -> None:
    logits = _logits(2)
    seqs = [_seq([1, 5], [6], temperature=0.7), _seq([1], [], top_k=3)]
    assert adjust_logits(logits, seqs, EOS) is logits


def test_repetition_penalty_over_prompt_and_output_tokens() -> None:
    logits = _logits(2)
    logits[0, 5], logits[0, 6], logits[0, 7] = 2.0, -1.5, 0.0
    seqs = [_seq([1, 5, 5], [6, 7], repetition_penalty=1.5), _seq([1, 5], [6])]
    got = adjust_logits(logits, seqs, EOS)
    want = logits.clone()
    for tok in {1, 5, 6, 7}:  # prompt and output, once each however often
        x = float(logits[0, tok])
        want[0, tok] = x / 1.5 if x > 0 else x * 1.5
    assert torch.allclose(got, want)
    assert float(got[0, 5]) == pytest.approx(2.0 / 1.5) and float(got[0, 6]) == pytest.approx(-2.25)
    assert torch.equal(got[1], logits[1]), "a row without penalties is untouched"


def test_presence_and_frequency_count_output_tokens_only() -> None:
    logits = _logits(1)
    seq = _seq([1, 5, 6, 6], [6, 7, 7, 7], presence_penalty=0.5, frequency_penalty=0.25)
    got = adjust_logits(logits, [seq], EOS)
    want = logits.clone()
    want[0, 6] -= 0.5 + 0.25 * 1  # once in the output (twice in the prompt, which does not count)
    want[0, 7] -= 0.5 + 0.25 * 3
    assert torch.allclose(got, want)
    assert float(got[0, 5]) == float(logits[0, 5]) and float(got[0, 1]) == float(logits[0, 1])


def test_counts_follow_the_tokens_taken() -> None:
    logits = _logits(1)
    params = dict(presence_penalty=-0.5, frequency_penalty=1.0, repetition_penalty=1.3)
    grown = _seq([1, 5], [], **params)
    adjust_logits(logits, [grown], EOS)  # makes its counts
    for tok in (9, 9, 4):
        record([grown], [tok])
        grown.token_ids.append(tok)
    fresh = _seq([1, 5], [9, 9, 4], **params)
    assert torch.equal(adjust_logits(logits, [grown], EOS), adjust_logits(logits, [fresh], EOS))
    want = logits.clone()
    for tok, n in ((9, 2), (4, 1)):
        want[0, tok] = (want[0, tok] / 1.3 if want[0, tok] > 0 else want[0, tok] * 1.3) - 1.0 * n + 0.5
    for tok in (1, 5):
        want[0, tok] = want[0, tok] / 1.3 if want[0, tok] > 0 else want[0, tok] * 1.3
    assert torch.allclose(adjust_logits(logits, [grown], EOS), want)


def test_logit_bias_adds_to_its_tokens_and_steers_sampling() -> None:
    logits = _logits(2)
    seqs = [_seq([1], [], temperature=0, logit_bias={7: 100, 8: -100, 9: 0.5}), _seq([1], [], temperature=0)]
    got = adjust_logits(logits, seqs, EOS)
    want = logits.clone()
    want[0, 7] += 100
    want[0, 8] -= 100
    want[0, 9] += 0.5
    assert torch.allclose(got, want) and torch.equal(got[1], logits[1])
    tokens = sample(got, [s.params for s in seqs], [None, None])
    assert int(tokens[0]) == 7 and int(tokens[1]) == int(logits[1].argmax())
    banned = _logits(1)
    banned[0, 3] = 50.0  # the argmax, pushed out of reach
    row = _seq([1], [], temperature=1.0, logit_bias={3: -100})
    draws = sample(adjust_logits(banned, [row], EOS).expand(500, -1), [row.params] * 500, [None] * 500)
    assert 3 not in draws.tolist()


def test_bias_comes_before_the_penalties_and_both_before_temperature() -> None:
    logits = torch.zeros(1, VOCAB)
    logits[0, 4] = 1.0
    seq = _seq([4], [], logit_bias={4: 1.0}, repetition_penalty=2.0)
    assert float(adjust_logits(logits, [seq], EOS)[0, 4]) == pytest.approx((1.0 + 1.0) / 2.0)
    # The distribution sampled: softmax((logits + bias - penalties) / T), against the counts drawn.
    logits = torch.log(torch.tensor([[0.4, 0.3, 0.2, 0.1] + [1e-12] * (VOCAB - 4)]))
    seq = _seq([1], [0, 0], temperature=0.5, frequency_penalty=0.3, presence_penalty=0.2, logit_bias={3: 0.4})
    adjusted = adjust_logits(logits, [seq], EOS)
    n = 20000
    counts = torch.bincount(sample(adjusted.expand(n, -1), [seq.params] * n, [None] * n), minlength=VOCAB)
    shifted = [math.log(p) for p in (0.4, 0.3, 0.2, 0.1)]
    shifted[0] -= 0.3 * 2 + 0.2
    shifted[3] += 0.4
    weights = [math.exp(x / 0.5) for x in shifted]
    want = torch.tensor([w / sum(weights) for w in weights])
    assert torch.allclose(counts[:4].float() / n, want, atol=0.015)


def _reference_min_p(row: torch.Tensor, temperature: float, min_p: float) -> torch.Tensor:
    probs = (row / temperature).softmax(-1)
    keep = [float(p) >= min_p * float(probs.max()) for p in probs]
    return torch.tensor(keep)


def test_min_p_keeps_tokens_within_a_ratio_of_the_most_likely() -> None:
    logits = _logits(4, seed=5)
    rows = [(1.0, 0.1), (0.5, 0.3), (2.0, 0.0), (1.0, 1.0)]  # (temperature, min_p)
    temperature = torch.tensor([t for t, _ in rows])
    off = torch.full((4,), VOCAB)
    got = filter_logits(logits, temperature, off, torch.ones(4), torch.tensor([m for _, m in rows]))
    for i, (t, m) in enumerate(rows):
        assert torch.equal(torch.isfinite(got[i]), _reference_min_p(logits[i], t, m)), f"row {i}"
    assert torch.isfinite(got[2]).all(), "min_p 0 keeps everything"
    assert int(torch.isfinite(got[3]).sum()) == 1, "min_p 1 keeps the most likely token only"
    # With top_p, min_p keeps what both keep.
    both = filter_logits(logits[:1], torch.ones(1), torch.full((1,), VOCAB), torch.tensor([0.9]),
                         torch.tensor([0.05]))
    top_p_only = filter_logits(logits[:1], torch.ones(1), torch.full((1,), VOCAB), torch.tensor([0.9]))
    assert torch.equal(torch.isfinite(both[0]), torch.isfinite(top_p_only[0]) & _reference_min_p(logits[0], 1.0, 0.05))


def test_min_tokens_holds_back_eos_and_stop_ids() -> None:
    logits = _logits(4)
    seqs = [_seq([1], [5, 6], min_tokens=3, stop_token_ids=[9, 11]),  # 2 < 3 taken: held
            _seq([1], [5, 6, 7], min_tokens=3, stop_token_ids=[9]),  # 3 taken: free
            _seq([1], [], min_tokens=1, ignore_eos=True, stop_token_ids=[9]),  # EOS is not a stop here
            _seq([1], [], min_tokens=2, stop_token_ids=[VOCAB + 10])]  # an id past the vocabulary: no stop anyway
    got = adjust_logits(logits, seqs, EOS)
    inf = float("-inf")
    assert [float(got[0, t]) for t in (2, 9, 11)] == [inf, inf, inf]
    assert torch.equal(got[1], logits[1])
    assert float(got[2, 9]) == inf and float(got[2, 2]) == float(logits[2, 2])
    assert float(got[3, 2]) == inf and int(torch.isinf(got[3]).sum()) == 1
    others = torch.ones(VOCAB, dtype=torch.bool)
    others[[2, 9, 11]] = False
    assert torch.equal(got[0][others], logits[0][others])


@pytest.mark.parametrize("kwargs, field", [
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"repetition_penalty": 0}, "repetition_penalty"), ({"min_p": 1.5}, "min_p"),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"), ({"logit_bias": {5: 101}}, "logit_bias"),
    ({"logit_bias": {-1: 1}}, "logit_bias"), ({"logit_bias": "x"}, "logit_bias"),
    ({"frequency_penalty": float("inf")}, "frequency_penalty"),
])
def test_bad_knob_values_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidSamplingParamsError, match=field):
        SamplingParams(**kwargs)


def test_logit_bias_is_normalised_and_choices_get_their_own_seeds() -> None:
    params = SamplingParams(logit_bias={9: 1, 3: -2.5}, seed=7, n=3)
    assert params.logit_bias == ((3, -2.5), (9, 1.0))
    assert SamplingParams(logit_bias=[(9, 1), (3, -2.5)]).logit_bias == params.logit_bias
    seeds = [params.for_choice(i).seed for i in range(3)]
    assert seeds[0] == 7 and len(set(seeds)) == 3
    assert all(params.for_choice(i).n == 1 for i in range(3))
    assert SamplingParams().for_choice(2).seed is None
