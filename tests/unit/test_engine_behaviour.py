"""Engine behaviour on the tiny checkpoint: batching, aborts, errors, sampling, streaming."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import pytest

from cluster import LLM, SamplingParams
from cluster.engine.async_engine import AsyncEngine
from cluster.errors import InvalidSamplingParamsError, InvalidTokenError, PromptTooLongError, RequestError

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


@pytest.fixture
def llm(tiny_ckpt: Path):
    llm = LLM(tiny_ckpt, max_num_batched_tokens=64, max_model_len=1024)
    yield llm
    llm.engine.check_integrity()
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks, "blocks leaked"


def test_one_forward_per_step_over_all_scheduled(llm: LLM) -> None:
    engine = llm.engine
    calls: list[int] = []
    forward, schedule = engine.model.forward, engine.scheduler.schedule
    scheduled_counts: list[int] = []

    def counting_forward(input_ids, meta, *args, **kwargs):
        calls.append(len(meta.spans) + (len(meta.decode.rows) if meta.decode is not None else 0))
        return forward(input_ids, meta, *args, **kwargs)

    def recording_schedule():
        out = schedule()
        scheduled_counts.append(len(out))
        return out

    engine.model.forward = counting_forward
    engine.scheduler.schedule = recording_schedule
    for i, n in enumerate([5, 100, 12, 3]):
        engine.add_request(str(i), list(range(1000, 1000 + n)), GREEDY)
    steps = 0
    while engine.has_unfinished():
        before = len(calls)
        engine.step()
        steps += 1
        assert len(calls) == before + 1, "a step must run exactly one forward"
        assert calls[-1] == scheduled_counts[-1]
    assert max(calls) == 4, "all four requests should share a forward pass"
    assert engine.stats().forward_calls == steps


def test_chunked_prefill_interleaves_with_decoding(llm: LLM) -> None:
    engine = llm.engine
    engine.add_request("short", [1, 2000, 2001], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True))
    engine.step()  # prefill of the short one
    engine.add_request("long", list(range(3000, 3400)), GREEDY)  # 400 tokens, budget 64: 7 chunks
    got_short = 0
    for _ in range(6):
        outs = {o.request_id: o for o in engine.step()}
        got_short += len(outs["short"].new_token_ids) if "short" in outs else 0
        assert "long" not in outs, "the long prompt should still be prefilling"
    assert got_short == 6, "the short stream must advance every step during the long prefill"
    while engine.has_unfinished():
        engine.step()


def test_abort_frees_blocks_at_once(llm: LLM) -> None:
    engine = llm.engine
    engine.add_request("a", list(range(1000, 1100)), GREEDY)
    engine.add_request("b", list(range(1000, 1040)), GREEDY)
    engine.step()
    used = engine.blocks.num_used
    assert used > 0
    out = engine.abort("a")
    assert out.finish_reason == "abort" and out.finished
    assert engine.blocks.num_used < used
    engine.check_integrity()
    assert engine.abort("a") is None
    engine.add_request("c", [1, 5, 6], GREEDY)
    engine.abort("c")  # still waiting: never held blocks
    engine.check_integrity()
    while engine.has_unfinished():
        engine.step()


@pytest.mark.parametrize("prompt, error, match", [
    ([], RequestError, "empty"),
    ([1, 131072], InvalidTokenError, "token 1"),
    ([1, -5], InvalidTokenError, "token 1"),
    (list(range(1000, 2024)), PromptTooLongError, "1024"),
])
def test_bad_prompts_are_typed_errors_and_others_keep_running(llm: LLM, prompt, error, match) -> None:
    engine = llm.engine
    engine.add_request("good", [1, 2000, 3000], GREEDY)
    with pytest.raises(error, match=match):
        engine.add_request("bad", prompt, GREEDY)
    outs = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    assert outs[-1].request_id == "good" and outs[-1].finished
    assert sum(len(o.new_token_ids) for o in outs if o.request_id == "good") == 8


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_p": 1.5}, "top_p"),
    ({"max_tokens": 0}, "max_tokens"), ({"top_k": -2}, "top_k"), ({"logprobs": 50}, "logprobs"),
    ({"temperature": float("nan")}, "temperature"), ({"stop": [""]}, "stop"), ({"seed": -1}, "seed"),
])
def test_bad_sampling_values_name_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(InvalidSamplingParamsError, match=field):
        SamplingParams(**kwargs)


def test_seeded_sampling_is_reproducible(llm: LLM) -> None:
    prompt = [1, 1500, 1600, 1700]
    def run(seed: int) -> tuple[int, ...]:
        p = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=12, seed=seed, ignore_eos=True)
        return llm.generate([prompt], p, use_tqdm=False)[0].token_ids
    assert run(1) == run(1)
    assert run(1) != run(2)
    top1 = llm.generate([prompt], SamplingParams(temperature=1.0, top_k=1, max_tokens=12, seed=3, ignore_eos=True),
                        use_tqdm=False)[0].token_ids
    greedy = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                          use_tqdm=False)[0].token_ids
    assert top1 == greedy


def test_logprobs_and_stops(llm: LLM) -> None:
    prompt = [1, 1500, 1600, 1700]
    base = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=3),
                        use_tqdm=False)[0]
    assert len(base.logprobs) == 10
    for tok, lp in zip(base.token_ids, base.logprobs, strict=True):
        assert lp.token_id == tok and lp.top[0][0] == tok and len(lp.top) == 3
        assert lp.logprob == pytest.approx(lp.top[0][1]) and lp.logprob <= 0
    stop_tok = base.token_ids[4]
    first = base.token_ids.index(stop_tok)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, stop_token_ids=[stop_tok]),
                       use_tqdm=False)[0]
    assert out.token_ids == base.token_ids[:first + 1] and out.finish_reason == "stop"
    assert out.stop_reason == stop_tok
    # A stop string taken from the middle of the greedy text cuts the text before it.
    text = base.text
    assert len(text) > 6
    stop = text[3:6]
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, stop=[stop]), use_tqdm=False)[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[:text.index(stop)]
    assert llm.generate([prompt], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                        use_tqdm=False)[0].finish_reason == "length"


def test_text_prompt_and_per_prompt_params(llm: LLM) -> None:
    outs = llm.generate(["Hello", "Bonjour"], [SamplingParams(temperature=0, max_tokens=3, ignore_eos=True),
                                              SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)],
                        use_tqdm=False)
    assert [len(o.token_ids) for o in outs] == [3, 5]
    assert outs[0].prompt_token_ids == tuple(llm.tokenizer.encode_text("Hello"))
    assert outs[0].text == llm.tokenizer.decode(list(outs[0].token_ids))


def test_async_engine_streams_and_aborts(llm: LLM) -> None:
    engine = AsyncEngine(llm.engine)

    async def main() -> None:
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
        seen = [o async for o in engine.generate("s", [1, 1500, 1600], params)]
        assert [len(o.token_ids) for o in seen] == [1, 2, 3, 4, 5, 6]
        assert seen[-1].finished and [o.finished for o in seen].count(True) == 1
        long = SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)
        async with contextlib.aclosing(engine.generate("dropped", [1, 1500, 1600], long)) as stream:
            async for out in stream:
                if len(out.token_ids) == 3:
                    break  # the client went away
        stats = engine.stats()
        assert stats.num_running == 0 and stats.kv_blocks_used == 0 and stats.aborts == 1

        async def consume() -> None:
            async for _ in engine.generate("cancelled", [1, 1500, 1600], long):
                pass

        # a baseline, not an absolute count: the dropped request may have run on a few steps
        # before its abort landed
        before = engine.stats().generation_tokens
        task = asyncio.create_task(consume())
        deadline = time.monotonic() + 60
        while engine.stats().generation_tokens < before + 10:
            assert time.monotonic() < deadline, "the request never got going"
            await asyncio.sleep(0.01)
        task.cancel()  # a deadline passed or the server dropped the request
        with pytest.raises(asyncio.CancelledError):
            await task
        stats = engine.stats()
        assert stats.num_running == 0 and stats.kv_blocks_used == 0 and stats.aborts == 2

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()
