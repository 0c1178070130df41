"""The scheduler protects inter-token latency: decodes first, a prefill budget per step learnt from
fed step times (synthetic here: no timing), and a long prompt that advances every step."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cluster import LLM
from cluster.engine.block_manager import BlockManager
from cluster.engine.sampling_params import SamplingParams
from cluster.engine.scheduler import ScheduledSeq, Scheduler, SchedulerConfig
from cluster.engine.sequence import Sequence
from cluster.engine.step_budget import StepShape

PARAMS = SamplingParams(max_tokens=10_000, temperature=0.0)


def _seq(i: int, prompt_len: int) -> Sequence:
    return Sequence(f"r{i}", list(range(1000, 1000 + prompt_len)), prompt_len, PARAMS, i, seq_id=i)


def _advance(scheduled: list[ScheduledSeq]) -> None:
    """What the engine does after a step: the tokens are computed; a completed one samples a token."""
    for s in scheduled:
        s.seq.num_computed += s.num_new
        if s.seq.num_computed == len(s.seq.token_ids):
            s.seq.token_ids.append(7)


def _with_streams(config: SchedulerConfig, streams: int, prompt_len: int) -> tuple[Scheduler, Sequence]:
    """A scheduler whose `streams` sequences decode, and then a long prompt arrives."""
    scheduler = Scheduler(config, BlockManager(4096, 16))
    for i in range(streams):
        scheduler.add(_seq(i, 4))
    while any(len(s.token_ids) - s.num_computed > 1 for s in (*scheduler.running, *scheduler.waiting)):
        _advance(scheduler.schedule())  # the streams' prompts
    long = _seq(streams, prompt_len)
    scheduler.add(long)
    return scheduler, long


def test_decodes_go_first_even_behind_a_prefill_admitted_before_them() -> None:
    config = SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=12, target_step_ms=50.0, min_prefill_tokens=8)
    scheduler = Scheduler(config, BlockManager(256, 16))
    long = _seq(0, 200)
    scheduler.add(long)
    for i in range(1, 5):
        scheduler.add(_seq(i, 1))
    scheduled = scheduler.schedule()  # the long prompt's first 8 tokens, then the short prompts
    assert [(s.seq.request_id, s.num_new) for s in scheduled] == [("r0", 8), ("r1", 1), ("r2", 1), ("r3", 1),
                                                                    ("r4", 1)]
    scheduler.observe_step(1.0)  # a fast machine: the budget would let the prefill take the whole cap
    _advance(scheduled)
    for _ in range(3):
        scheduled = scheduler.schedule()
        # every stream a token, first; the prefill takes what they leave of the 12-token cap
        assert [(s.seq.request_id, s.num_new) for s in scheduled] == [("r1", 1), ("r2", 1), ("r3", 1), ("r4", 1),
                                                                        ("r0", 8)]
        scheduler.observe_step(1.0)
        _advance(scheduled)
        scheduler.check_integrity()


def test_without_a_target_a_prefill_takes_the_whole_token_budget() -> None:
    scheduler, long = _with_streams(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512), 4, 2000)
    scheduled = scheduler.schedule()
    assert {s.seq.request_id: s.num_new for s in scheduled}[long.request_id] == 508


Machine = Callable[[StepShape, int], float]


def _machine(per_step: float, per_decode: float, per_token: float, per_context: float = 0.0) -> Machine:
    """Synthetic step times: a fixed cost, per decode, per prefill token, and per prefill token per
    1,000 tokens of the prompt's context (attention)."""
    return lambda shape, context: (per_step + per_decode * shape.decodes + per_token * shape.prefill_tokens
                                   + per_context * shape.prefill_tokens * context / 1000)


def _run(scheduler: Scheduler, long: Sequence, machine: Machine, steps: int) -> list[int]:
    """Steps with synthetic step times; the long prompt's chunk of each step."""
    chunks = []
    for _ in range(steps):
        context = long.num_computed
        scheduled = scheduler.schedule()
        by_seq = {s.seq.request_id: s.num_new for s in scheduled}
        assert all(by_seq.get(f"r{i}") == 1 for i in range(8)), "a stream missed a step"
        chunks.append(by_seq.get(long.request_id, 0))
        scheduler.observe_step(machine(scheduler.last_shape, context))
        _advance(scheduled)
        scheduler.check_integrity()
    return chunks


def test_the_prefill_budget_adapts_to_the_measured_step_times() -> None:
    config = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=4096, target_step_ms=50.0, min_prefill_tokens=16)
    scheduler, long = _with_streams(config, 8, 50_000)
    # 20 ms a step, 0.5 ms a decode, 0.1 ms a prefill token: 50 ms leave (50 - 20 - 4) / 0.1 = 260 tokens.
    chunks = _run(scheduler, long, _machine(20.0, 0.5, 0.1), 40)
    assert chunks[:2] == [16, 32]  # an untried size is approached by doubling
    assert all(c <= 260 for c in chunks) and all(255 <= c <= 260 for c in chunks[-10:]), chunks
    # The machine gets 1.5x slower: (50 - 30 - 6) / 0.15 = 93 tokens, approached from above.
    chunks = _run(scheduler, long, _machine(30.0, 0.75, 0.15), 60)
    assert all(90 <= c <= 94 for c in chunks[-10:]), chunks


def test_chunks_shrink_as_the_prompts_context_grows() -> None:
    config = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=4096, target_step_ms=100.0, min_prefill_tokens=16)
    scheduler, long = _with_streams(config, 8, 200_000)
    machine = _machine(20.0, 0.5, 0.1, per_context=0.05)  # a token at context 10,000 costs 0.6 ms
    chunks = _run(scheduler, long, machine, 150)
    late = scheduler.step_budget.last if scheduler.step_budget else None
    assert late is not None and 95 <= late[1] <= 100.5  # the step stays at its target
    # at the end: 76 ms / (0.1 + 0.05 * context / 1000) per token
    context = long.num_computed - chunks[-1]
    assert abs(chunks[-1] - 76 / (0.1 + 0.05 * context / 1000)) <= 3 and chunks[-1] < max(chunks) / 2


def test_a_long_prompt_advances_every_step_when_the_decodes_alone_miss_the_target() -> None:
    config = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=4096, target_step_ms=10.0, min_prefill_tokens=24)
    scheduler, long = _with_streams(config, 8, 5000)
    chunks = _run(scheduler, long, _machine(20.0, 0.5, 0.1), 30)  # 24 ms of decodes alone > 10 ms
    assert all(c >= 24 for c in chunks)
    config = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=4096, target_step_ms=100.0, min_prefill_tokens=8)
    scheduler, long = _with_streams(config, 8, 20_000)
    chunks = _run(scheduler, long, _machine(200.0, 0.5, 0.1), 30)  # a loaded machine: 204 ms without prefill
    # at least a quarter of the target at the running ms per token (~230 ms / ~36 tokens): about 4 ms
    steps = [204 + 0.1 * c for c in chunks[-10:]]
    assert all(c >= 8 for c in chunks) and all(s - 204 <= 25 for s in steps)


def test_outputs_are_the_same_with_a_step_target(tiny_ckpt: Path) -> None:
    """Chunks chosen by the step-time budget (tiny ones at a 1 ms target) compute the same tokens."""
    prompts = [list(range(1000, 1300)), list(range(2000, 2010)), list(range(3000, 3040))]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    plain = LLM(tiny_ckpt, num_kv_blocks=128, max_num_batched_tokens=256)
    budgeted = LLM(tiny_ckpt, num_kv_blocks=128, max_num_batched_tokens=256, target_step_ms=1.0,
                   min_prefill_tokens=8, enable_prefix_caching=False)
    expected = [o.token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    assert [o.token_ids for o in budgeted.generate(prompts, params, use_tqdm=False)] == expected
    assert budgeted.engine is not None and budgeted.engine.scheduler.step_budget is not None
    assert budgeted.engine.scheduler.step_budget.steps > 300 // 256 + 12  # it was fed every step
    budgeted.engine.check_integrity()
