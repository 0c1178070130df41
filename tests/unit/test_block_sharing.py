"""The `n` choices of a request share their prompt's full KV blocks (reference-counted), and the
counts stay right through aborts and preemption."""

from __future__ import annotations

from pathlib import Path

import pytest

from cluster import LLM, SamplingParams
from cluster.engine.block_manager import BlockManager
from cluster.engine.llm_engine import LLMEngine
from cluster.errors import InvalidSamplingParamsError

BS = 16
PROMPT = [1] + list(range(2000, 2099))  # 100 tokens: 6 full blocks of 16 and 4 tokens in a 7th
SAMPLED = SamplingParams(n=4, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True)


@pytest.fixture
def llm(tiny_ckpt: Path):
    # Prefix caching off: separate requests of the same prompt then hold copies of their own, so
    # only the sharing among the n choices of one request is seen (tests/unit/test_prefix_cache.py
    # covers sharing between requests).
    llm = LLM(tiny_ckpt, block_size=BS, num_kv_blocks=256, max_num_batched_tokens=128, max_model_len=1024,
              enable_prefix_caching=False)
    yield llm
    llm.engine.check_integrity()
    assert llm.engine.blocks.num_free == llm.engine.blocks.num_blocks, "blocks leaked"


def _step_until_first_tokens(engine: LLMEngine) -> list:
    while True:
        outs = engine.step()
        engine.check_integrity()
        if outs:
            return outs


def _collect(tokens: dict[tuple[str, int], list[int]], outs: list) -> None:
    for out in outs:
        tokens.setdefault((out.request_id, out.index), []).extend(out.new_token_ids)


def _run_to_end(engine: LLMEngine, tokens: dict[tuple[str, int], list[int]] | None = None
                ) -> dict[tuple[str, int], list[int]]:
    tokens = {} if tokens is None else tokens
    while engine.has_unfinished():
        _collect(tokens, engine.step())
        engine.check_integrity()
    return tokens


def test_n_choices_share_the_prompts_full_blocks(llm: LLM) -> None:
    engine, blocks = llm.engine, llm.engine.blocks
    engine.add_request("shared", PROMPT, SAMPLED)
    first = _step_until_first_tokens(engine)
    assert sorted(o.index for o in first) == [0, 1, 2, 3], "every choice samples from the prompt's logits"
    assert all(o.prompt_token_ids == tuple(PROMPT) for o in first)
    tables = engine.block_tables("shared")
    full = tables[0][:len(PROMPT) // BS]
    assert len(full) == 6
    for table in tables[1:]:
        assert table == full, "a forked choice starts with the prompt's full blocks and nothing else"
    assert [blocks.refcount(b) for b in full] == [4] * 6
    assert blocks.refcount(tables[0][6]) == 1, "the partial last block is the first choice's alone"
    tokens: dict[tuple[str, int], list[int]] = {}
    _collect(tokens, first)
    _collect(tokens, engine.step())  # the forks recompute the prompt's last 4 tokens into blocks of their own
    engine.check_integrity()
    tables = engine.block_tables("shared")
    assert all(t[:6] == full for t in tables)
    assert len({t[6] for t in tables}) == 4
    shared_used = blocks.num_used
    assert shared_used == 6 + 4

    _run_to_end(engine, tokens)
    assert sorted(tokens) == [("shared", i) for i in range(4)]
    assert all(len(t) == 8 for t in tokens.values())
    assert len({tuple(t) for t in tokens.values()}) > 1, "the choices are sampled independently"

    ids = [f"separate-{i}" for i in range(4)]
    for rid in ids:  # the same prompt as four requests: each holds its own copy of every block
        engine.add_request(rid, PROMPT, SamplingParams(temperature=1.0, max_tokens=8, ignore_eos=True))
    started: set[str] = set()
    while started != set(ids):  # prefilled in chunks over a few steps; none finishes meanwhile
        started |= {o.request_id for o in engine.step()}
        engine.check_integrity()
    assert blocks.num_used == 4 * 7 > shared_used
    assert all(blocks.refcount(b) == 1 for i in range(4) for b in engine.block_tables(f"separate-{i}")[0])
    _run_to_end(engine)


def test_greedy_choices_equal_a_single_greedy_request(llm: LLM) -> None:
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    alone = llm.generate([PROMPT], greedy, use_tqdm=False)[0]
    outs = llm.generate([PROMPT], SamplingParams(n=4, temperature=0, max_tokens=10, ignore_eos=True),
                        use_tqdm=False)
    assert len(outs) == 1, "one output per prompt, whatever n"
    out = outs[0]
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert (out.text, out.token_ids) == (out.outputs[0].text, out.outputs[0].token_ids)
    for choice in out.outputs:
        assert choice.token_ids == alone.token_ids, f"choice {choice.index} read a wrong shared prompt"
        assert choice.prompt_token_ids == tuple(PROMPT) and choice.finish_reason == "length"


def test_abort_one_choice_then_the_request(llm: LLM) -> None:
    engine, blocks = llm.engine, llm.engine.blocks
    engine.add_request("r", PROMPT, SAMPLED)
    _step_until_first_tokens(engine)
    engine.step()
    full = engine.block_tables("r")[0][:6]
    out = engine.abort("r", 2)
    assert out is not None and out.index == 2 and out.finished and out.finish_reason == "abort"
    engine.check_integrity()
    assert [blocks.refcount(b) for b in full] == [3] * 6
    assert blocks.num_used == 6 + 3
    assert engine.abort("r", 2) is None, "an aborted choice is gone"
    engine.step()
    engine.check_integrity()
    assert engine.abort("r") is not None
    engine.check_integrity()
    assert blocks.num_used == 0 and not engine.has_unfinished()
    assert engine.abort("r") is None


def test_abort_before_the_choices_are_forked(llm: LLM) -> None:
    engine, blocks = llm.engine, llm.engine.blocks
    long_prompt = [1] + list(range(3000, 3299))  # 300 tokens: three prefill chunks of 128
    engine.add_request("early", long_prompt, SAMPLED)
    engine.step()
    engine.check_integrity()
    assert engine.block_tables("early")[1:] == ((), (), ()), "no choice is forked before the prompt is done"
    out = engine.abort("early", 0)
    assert out is not None and out.index == 0 and out.new_token_ids == ()
    engine.check_integrity()
    assert blocks.num_used == 0, "the prefill's blocks went with the aborted choice"
    tokens = _run_to_end(engine)  # choice 1 prefills the prompt itself and forks 2 and 3
    assert sorted(tokens) == [("early", 1), ("early", 2), ("early", 3)]
    assert all(len(t) == 8 for t in tokens.values())

    engine.add_request("gone", long_prompt, SAMPLED)
    engine.step()
    engine.abort("gone")
    engine.check_integrity()
    assert blocks.num_used == 0 and not engine.has_unfinished()


def test_preemption_keeps_the_counts_right(tiny_ckpt: Path) -> None:
    # Four choices of a 40-token prompt (2 full blocks shared) growing to 70 tokens need
    # 2 + 4 * 3 = 14 blocks at the end; the pool holds 10, so choices are preempted and recomputed.
    prompt = [1] + list(range(4000, 4039))
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    reference = LLM(tiny_ckpt, block_size=BS, num_kv_blocks=64, max_model_len=160)
    expected = reference.generate([prompt], greedy, use_tqdm=False)[0].token_ids

    llm = LLM(tiny_ckpt, block_size=BS, num_kv_blocks=10, max_model_len=160, max_num_batched_tokens=128)
    engine = llm.engine
    engine.add_request("p", prompt, SamplingParams(n=4, temperature=0, max_tokens=30, ignore_eos=True))
    tokens = _run_to_end(engine)  # check_integrity after every step
    assert engine.scheduler.num_preemptions > 0, "the pool was meant to run short"
    assert engine.blocks.num_free == engine.blocks.num_blocks
    assert sorted(tokens) == [("p", i) for i in range(4)]
    for i in range(4):
        assert tuple(tokens[("p", i)]) == expected, f"choice {i} after preemption"


def test_n_is_validated() -> None:
    for bad in (0, -1, 1.5, True):
        with pytest.raises(InvalidSamplingParamsError, match="n must be"):
            SamplingParams(n=bad)


def test_n_above_max_num_seqs_is_refused(tiny_ckpt: Path) -> None:
    llm = LLM(tiny_ckpt, max_num_seqs=4)
    with pytest.raises(InvalidSamplingParamsError, match="n=5"):
        llm.engine.add_request("x", [1, 2, 3], SamplingParams(n=5))
    assert not llm.engine.has_unfinished()


def test_block_manager_counts_and_free_list_order() -> None:
    blocks = BlockManager(8, 4)
    assert blocks.ensure(0, 10)  # 3 blocks
    assert blocks.fork(0, 1, 10) == 8  # the 2 full blocks
    assert blocks.fork(0, 2, 3) == 0 and blocks.num_held(2) == 0
    shared = blocks.table(0)[:2]
    assert [blocks.refcount(b) for b in shared] == [2, 2]
    assert blocks.ensure(1, 12)  # one block of its own
    blocks.check_integrity()
    assert blocks.num_used == 4
    blocks.free(0)
    blocks.check_integrity()
    assert [blocks.refcount(b) for b in shared] == [1, 1] and blocks.num_used == 3
    freed = blocks.table(1)[2]
    blocks.free(1)
    blocks.check_integrity()
    assert blocks.num_used == 0
    assert not blocks.ensure(3, 33), "more than the pool: nothing allocated"
    assert blocks.num_used == 0
    blocks.check_integrity()
    assert blocks.ensure(3, 32)
    # Least recently freed first: the never-used blocks, then sequence 0's last block, then
    # sequence 1's, last block first (its own, then the shared ones): a cached prefix outlives the
    # blocks that extend it.
    assert blocks.table(3)[-3:] == (freed, shared[1], shared[0])


def test_check_integrity_catches_a_wrong_count() -> None:
    blocks = BlockManager(4, 4)
    blocks.ensure(0, 8)
    blocks.fork(0, 1, 8)
    blocks.check_integrity()
    blocks._refs[blocks.table(0)[0]] = 1  # corrupt on purpose
    with pytest.raises(RuntimeError, match="reference counts"):
        blocks.check_integrity()


def test_a_stop_string_ends_only_its_own_choice(llm: LLM) -> None:
    prompt = [1, 1500, 1600, 1700]
    params = SamplingParams(n=2, temperature=1.0, seed=21, max_tokens=12, ignore_eos=True)
    free = llm.generate([prompt], params, use_tqdm=False)[0].outputs
    first, second = free[0].text, free[1].text
    stop = next((first[i:i + 3] for i in range(len(first) - 3) if first[i:i + 3] not in second), None)
    assert stop is not None, "the two sampled choices should differ"
    outs = llm.generate([prompt], SamplingParams(n=2, temperature=1.0, seed=21, max_tokens=12, ignore_eos=True,
                                                 stop=[stop]), use_tqdm=False)[0].outputs
    assert outs[0].finish_reason == "stop" and outs[0].stop_reason == stop
    assert outs[0].text == first[:first.index(stop)]
    assert (outs[1].finish_reason, outs[1].text) == ("length", second), "the other choice runs on"
