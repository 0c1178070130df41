"""MLA attention over the paged latent cache against a plain reference: each sequence's whole prompt
at once, keys and values expanded per head from the latents (kv_b_proj), causal SDPA. Steps mix
prefill chunks and decodes over block tables whose pages are out of order; decode contexts are
split into several partitions (small `PARTITION_TOKENS`) and into one."""

from __future__ import annotations

import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from cluster.errors import ConfigError
from cluster.model import torch_attention
from cluster.model.attention import MLAAttention, make_attention_backend
from cluster.model.attention_backend import AttentionMetadata, DecodeBatch, SeqSpan
from cluster.model.config import TextConfig, parse_text_config
from cluster.model.layers import Rope
from cluster.model.torch_attention import TorchAttention, plan_decode
from cluster.testing.presets import get_preset

BLOCK = 4
NUM_BLOCKS = 64


@pytest.fixture(scope="module")
def text() -> TextConfig:
    return parse_text_config(get_preset("tiny").text)


@pytest.fixture(scope="module")
def layer(text: TextConfig) -> MLAAttention:
    torch.manual_seed(0)
    attn = MLAAttention(text, Rope(text), TorchAttention())
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() > 1 else 1.0))
    return attn.eval().requires_grad_(False)


def reference(layer: MLAAttention, x: torch.Tensor) -> torch.Tensor:
    """x [L, H], one sequence from position 0 -> [L, H]: expanded keys and values, causal SDPA."""
    n = x.shape[0]
    pos = torch.arange(n)
    cos, sin = layer.rope.cos_sin(pos, x.dtype)
    q = layer.q_b_proj(layer.q_a_layernorm(layer.q_a_proj(x))).view(n, layer.heads, -1)
    q_nope, q_rot = q.split([layer.nope, layer.rope_dim], dim=-1)
    q = torch.cat([q_nope, layer.rope.apply(q_rot, cos, sin)], dim=-1) * layer.rope.query_scale(pos)[:, None, None]
    c, k_rot = layer.kv_a_proj_with_mqa(x).split([layer.kv_lora_rank, layer.rope_dim], dim=-1)
    k_rot = layer.rope.apply(k_rot[:, None, :], cos, sin).expand(-1, layer.heads, -1)  # [L, h, r]
    kv = layer.kv_b_proj(layer.kv_a_layernorm(c)).view(n, layer.heads, layer.nope + layer.v_dim)
    k_nope, v = kv.split([layer.nope, layer.v_dim], dim=-1)
    k = torch.cat([k_nope, k_rot], dim=-1)  # [L, h, qk]
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True,
                                         scale=layer.rope.softmax_scale)  # [h, L, v]
    return layer.o_proj(out.transpose(0, 1).reshape(n, -1))


@dataclass
class Seq:
    x: torch.Tensor  # [L, H] hidden states of every position it will have
    table: torch.Tensor  # [W] its blocks
    done: int = 0


def run_steps(layer: MLAAttention, seqs: list[Seq], steps: list[list[tuple[int, int]]]) -> list[torch.Tensor]:
    """Runs `steps` (each a list of (sequence, new tokens)) and returns each sequence's outputs in
    position order."""
    dtype = layer.kv_b_proj.weight.dtype
    cache = torch.zeros(NUM_BLOCKS, BLOCK, layer.kv_lora_rank + layer.rope_dim, dtype=dtype)
    outs: list[list[torch.Tensor]] = [[] for _ in seqs]
    width = max(s.table.shape[0] for s in seqs)
    for step in steps:
        rows, positions, spans, decode_ix = [], [], [], []
        for which, n in step:
            s = seqs[which]
            if n == 1:
                decode_ix.append(len(rows))
            else:
                spans.append(SeqSpan(len(rows), n, s.done + n, s.table))
            for p in range(s.done, s.done + n):
                rows.append(s.x[p])
                positions.append(p)
        owners = [which for which, n in step for _ in range(n)]
        pos = torch.tensor(positions)
        tables = torch.stack([F.pad(s.table, (0, width - s.table.shape[0])) for s in seqs])  # [S, W]
        slot_mapping = tables[torch.tensor(owners), pos // BLOCK] * BLOCK + pos % BLOCK
        decode = None
        if decode_ix:
            seq_ix = torch.tensor([owners[i] for i in decode_ix])
            lens = pos[decode_ix] + 1
            decode = DecodeBatch(torch.tensor(decode_ix), tables[seq_ix], lens, int(lens.max()))
        cos, sin = layer.rope.cos_sin(pos, dtype)
        meta = AttentionMetadata(pos, slot_mapping, tuple(spans), decode, cos, sin, layer.rope.query_scale(pos))
        y = layer(torch.stack(rows).to(dtype), meta, cache)
        at = 0
        for which, n in step:
            outs[which].append(y[at:at + n])
            seqs[which].done += n
            at += n
    return [torch.cat(o) for o in outs]


def _seqs(text: TextConfig, lengths: list[int], seed: int) -> list[Seq]:
    gen = torch.Generator().manual_seed(seed)
    pages = torch.randperm(NUM_BLOCKS, generator=gen)  # every sequence's pages out of order, disjoint
    out, used = [], 0
    for n in lengths:
        w = -(-n // BLOCK)
        out.append(Seq(torch.randn(n, text.hidden_size, generator=gen), pages[used:used + w]))
        used += w
    return out


@pytest.mark.parametrize("partition", [8, 512])
def test_mixed_steps_of_chunks_and_decodes_match_expanded_attention(
        layer: MLAAttention, text: TextConfig, partition: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_attention, "PARTITION_TOKENS", partition)
    seqs = _seqs(text, [41, 26, 11, 2], seed=partition)
    steps = [
        [(0, 12), (1, 6), (3, 1)],  # two first chunks and a one-token prompt
        [(3, 1), (0, 11), (1, 17)],  # a decode, a middle chunk, a last chunk
        [(1, 1), (3, 0), (2, 9), (0, 7)],  # decode, nothing, a whole prompt, a chunk
        [(2, 1), (1, 1), (0, 10)],
        [(0, 1), (1, 1), (2, 1)],  # decodes only: contexts of 41, 26 and 11
    ]
    steps = [[(w, n) for w, n in step if n] for step in steps]
    got = run_steps(layer, seqs, steps)
    for s, out in zip(seqs, got, strict=True):
        want = reference(layer, s.x[:s.done])
        torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)


def test_decode_of_one_long_and_many_short_contexts(layer: MLAAttention, text: TextConfig,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The varlen case: one context many partitions long among one-partition ones (and a one-token
    context), prefilled whole, then decoded together for two steps."""
    monkeypatch.setattr(torch_attention, "PARTITION_TOKENS", 16)
    seqs = _seqs(text, [120, 3, 18, 3, 7], seed=3)
    steps = [[(0, 118), (1, 1), (2, 16), (3, 1), (4, 5)], [(1, 1), (3, 1)],
             [(0, 1), (1, 1), (2, 1), (3, 1), (4, 1)], [(0, 1), (2, 1), (4, 1)]]
    got = run_steps(layer, seqs, steps)
    for s, out in zip(seqs, got, strict=True):
        torch.testing.assert_close(out, reference(layer, s.x[:s.done]), rtol=1e-4, atol=1e-5)


def test_bfloat16_stays_within_bf16_noise_of_the_fp32_reference(layer: MLAAttention, text: TextConfig,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_attention, "PARTITION_TOKENS", 8)
    seqs = _seqs(text, [40, 4], seed=5)
    half = copy.deepcopy(layer).to(torch.bfloat16)
    got = run_steps(half, seqs, [[(0, 10), (1, 3)], [(0, 29)], [(0, 1), (1, 1)]])  # the decodes split
    for s, out in zip(seqs, got, strict=True):
        want = reference(layer, s.x[:s.done])
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), want, rtol=5e-2, atol=5e-2 * float(want.abs().max()))


def test_decode_plan_of_mixed_lengths(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch_attention, "PARTITION_TOKENS", 16)
    gen = torch.Generator().manual_seed(0)
    lens = torch.tensor([1, 16, 17, 100])
    tables = torch.stack([torch.randperm(64, generator=gen)[:25] for _ in lens])  # [B, W]
    plan = plan_decode(DecodeBatch(torch.arange(4), tables, lens, 100), block_size=4)
    assert plan.owner is not None
    assert plan.owner.tolist() == [0, 1, 2, 2] + [3] * 7  # ceil(len / 16) partitions each
    assert plan.valid.sum(-1).flatten().tolist() == [1, 16, 16, 1] + [16] * 6 + [4]
    assert plan.blocks[10].tolist() == [int(tables[3, 24]), 0, 0, 0]  # the table padded past its 25 blocks
    assert plan.blocks[4].tolist() == tables[3, 0:4].tolist() and plan.blocks[3].tolist() == tables[2, 4:8].tolist()


def test_short_contexts_take_one_padded_partition() -> None:
    lens = torch.tensor([3, 9])
    tables = torch.tensor([[5, 0, 0], [7, 2, 1]])
    plan = plan_decode(DecodeBatch(torch.arange(2), tables, lens, 9), block_size=4)
    assert plan.owner is None and plan.blocks.tolist() == [[5, 0, 0], [7, 2, 1]]
    assert plan.valid.sum(-1).flatten().tolist() == [3, 9]


def test_equal_contexts_are_not_split(monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing to save by splitting when padding to the longest costs little."""
    monkeypatch.setattr(torch_attention, "PARTITION_TOKENS", 8)
    lens = torch.tensor([40, 37])
    tables = torch.arange(20).view(2, 10)
    plan = plan_decode(DecodeBatch(torch.arange(2), tables, lens, 40), block_size=4)
    assert plan.owner is None and plan.blocks.shape == (2, 10)


def test_unknown_backend_is_refused() -> None:
    assert isinstance(make_attention_backend("torch"), TorchAttention)
    with pytest.raises(ConfigError, match="unknown attention backend 'nope'"):
        make_attention_backend("nope")
