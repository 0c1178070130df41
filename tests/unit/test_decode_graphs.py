"""Decode under CUDA graphs: the padded sizes, the static inputs and their padding rows on a scratch
block, which graph serves a batch, and (run eagerly on CPUs, `capture=False`) the same tokens as
plain decode with only the sampled tokens read back; the capture itself on CUDA (gpu)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.overrides import TorchFunctionMode

from cluster.engine.decode_graphs import DecodeSlots, capture_sizes, pack_decode, padded_size
from cluster.engine.sampler import sample
from cluster.engine.sampling_params import SamplingParams
from cluster.llm import LLM

GREEDY = SamplingParams(max_tokens=10, temperature=0.0)
PROMPTS = [[1, 5, 9, 22, 7], [1, 300, 301], [1, *range(40, 75)]]  # 3 decodes: the graph of 4


def test_capture_sizes_are_powers_of_two_up_to_max_num_seqs() -> None:
    assert capture_sizes(64) == (1, 2, 4, 8, 16, 32, 64)
    assert capture_sizes(48) == (1, 2, 4, 8, 16, 32, 48)
    assert capture_sizes(1) == (1,)
    sizes = capture_sizes(48)
    assert [padded_size(sizes, b) for b in (1, 2, 3, 5, 9, 33, 48)] == [1, 2, 4, 8, 16, 48, 48]
    assert padded_size(sizes, 49) is None


def test_packed_inputs_put_padding_rows_on_the_scratch_block() -> None:
    n, width, bs, scratch = 4, 5, 16, 99
    out = torch.full((n * (4 + width),), -7, dtype=torch.long)
    tables = torch.tensor([[3, 8], [4, 0]])  # two sequences, the second one block long
    pack_decode(out, n, width, torch.tensor([11, 12]), torch.tensor([20, 0]), tables, bs, scratch)
    view = DecodeSlots.of(out, n, width)
    assert view.input_ids.tolist() == [11, 12, 0, 0]
    assert view.positions.tolist() == [20, 0, 0, 0]
    assert view.slot_mapping.tolist() == [8 * bs + 4, 4 * bs, scratch * bs, scratch * bs]
    assert view.context_lens.tolist() == [21, 1, 1, 1]
    assert view.block_tables.tolist() == [[3, 8, 0, 0, 0], [4, 0, 0, 0, 0], [scratch, 0, 0, 0, 0],
                                          [scratch, 0, 0, 0, 0]]
    assert not (out == -7).any()  # every place written: nothing from an earlier step survives


def _emulated(llm: LLM) -> Any:
    """`llm`'s engine with decode graphs run eagerly (CPU): one more cache block as the scratch."""
    engine = llm.engine
    assert engine is not None
    blocks, bs = engine.limits.num_kv_blocks, engine.config.block_size
    engine.runner.allocate_caches(blocks + 1, bs)
    assert engine.runner.capture_decode_graphs(engine.config.max_num_seqs, engine.max_model_len, blocks,
                                               capture=False)
    return engine


def test_emulated_graphs_decode_the_same_tokens_and_touch_only_the_scratch_block(tiny_ckpt: Path) -> None:
    eager = LLM(tiny_ckpt, num_kv_blocks=32, max_num_seqs=8)
    want = [o.token_ids for o in eager.generate(PROMPTS, GREEDY, use_tqdm=False)]
    llm = LLM(tiny_ckpt, num_kv_blocks=32, max_num_seqs=8)
    engine = _emulated(llm)
    graphs = engine.runner.graphs
    assert graphs.sizes == (1, 2, 4, 8) and graphs.width == -(-engine.max_model_len // 16)
    got = [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert got == want
    assert graphs.replays[4] == GREEDY.max_tokens - 1  # every decode step of the 3 ran in the graph of 4
    assert graphs.replays[1] == graphs.replays[2] == graphs.replays[8] == 0
    scratch = engine.runner.caches[0][32]
    assert scratch[0].abs().sum() > 0 and scratch[1:].abs().sum() == 0  # padding rows: slot 0 of the scratch
    one = [o.token_ids for o in llm.generate(PROMPTS[:1], GREEDY, use_tqdm=False)]
    assert one == want[:1] and graphs.replays[1] == GREEDY.max_tokens - 1
    engine.blocks.check_integrity()


def test_a_batch_wider_than_the_graphs_runs_eagerly(tiny_ckpt: Path) -> None:
    llm = LLM(tiny_ckpt, num_kv_blocks=32, max_num_seqs=8)
    graphs = _emulated(llm).runner.graphs
    assert graphs.fits(8, graphs.width) and not graphs.fits(9, 1) and not graphs.fits(1, graphs.width + 1)


class _FakeGraph:
    """Stands in for torch.cuda.CUDAGraph on CPUs: records that a capture happened."""

    def __init__(self) -> None:
        self.captured = False

    def pool(self) -> str:
        return "pool"

    def replay(self) -> None:
        raise AssertionError("not replayed in this test")


def test_the_capture_sequence_runs_warmups_then_captures_each_size_largest_first(
        tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The capture path with torch.cuda's stream and graph API faked (its Python, not CUDA's)."""
    import contextlib

    pools: list[object] = []

    @contextlib.contextmanager
    def graph(g: _FakeGraph, pool: object = None) -> Any:
        pools.append(pool)
        yield
        g.captured = True

    class Stream:
        def wait_stream(self, other: object) -> None:
            pass

    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", Stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    llm = LLM(tiny_ckpt, num_kv_blocks=32, max_num_seqs=4)
    engine = llm.engine
    assert engine is not None
    runner = engine.runner
    seen: list[int] = []
    real = runner._static_decode
    monkeypatch.setattr(runner, "_static_decode", lambda slots: seen.append(slots.input_ids.shape[0]) or real(slots))
    monkeypatch.setattr(runner.model.attention, "graph_safe", True)  # the torch backend's plan, run here
    runner.allocate_caches(33, 16)
    assert runner.capture_decode_graphs(4, engine.max_model_len, 32, capture=True)
    assert seen == [4, 4, 4, 2, 2, 2, 1, 1, 1]  # two warm-ups and the capture, largest first
    assert pools == [None, "pool", "pool"]  # one memory pool for all
    assert all(g.captured for g, _ in runner.graphs.graphs.values())
    assert all(logits.shape == (n, engine.text.vocab_size) for n, (_, logits) in runner.graphs.graphs.items())


_READS = {"item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero", "numpy", "bincount",
          "unique"}


class _DeviceReads(TorchFunctionMode):
    """Counts the calls that read a tensor's values back to the host (a sync on a GPU)."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (),
                           kwargs: dict | None = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in _READS:
            self.reads.append(name)
        return func(*args, **(kwargs or {}))


def test_a_graph_decode_step_reads_back_only_its_tokens(tiny_ckpt: Path) -> None:
    """The step between its inputs' copy and its sampled tokens: the graph's forward (the triton
    kernel, interpreted here, and the in-process experts) and greedy sampling read nothing back
    but the tokens (`tolist`, once)."""
    pytest.importorskip("triton")
    llm = LLM(tiny_ckpt, num_kv_blocks=32, max_num_seqs=8, attention_backend="triton")
    engine = _emulated(llm)
    runner = engine.runner
    calls: list[list[str]] = []
    real = runner.graphs.forward

    def watched(slots: DecodeSlots) -> torch.Tensor:
        with _DeviceReads() as mode:
            logits = real(slots)
            sample(logits, [GREEDY] * logits.shape[0], [None] * logits.shape[0]).tolist()
        calls.append(mode.reads)
        return logits

    runner.graphs.forward = watched
    llm.generate(PROMPTS, SamplingParams(max_tokens=3, temperature=0.0), use_tqdm=False)
    assert calls and all(reads == ["tolist"] for reads in calls), calls


@pytest.mark.gpu
def test_captured_graphs_decode_as_eager_on_cuda(tiny_ckpt: Path) -> None:
    eager = LLM(tiny_ckpt, num_kv_blocks=64, max_num_seqs=8, device="cuda", dtype="bfloat16", enforce_eager=True)
    want = [o.token_ids for o in eager.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert eager.engine is not None and eager.engine.runner.graphs is None
    del eager
    llm = LLM(tiny_ckpt, num_kv_blocks=64, max_num_seqs=8, device="cuda", dtype="bfloat16")
    assert llm.engine is not None and llm.engine.runner.graphs is not None
    graphs = llm.engine.runner.graphs
    assert set(graphs.graphs) == {1, 2, 4, 8}
    got = [o.token_ids for o in llm.generate(PROMPTS, GREEDY, use_tqdm=False)]
    assert graphs.replays[4] > 0
    # bf16 on a GPU: the graph's attention splits differ from eager's, so allow a late divergence
    agree = sum(a == b for g, w in zip(got, want, strict=True) for a, b in zip(g, w, strict=True))
    assert agree >= 0.8 * sum(len(w) for w in want)


def test_a_refused_capture_leaves_decode_eager(tiny_ckpt: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse() -> None:
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "Stream", refuse)
    llm = LLM(tiny_ckpt, num_kv_blocks=32, max_num_seqs=4)
    runner = llm.engine.runner  # type: ignore[union-attr]
    monkeypatch.setattr(runner.model.attention, "graph_safe", True)
    runner.allocate_caches(33, 16)
    assert not runner.capture_decode_graphs(4, llm.engine.max_model_len, 32, capture=True)  # type: ignore[union-attr]
    assert runner.graphs is None
    assert len(llm.generate(PROMPTS[:2], GREEDY, use_tqdm=False)[1].token_ids) == GREEDY.max_tokens


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_an_eager_decode_step_reads_back_only_its_tokens(tiny_ckpt: Path, backend: str) -> None:
    """Without graphs too: once its inputs are sent, a decode step's forward (either attention
    backend, the in-process experts) and greedy sampling read back only the tokens."""
    if backend == "triton":
        pytest.importorskip("triton")
    llm = LLM(tiny_ckpt, num_kv_blocks=32, max_num_seqs=8, attention_backend=backend)
    runner = llm.engine.runner  # type: ignore[union-attr]
    calls: list[list[str]] = []
    real = runner.forward

    def watched(inputs: Any) -> torch.Tensor:
        decoding = inputs.meta.decode is not None and not inputs.meta.spans
        with _DeviceReads() as mode:
            logits = real(inputs)
            sample(logits, [GREEDY] * logits.shape[0], [None] * logits.shape[0]).tolist()
        if decoding:
            calls.append(mode.reads)
        return logits

    runner.forward = watched  # type: ignore[method-assign]
    llm.generate(PROMPTS, SamplingParams(max_tokens=3, temperature=0.0), use_tqdm=False)
    assert calls and all(reads == ["tolist"] for reads in calls), calls


def test_triton_kernel_with_max_model_len_as_longest_matches_the_exact_longest() -> None:
    """What a decode graph passes: splits shaped for max_model_len, most of them past every length."""
    pytest.importorskip("triton")
    from cluster.model import mla_triton

    gen = torch.Generator().manual_seed(4)
    cache = torch.randn(40, 16, 32 + 16, generator=gen)  # [NB, page, c+r]
    lens = torch.tensor([1, 37, 150])
    tables = torch.stack([torch.randperm(40, generator=gen)[:32] for _ in lens])  # [B, 32]: max_model_len 512
    query = torch.randn(3, 4, 48, generator=gen)
    exact = mla_triton.mla_decode(query, cache, tables, lens, 0.1, 32, longest=150)
    for b in (3, 4):  # the graph of 4 carries a padding row
        q, t, n = query, tables, lens
        if b == 4:
            q, t, n = torch.cat([query, query[:1]]), torch.cat([tables, tables[:1]]), torch.cat([lens, lens[:1]])
        bound = mla_triton.mla_decode(q, cache, t, n, 0.1, 32, longest=512)[:3]
        torch.testing.assert_close(bound, exact, rtol=1e-5, atol=1e-6)
