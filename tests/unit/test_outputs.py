"""Engine outputs are deltas; text, stop strings and output kinds are made where the stream is
consumed (`OutputAggregator`): kinds agree, stop strings never leak and free the request's blocks,
and a request that ends inside a multi-byte character keeps its tail."""

from __future__ import annotations

import asyncio
import pickle
from collections import defaultdict
from pathlib import Path

import pytest

from cluster import LLM, SamplingParams
from cluster.engine.async_engine import AsyncEngine
from cluster.engine.output_aggregator import OutputAggregator, OutputKind, RequestOutput
from cluster.engine.sequence import EngineOutput
from cluster.model.tokenizer import Tokenizer

BYTE_TOKEN = 1000  # Tekken's byte tokens: 1000 + byte value
EURO = [BYTE_TOKEN + b for b in "€".encode()]  # three tokens of one character


def utf8_tail_script(t: Tokenizer) -> list[int]:
    return [*t.encode_text("Prix: 5", bos=False), *EURO]


@pytest.fixture(scope="module")
def llm(tiny_ckpt: Path):
    # Prefix caching off: the tests compare logprobs of the same prompts run again, bit for bit; a
    # cached prefix leaves fewer tokens to a step, which moves the logprobs by float rounding (1e-6).
    llm = LLM(tiny_ckpt, max_model_len=1024, enable_prefix_caching=False)
    yield llm
    llm.engine.check_integrity()
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks, "blocks leaked"


@pytest.fixture(scope="module")
def scripted(tiny_ckpt: Path, make_ckpt) -> LLM:
    """Greedy decoding emits "Prix: 5" and then "€" as three byte tokens, then EOS."""
    t = Tokenizer.from_model_dir(tiny_ckpt)
    return LLM(make_ckpt("utf8-tail", preset="tiny", seed=3, script=utf8_tail_script(t)), max_model_len=256)


def _ordered(outs: dict[str, RequestOutput]) -> list[RequestOutput]:
    """By request id's number (`offline-3`, `delta-1`)."""
    return [outs[k] for k in sorted(outs, key=lambda rid: int(rid.rsplit("-", 1)[1]))]


def _deltas(outs: list[RequestOutput]) -> dict[str, RequestOutput]:
    """Each request's deltas joined into one output."""
    joined: dict[str, list[RequestOutput]] = defaultdict(list)
    for o in outs:
        joined[o.request_id].append(o)
    result = {}
    for rid, parts in joined.items():
        assert parts[0].prompt_token_ids is not None and all(p.prompt_token_ids is None for p in parts[1:])
        assert [p.finished for p in parts].count(True) == 1 and parts[-1].finished
        lps = [lp for p in parts for lp in (p.logprobs or ())]
        result[rid] = RequestOutput(rid, parts[0].prompt_token_ids, tuple(t for p in parts for t in p.token_ids),
                                    "".join(p.text for p in parts), True, parts[-1].finish_reason,
                                    parts[-1].stop_reason, tuple(lps) if parts[0].logprobs is not None else None)
    return result


def _last(outs: list[RequestOutput]) -> dict[str, RequestOutput]:
    """Each request's last cumulative output; every one extends the one before it."""
    last: dict[str, RequestOutput] = {}
    for o in outs:
        before = last.get(o.request_id)
        if before is not None:
            assert o.text.startswith(before.text) and o.token_ids[:len(before.token_ids)] == before.token_ids
            assert not before.finished
        last[o.request_id] = o
    return last


def _same(a: RequestOutput, b: RequestOutput) -> None:
    assert (a.prompt_token_ids, a.token_ids, a.text, a.finish_reason, a.stop_reason) == \
        (b.prompt_token_ids, b.token_ids, b.text, b.finish_reason, b.stop_reason)
    assert (a.logprobs is None) == (b.logprobs is None)
    # The same tokens with the same logprobs up to float rounding: the decode attention's
    # partitioning depends on the step's batch, which depends on when the requests arrived.
    for x, y in zip(a.logprobs or (), b.logprobs or (), strict=True):
        assert x.token_id == y.token_id and [t for t, _ in x.top] == [t for t, _ in y.top]
        assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
        assert [lp for _, lp in x.top] == pytest.approx([lp for _, lp in y.top], abs=1e-4)


# ---------------------------------------------------------------------------------------------
# The engine sends what is new
# ---------------------------------------------------------------------------------------------

def test_engine_outputs_carry_only_the_new_tokens_and_the_prompt_once(llm: LLM) -> None:
    engine = llm.engine
    prompt = list(range(1000, 1100))
    engine.add_request("d", prompt, SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=2))
    outs: list[EngineOutput] = []
    while engine.has_unfinished():
        outs.extend(engine.step())
    assert [len(o.new_token_ids) for o in outs] == [1] * 6
    assert outs[0].prompt_token_ids == tuple(prompt) and all(o.prompt_token_ids is None for o in outs[1:])
    assert all(len(o.new_logprobs) == 1 and o.new_logprobs[0].token_id == o.new_token_ids[0] for o in outs)
    assert [o.finished for o in outs] == [False] * 5 + [True] and outs[-1].finish_reason == "length"
    # a later step's output is as small as an early one's: nothing cumulative travels
    assert len(pickle.dumps(outs[-1])) <= len(pickle.dumps(outs[1])) + 32


# ---------------------------------------------------------------------------------------------
# Output kinds agree
# ---------------------------------------------------------------------------------------------

PROMPTS = [[1, 1500, 1600, 1700], "Hello", list(range(2000, 2040))]


def _params(llm: LLM) -> list[SamplingParams]:
    greedy = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                          use_tqdm=False)[0]
    stop = greedy.text[4:7]  # a stop string from the middle of the first prompt's answer
    return [SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[stop], logprobs=2),
            SamplingParams(temperature=0.8, seed=5, max_tokens=10, ignore_eos=True),
            SamplingParams(temperature=0, max_tokens=9, ignore_eos=True, logprobs=0)]


def test_llm_output_kinds_agree(llm: LLM) -> None:
    params = _params(llm)
    final = llm.generate(PROMPTS, params, use_tqdm=False)
    delta = _ordered(_deltas(list(llm.stream(PROMPTS, params, OutputKind.DELTA))))
    cumulative = _ordered(_last(list(llm.stream(PROMPTS, params, OutputKind.CUMULATIVE))))
    finals = list(llm.stream(PROMPTS, params, OutputKind.FINAL_ONLY))
    assert all(o.finished for o in finals) and len(finals) == len(PROMPTS)
    finals = _ordered({o.request_id: o for o in finals})
    for i, want in enumerate(final):
        for got in (delta[i], cumulative[i], finals[i]):
            assert (got.prompt_token_ids, got.token_ids, got.text, got.finish_reason, got.stop_reason,
                    got.logprobs) == (want.prompt_token_ids, want.token_ids, want.text, want.finish_reason,
                                      want.stop_reason, want.logprobs)
    assert final[0].finish_reason == "stop" and final[0].stop_reason == params[0].stop[0]
    # without stop strings the text is the tokenizer's decoding of the tokens
    for out in final[1:]:
        assert out.text == llm.tokenizer.decode(list(out.token_ids)) and out.finish_reason == "length"


def test_async_engine_output_kinds_agree(llm: LLM) -> None:
    params = _params(llm)
    prompts = [llm.encode(p) for p in PROMPTS]
    offline = llm.generate(PROMPTS, params, use_tqdm=False)
    engine = AsyncEngine(llm.engine)  # steps the engine from here on

    async def run(kind: OutputKind) -> list[RequestOutput]:
        async def one(i: int) -> list[RequestOutput]:
            return [o async for o in engine.generate(f"{kind.value}-{i}", prompts[i], params[i], output_kind=kind)]
        parts = await asyncio.gather(*(one(i) for i in range(len(prompts))))
        return [o for part in parts for o in part]

    async def main() -> None:
        delta = _ordered(_deltas(await run(OutputKind.DELTA)))
        cumulative = _ordered(_last(await run(OutputKind.CUMULATIVE)))
        finals = await run(OutputKind.FINAL_ONLY)
        assert len(finals) == len(prompts) and all(o.finished for o in finals)
        finals = _ordered({o.request_id: o for o in finals})
        for want, a, b in zip(finals, delta, cumulative, strict=True):
            _same(a, want)
            _same(b, want)
        assert [(o.token_ids, o.text) for o in finals] == [(o.token_ids, o.text) for o in offline]
        stats = engine.stats()
        assert stats.kv_blocks_used == 0 and stats.num_running == 0

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


# ---------------------------------------------------------------------------------------------
# Stop strings
# ---------------------------------------------------------------------------------------------

def test_a_stop_string_never_leaks_and_the_engine_frees_the_request_at_once(llm: LLM) -> None:
    engine = llm.engine
    base = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)[0]
    stop = base.text[5:9]
    want = base.text[:base.text.index(stop)]
    shown = ""
    stream = llm.stream([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=500, ignore_eos=True, stop=[stop]),
                        OutputKind.DELTA)
    for out in stream:
        shown += out.text
        assert want.startswith(shown), "streamed text went past the stop string"
        if out.finished:
            # the stop string was found here, and the request was aborted in the engine right away
            assert not engine.has_unfinished() and engine.blocks.num_free == engine.blocks.num_blocks
            engine.check_integrity()
    assert shown == want and out.finish_reason == "stop" and out.stop_reason == stop
    assert engine.stats().generation_tokens < 500


def test_async_engine_aborts_a_request_a_stop_string_ended(llm: LLM) -> None:
    base = llm.generate([PROMPTS[0]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)[0]
    stop = base.text[5:9]
    engine = AsyncEngine(llm.engine)

    async def main() -> None:
        before = engine.stats()
        long = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True, stop=[stop])
        shown = ""
        async for out in engine.generate("s", llm.encode(PROMPTS[0]), long, output_kind=OutputKind.DELTA):
            shown += out.text
        assert shown == base.text[:base.text.index(stop)] and out.stop_reason == stop
        stats = engine.stats()  # drains the abort the generator left in the inbox
        assert stats.num_running == 0 and stats.kv_blocks_used == 0 and stats.aborts == before.aborts + 1
        assert stats.generation_tokens - before.generation_tokens < 400

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def _feed(t: Tokenizer, params: SamplingParams, ids: list[int], last: EngineOutput | None = None,
          kind: OutputKind = OutputKind.DELTA) -> tuple[OutputAggregator, list[RequestOutput]]:
    agg = OutputAggregator("r", params, t, kind)
    outs = []
    for i, tok in enumerate(ids):
        delta = EngineOutput("r", (tok,), False, None, prompt_token_ids=(1,) if i == 0 else None)
        if last is not None and i == len(ids) - 1:
            delta = EngineOutput("r", (tok,), last.finished, last.finish_reason, last.stop_reason,
                                 prompt_token_ids=delta.prompt_token_ids)
        out = agg.add(delta)
        if out is not None:
            outs.append(out)
        if agg.finished:
            break
    return agg, outs


def test_stop_strings_are_held_back_while_they_may_still_match(tiny_ckpt: Path) -> None:
    t = Tokenizer.from_model_dir(tiny_ckpt)
    ids = t.encode_text("Hello there, STOP now and more", bos=False)
    agg, outs = _feed(t, SamplingParams(stop=["STOP", "there, S!"]), ids)
    assert agg.finished and agg.must_abort  # the engine still runs it: the caller aborts it
    shown = ""
    for o in outs:
        shown += o.text
        # while it runs, the last 8 characters (the longest stop string less one) are held back
        assert "Hello there, ".startswith(shown) and (o.finished or len(shown) <= len(t.decode(ids)) - 8)
    assert shown == "Hello there, " and outs[-1].text  # the held-back text comes with the finish
    assert outs[-1].finish_reason == "stop" and outs[-1].stop_reason == "STOP"
    # the token that completed the stop string is the last one reported
    assert "STOP" in t.decode([tok for o in outs for tok in o.token_ids])
    assert agg.add(EngineOutput("r", (ids[-1],), False, None)) is None  # nothing after the end


def test_the_engines_own_stop_comes_before_a_stop_string_in_the_same_token(tiny_ckpt: Path) -> None:
    t = Tokenizer.from_model_dir(tiny_ckpt)
    ids = t.encode_text("Hello there", bos=False)
    stopper = ids[-1]
    params = SamplingParams(stop=[t.decode([stopper]).strip()], stop_token_ids=(stopper,))
    agg, outs = _feed(t, params, ids, last=EngineOutput("r", (), True, "stop", stopper))
    assert not agg.must_abort and outs[-1].stop_reason == stopper
    assert "".join(o.text for o in outs) == "Hello there"  # as before: a stop token's text is kept


# ---------------------------------------------------------------------------------------------
# UTF-8 tails
# ---------------------------------------------------------------------------------------------

def test_a_request_ending_inside_a_multibyte_character_returns_its_whole_text(scripted: LLM) -> None:
    t = scripted.tokenizer
    script = utf8_tail_script(t)
    whole = scripted.generate([[1, 5000]], SamplingParams(temperature=0, max_tokens=64), use_tqdm=False)[0]
    assert list(whole.token_ids) == [*script, t.eos_id] and whole.text == "Prix: 5€"
    cut = len(script) - 1  # stops after two of the euro sign's three bytes
    params = SamplingParams(temperature=0, max_tokens=cut)
    out = scripted.generate([[1, 5000]], params, use_tqdm=False)[0]
    assert list(out.token_ids) == script[:cut] and out.finish_reason == "length"
    assert out.text == t.decode(script[:cut]) == "Prix: 5\ufffd"  # the tail is kept, not lost
    streamed = [o.text for o in scripted.stream([[1, 5000]], params, OutputKind.DELTA)]
    assert "".join(streamed) == out.text and streamed[-1] == "\ufffd"


def test_an_abort_inside_a_multibyte_character_keeps_the_tail(tiny_ckpt: Path) -> None:
    t = Tokenizer.from_model_dir(tiny_ckpt)
    agg, outs = _feed(t, SamplingParams(), [*t.encode_text("Prix", bos=False), EURO[0]],
                      last=EngineOutput("r", (), True, "abort"), kind=OutputKind.CUMULATIVE)
    assert outs[-1].finished and outs[-1].finish_reason == "abort" and outs[-1].text == "Prix\ufffd"
