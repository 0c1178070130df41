"""The sampling knobs through the offline engine on the tiny checkpoint: what each does to the
tokens, checked against the engine's own unpenalised greedy run or its raw logprobs."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from cluster import LLM, SamplingParams
from cluster.errors import InvalidSamplingParamsError

PROMPT = [1, 1500, 1600, 1700]


@pytest.fixture(scope="module")
def llm(tiny_ckpt: Path):
    llm = LLM(tiny_ckpt, max_num_batched_tokens=64, max_model_len=1024)
    yield llm
    llm.engine.check_integrity()


def _one(llm: LLM, **params: object):
    return llm.generate([PROMPT], SamplingParams(**params), use_tqdm=False)[0]  # type: ignore[arg-type]


def test_n_seeded_choices_differ_and_repeat(llm: LLM) -> None:
    params = SamplingParams(n=3, temperature=0.8, seed=1234, max_tokens=12, ignore_eos=True)
    first = [c.token_ids for c in llm.generate([PROMPT], params, use_tqdm=False)[0].outputs]
    again = [c.token_ids for c in llm.generate([PROMPT], params, use_tqdm=False)[0].outputs]
    assert len(first) == 3 and len(set(first)) == 3, "three different choices"
    assert again == first, "the same three on a repeat"
    # Choice i is what a single request seeded as choice i gives (the serving path sends those).
    singles = [_one(llm, temperature=0.8, seed=params.for_choice(i).seed, max_tokens=12, ignore_eos=True).token_ids
               for i in range(3)]
    assert singles == first


def test_logit_bias_on_eos_and_min_tokens(llm: LLM) -> None:
    eos = llm.tokenizer.eos_id
    ended = _one(llm, temperature=0, max_tokens=10, logit_bias={eos: 100})
    assert ended.token_ids == (eos,) and ended.finish_reason == "stop"
    held = _one(llm, temperature=0, max_tokens=10, logit_bias={eos: 100}, min_tokens=4)
    assert len(held.token_ids) == 5 and held.token_ids[-1] == eos and eos not in held.token_ids[:4]
    assert held.finish_reason == "stop"
    greedy = _one(llm, temperature=0, max_tokens=6, ignore_eos=True).token_ids
    stop_id = greedy[3]
    stopped = _one(llm, temperature=0, max_tokens=10, ignore_eos=True, stop_token_ids=[stop_id],
                   logit_bias={stop_id: 100}, min_tokens=2)
    assert len(stopped.token_ids) == 3 and stopped.stop_reason == stop_id
    assert stop_id not in stopped.token_ids[:2]


def test_unknown_logit_bias_token_is_refused(llm: LLM) -> None:
    with pytest.raises(InvalidSamplingParamsError, match="logit_bias"):
        _one(llm, logit_bias={llm.engine.text.vocab_size: 1.0})


def test_min_p_one_is_greedy_at_any_temperature(llm: LLM) -> None:
    greedy = _one(llm, temperature=0, max_tokens=12, ignore_eos=True).token_ids
    assert _one(llm, temperature=1.7, min_p=1.0, max_tokens=12, ignore_eos=True, seed=3).token_ids == greedy


def test_presence_and_frequency_penalties_follow_the_raw_logprobs(llm: LLM) -> None:
    """Each greedy step with penalties takes the argmax of the raw logprobs (the model's own) less
    the penalties of the tokens output so far, read off the top-20 alternatives."""
    presence, frequency = 1.5, 0.7
    out = _one(llm, temperature=0, max_tokens=24, ignore_eos=True, logprobs=20, presence_penalty=presence,
               frequency_penalty=frequency)
    counts: Counter[int] = Counter()
    checked = differ = 0
    for tok, lp in zip(out.token_ids, out.logprobs, strict=True):
        penalised = {t: v - frequency * counts[t] - presence * (counts[t] > 0) for t, v in lp.top}
        best = max(penalised, key=lambda t: penalised[t])
        if penalised[best] >= min(v for _, v in lp.top):  # nothing outside the top 20 can beat it
            assert tok == best
            checked += 1
            differ += best != lp.top[0][0]
        counts[tok] += 1
    assert checked >= 20 and differ >= 1, "the penalties must have changed some choice"


def test_repetition_penalty_avoids_prompt_and_output_tokens(llm: LLM) -> None:
    greedy = _one(llm, temperature=0, max_tokens=24, ignore_eos=True).token_ids
    assert len(set(greedy)) < len(greedy), "the unpenalised greedy answer repeats itself"
    out = _one(llm, temperature=0, max_tokens=24, ignore_eos=True, repetition_penalty=1e6).token_ids
    assert len(set(out)) == len(out) and not set(out) & set(PROMPT)


def test_stop_strings_wait_for_min_tokens_and_can_be_kept(llm: LLM) -> None:
    base = _one(llm, temperature=0, max_tokens=16, ignore_eos=True)
    text = base.text
    stop = text[3:6]
    assert len(text) > 10 and stop
    cut = _one(llm, temperature=0, max_tokens=16, ignore_eos=True, stop=[stop])
    assert cut.text == text[:text.index(stop)]
    kept = _one(llm, temperature=0, max_tokens=16, ignore_eos=True, stop=[stop], include_stop_str_in_output=True)
    assert kept.text == text[:text.index(stop) + len(stop)] and kept.stop_reason == stop
    # Held by min_tokens past its first match, the text goes on to a later match or to max_tokens.
    later = _one(llm, temperature=0, max_tokens=16, ignore_eos=True, stop=[stop], min_tokens=len(cut.token_ids) + 1)
    assert len(later.token_ids) > len(cut.token_ids)
    assert later.text.startswith(text[:text.index(stop) + len(stop)])
    tail = text.find(stop, text.index(stop) + 1)
    assert later.text == (text[:tail] if tail >= 0 and later.finish_reason == "stop" else text)
