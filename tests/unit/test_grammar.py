"""Structured output in the engine (random weights of the tiny preset): answers under a JSON
schema grammar end with "stop", parse and validate; forks and preemption keep each choice's
grammar; tool arguments follow the tool's schema; reasoning comes before the grammar holds; a
schema llguidance cannot take is refused naming the part."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
import torch

from cluster import LLM, SamplingParams
from cluster.engine.grammar import Grammar, GrammarCompiler
from cluster.engine.grammar_mask import allowed_tokens, mask_logits
from cluster.engine.response_grammar import ResponseGrammars
from cluster.errors import InvalidGrammarError
from tests.grammar_schemas import BAD_SCHEMA, WEATHER_TOOL, response_format, schema

MAX_TOKENS = 600  # far more than the bounded schemas need: an answer that hits it is a failure


@pytest.fixture(scope="module")
def llm(tiny_ckpt: Path):
    llm = LLM(tiny_ckpt, max_num_batched_tokens=256, max_model_len=4096)
    yield llm
    assert llm.engine is not None
    llm.engine.check_integrity()
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks, "blocks leaked"


@pytest.fixture(scope="module")
def grammars(llm: LLM) -> ResponseGrammars:
    return ResponseGrammars(llm.tokenizer)


def _check(text: str, reason: str | None, sch: dict, what: str) -> None:
    assert reason == "stop", f"{what} ended with {reason}: {text[:200]!r}"
    jsonschema.validate(json.loads(text), sch)


def test_json_schema_answers_stop_parse_and_validate(llm: LLM, grammars: ResponseGrammars) -> None:
    """Four requests, and one of n = 3 choices: the forks share the prompt and sample their first
    token from the same logits, each with its own matcher (a shared one would see three tokens a
    step and refuse)."""
    params = [SamplingParams(max_tokens=MAX_TOKENS, seed=i, grammar=grammars.for_completion(response_format(i)))
              for i in range(4)]
    params.append(SamplingParams(max_tokens=MAX_TOKENS, n=3, seed=7, grammar=grammars.for_completion(
        response_format(4))))
    outs = llm.generate([f"Answer {i} as JSON:" for i in range(5)], params, use_tqdm=False)
    for i, out in enumerate(outs[:4]):
        _check(out.text, out.outputs[0].finish_reason, schema(i), f"answer {i}")
    choices = outs[4].outputs
    assert len({c.text for c in choices}) > 1, "seeded choices should differ"
    for c in choices:
        _check(c.text, c.finish_reason, schema(4), f"choice {c.index}")


def test_preemption_by_recompute_keeps_the_grammar(tiny_ckpt: Path) -> None:
    small = LLM(tiny_ckpt, num_kv_blocks=10, max_num_batched_tokens=64, max_model_len=160)
    assert small.engine is not None
    grammars = ResponseGrammars(small.tokenizer)
    params = [SamplingParams(max_tokens=150, seed=i, grammar=grammars.for_completion(response_format(i)))
              for i in range(6)]
    outs = small.generate([f"JSON {i}" for i in range(6)], params, use_tqdm=False)
    assert small.engine.scheduler.num_preemptions > 0, "the pool was meant to run short"
    for i, out in enumerate(outs):
        _check(out.text, out.outputs[0].finish_reason, schema(i), f"answer {i}")
    small.engine.check_integrity()


def test_aborted_choices_let_go_of_their_matchers(llm: LLM, grammars: ResponseGrammars) -> None:
    engine = llm.engine
    assert engine is not None
    grammar = grammars.for_completion({"type": "json_object"})
    params = SamplingParams(max_tokens=MAX_TOKENS, n=2, seed=1, grammar=grammar)
    engine.add_request("abort-me", llm.encode("x"), params)
    for _ in range(3):
        engine.step()
    engine.abort("abort-me")
    engine.check_integrity()  # a finished choice holding a matcher fails this
    assert not engine.has_unfinished()


def test_named_tool_arguments_follow_the_tool_schema(llm: LLM, grammars: ResponseGrammars) -> None:
    tok = llm.tokenizer
    assert tok.tool_calls_id is not None and tok.args_id is not None
    prefix = [tok.tool_calls_id, *tok.encode_text("get_weather", bos=False), tok.args_id]
    grammar = grammars.for_chat(None, [WEATHER_TOOL], None, "get_weather", True, False, prefix)
    assert grammar is not None
    prompt = tok.encode_chat([{"role": "user", "content": "weather?"}], [WEATHER_TOOL]).token_ids + prefix
    outs = llm.generate([prompt] * 3, [SamplingParams(max_tokens=MAX_TOKENS, seed=s, grammar=grammar)
                                       for s in range(3)], use_tqdm=False)
    for out in outs:
        _check(out.text, out.outputs[0].finish_reason, WEATHER_TOOL["function"]["parameters"], "arguments")


def test_required_tool_choice_makes_a_call_with_valid_arguments(llm: LLM, grammars: ResponseGrammars) -> None:
    tok = llm.tokenizer
    grammar = grammars.for_chat(None, [WEATHER_TOOL], "required", None, False, False, [tok.tool_calls_id])
    assert grammar is not None
    out = llm.generate([tok.encode_chat([{"role": "user", "content": "hi"}], [WEATHER_TOOL]).token_ids
                        + [tok.tool_calls_id]], SamplingParams(max_tokens=MAX_TOKENS, seed=3, grammar=grammar),
                       use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "stop"
    ids = list(out.token_ids)
    assert tok.args_id in ids, tok.decode(ids, skip_special=False)
    assert tok.decode(ids[:ids.index(tok.args_id)]).strip() == "get_weather"
    args = json.loads(tok.decode(ids[ids.index(tok.args_id) + 1:]))
    jsonschema.validate(args, WEATHER_TOOL["function"]["parameters"])


def test_reasoning_comes_before_the_grammar_holds(llm: LLM, grammars: ResponseGrammars) -> None:
    """With reasoning on, anything may come between [THINK] and [/THINK]; from [/THINK] on only
    what the schema allows. Random weights would not close a thought, so the masks are read
    directly, then an answer is generated with [THINK] and [/THINK] pushed by logit_bias."""
    tok = llm.tokenizer
    think, end = tok.think_id, tok.end_think_id
    assert think is not None and end is not None
    grammar = grammars.for_chat(response_format(1), None, None, None, True, True)
    assert grammar is not None
    compiler = GrammarCompiler.for_tokenizer(tok)
    matcher = compiler.matchers(grammar, 1)[0]
    word = tok.encode_text(" hello", bos=False)
    brace = tok.encode_text("{", bos=False)
    vocab = tok.vocab_size
    start = allowed_tokens([matcher], vocab)[0]
    assert start[think] and start[brace[0]] and not start[word[0]], "before: [THINK] or JSON"
    assert matcher.accept(think)
    inside = allowed_tokens([matcher], vocab)[0]
    assert inside[word[0]] and inside[brace[0]], "free text while thinking"
    for t in word:
        assert matcher.accept(t)
    assert allowed_tokens([matcher], vocab)[0][end]
    assert matcher.accept(end)
    after = allowed_tokens([matcher], vocab)[0]
    assert not after[word[0]] and not after[think] and after[brace[0]], "after [/THINK]: the schema only"

    # Off: no [THINK] section at all.
    off = grammars.for_chat(response_format(1), None, None, None, True, False)
    assert off is not None
    assert not allowed_tokens(compiler.matchers(off, 1), vocab)[0][think]

    params = SamplingParams(max_tokens=MAX_TOKENS, seed=5, grammar=grammar, logit_bias={think: 100.0, end: 100.0})
    prompt = tok.encode_chat([{"role": "user", "content": "think, then JSON"}], reasoning_effort="high").token_ids
    ids = list(llm.generate([prompt], params, use_tqdm=False)[0].token_ids)
    assert ids[0] == think and end in ids, tok.decode(ids, skip_special=False)[:200]
    answer = tok.decode(ids[ids.index(end) + 1:])
    _check(answer, "stop", schema(1), "answer after [/THINK]")


def test_mask_touches_only_grammar_rows(llm: LLM, grammars: ResponseGrammars) -> None:
    compiler = GrammarCompiler.for_tokenizer(llm.tokenizer)
    grammar = grammars.for_completion({"type": "json_object"})
    assert grammar is not None
    logits = torch.randn(3, llm.tokenizer.vocab_size)
    assert mask_logits(logits, [None, None, None]) is logits, "no grammar row: nothing done"
    masked = mask_logits(logits, [None, compiler.matchers(grammar, 1)[0], None])
    assert torch.equal(masked[0], logits[0]) and torch.equal(masked[2], logits[2])
    assert torch.isneginf(masked[1]).sum() > logits.shape[1] // 2
    assert torch.equal(logits, logits.clone()), "the model's logits (for logprobs) are left as they were"


def test_schemas_llguidance_cannot_take_are_refused_naming_the_part(grammars: ResponseGrammars) -> None:
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": BAD_SCHEMA, "strict": True}}
    with pytest.raises(InvalidGrammarError, match="look-around") as err:
        grammars.for_completion(bad)
    assert err.value.field == "response_format.json_schema.schema"
    tool = {"type": "function", "function": {"name": "f", "parameters": BAD_SCHEMA}}
    with pytest.raises(InvalidGrammarError) as err:
        grammars.for_chat(None, [WEATHER_TOOL, tool], "required", None, True, False)
    assert err.value.field == "tools[1].function.parameters"
    with pytest.raises(InvalidGrammarError) as err:
        grammars.for_completion({"type": "xml"})
    assert err.value.field == "response_format.type"
    with pytest.raises(InvalidGrammarError) as err:
        grammars.for_chat(response_format(0), [WEATHER_TOOL], "required", None, True, False)
    assert err.value.field == "response_format"


def test_the_engine_refuses_a_grammar_it_cannot_compile(llm: LLM) -> None:
    assert llm.engine is not None
    with pytest.raises(InvalidGrammarError):
        llm.engine.add_request("bad", [1, 2, 3], SamplingParams(grammar=Grammar("start: %json {\"type\": 3}")))
    assert not llm.engine.has_unfinished()
