"""Multi-head latent attention over a paged cache of compressed latents.

The cache holds, per token, the normed compressed kv (`kv_lora_rank`) and the rotated shared
rope key (`qk_rope_head_dim`): `[num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]` per
layer, never expanded keys and values.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from cluster.model.config import TextConfig
from cluster.model.layers import RMSNorm, Rope


@dataclass(frozen=True)
class SeqSpan:
    """One sequence's share of a step: its new tokens are rows [start, start + num_new) of the
    flat batch; they attend to the `context_slots` ([L], the last num_new being their own)."""

    start: int
    num_new: int
    context_slots: torch.Tensor  # [L] int64 cache slots
    causal_mask: torch.Tensor | None  # [num_new, L] bool, None when num_new == 1


@dataclass(frozen=True)
class DecodeBatch:
    """Sequences advancing by one token, attended together over padded contexts."""

    rows: torch.Tensor  # [B] their rows in the flat batch
    context_slots: torch.Tensor  # [B, Lmax] cache slots, padded with slot 0
    valid: torch.Tensor  # [B, 1, Lmax] bool, False on padding


@dataclass(frozen=True)
class AttentionMetadata:
    positions: torch.Tensor  # [T]
    slot_mapping: torch.Tensor  # [T] where each new token's latent is written
    spans: tuple[SeqSpan, ...]  # sequences with several new tokens (prefill chunks)
    decode: DecodeBatch | None
    cos: torch.Tensor  # [T, rope]
    sin: torch.Tensor  # [T, rope]
    query_scale: torch.Tensor  # [T]


class MLAAttention(nn.Module):
    def __init__(self, text: TextConfig, rope: Rope) -> None:
        super().__init__()
        h, heads = text.hidden_size, text.num_attention_heads
        self.heads = heads
        self.nope, self.rope_dim, self.v_dim = text.qk_nope_head_dim, text.qk_rope_head_dim, text.v_head_dim
        self.kv_lora_rank = text.kv_lora_rank
        self.rope = rope
        if text.q_lora_rank is None:
            self.q_proj = nn.Linear(h, heads * text.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(h, text.q_lora_rank, bias=text.attention_bias)
            self.q_a_layernorm = RMSNorm(text.q_lora_rank, 1e-6)
            self.q_b_proj = nn.Linear(text.q_lora_rank, heads * text.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(h, text.latent_dim, bias=text.attention_bias)
        # The reference builds both latent norms with the default eps, not rms_norm_eps.
        self.kv_a_layernorm = RMSNorm(text.kv_lora_rank, 1e-6)
        self.kv_b_proj = nn.Linear(text.kv_lora_rank, heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(heads * self.v_dim, h, bias=text.attention_bias)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata, cache: torch.Tensor) -> torch.Tensor:
        """x [T, H] -> [T, H]; writes the T new latents into `cache` [NB, BS, D] first."""
        t = x.shape[0]
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(t, self.heads, self.nope + self.rope_dim)  # [T, h, qk]
        q_nope, q_rot = q.split([self.nope, self.rope_dim], dim=-1)

        kv_pass, k_rot = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope_dim], dim=-1)
        q_rot = self.rope.apply(q_rot, meta.cos, meta.sin)
        k_rot = self.rope.apply(k_rot[:, None, :], meta.cos, meta.sin)[:, 0]  # [T, r]
        latent = torch.cat([self.kv_a_layernorm(kv_pass), k_rot], dim=-1)  # [T, D]
        flat_cache = cache.view(-1, cache.shape[-1])  # [NB*BS, D]
        flat_cache[meta.slot_mapping] = latent

        q = torch.cat([q_nope, q_rot], dim=-1) * meta.query_scale.to(q.dtype)[:, None, None]
        out = torch.empty(t, self.heads, self.v_dim, dtype=x.dtype)
        if meta.decode is not None:
            out[meta.decode.rows] = self._decode(q[meta.decode.rows], meta.decode, flat_cache)
        w_kv = self.kv_b_proj.weight
        for span in meta.spans:
            ctx = flat_cache[span.context_slots]  # [L, D]
            c, kr = ctx.split([self.kv_lora_rank, self.rope_dim], dim=-1)
            kv = F.linear(c, w_kv).view(-1, self.heads, self.nope + self.v_dim)  # [L, h, nope+v]
            k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
            k = torch.cat([k_nope, kr[:, None, :].expand(-1, self.heads, -1)], dim=-1)  # [L, h, qk]
            qs = q[span.start:span.start + span.num_new]  # [n, h, qk]
            o = F.scaled_dot_product_attention(
                qs.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                attn_mask=span.causal_mask, scale=self.rope.softmax_scale)  # [h, n, v]
            out[span.start:span.start + span.num_new] = o.transpose(0, 1)
        return self.o_proj(out.reshape(t, self.heads * self.v_dim))

    def _decode(self, q: torch.Tensor, batch: DecodeBatch, flat_cache: torch.Tensor) -> torch.Tensor:
        """One new token per sequence, attending in latent space: the key and value up-projections
        are absorbed into the query and the output, so contexts are never expanded per head."""
        w = self.kv_b_proj.weight.view(self.heads, self.nope + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w.split([self.nope, self.v_dim], dim=1)  # [h, nope, c], [h, v, c]
        q_nope, q_rot = q.split([self.nope, self.rope_dim], dim=-1)  # [B, h, nope], [B, h, r]
        q_lat = torch.einsum("bhn,hnc->bhc", q_nope, w_uk)  # [B, h, c]
        query = torch.cat([q_lat, q_rot], dim=-1)  # [B, h, c+r]
        ctx = flat_cache[batch.context_slots]  # [B, L, c+r]
        # Plain batched matmuls: SDPA over a head-broadcast latent key falls back to a slow path.
        scores = torch.bmm(query, ctx.transpose(1, 2)) * self.rope.softmax_scale  # [B, h, L]
        scores = scores.masked_fill(~batch.valid, float("-inf"))
        probs = scores.softmax(dim=-1, dtype=torch.float32).to(query.dtype)
        o_lat = torch.bmm(probs, ctx[..., :self.kv_lora_rank])  # [B, h, c]
        return torch.einsum("bhc,hvc->bhv", o_lat, w_uv)  # [B, h, v]
