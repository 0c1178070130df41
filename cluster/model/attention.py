"""Multi-head latent attention over a paged cache of compressed latents.

The cache holds, per token, the normed compressed kv (`kv_lora_rank`) and the rotated shared
rope key (`qk_rope_head_dim`): `[num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]` per
layer, never expanded keys and values. Queries are absorbed (W_UK multiplied into the nope part)
and outputs un-absorbed (W_UV) here; the softmax over the cache is an `AttentionBackend`'s, chosen
by name.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from cluster.errors import ConfigError
from cluster.model.attention_backend import AttentionBackend, AttentionMetadata, DecodeBatch, SeqSpan
from cluster.model.config import TextConfig
from cluster.model.layers import RMSNorm, Rope
from cluster.model.torch_attention import TorchAttention

__all__ = ["ATTENTION_BACKENDS", "AttentionMetadata", "DecodeBatch", "MLAAttention", "SeqSpan",
           "make_attention_backend"]


def _triton() -> AttentionBackend:
    from cluster.model.triton_attention import TritonAttention  # imports triton: only when asked for

    return TritonAttention()


ATTENTION_BACKENDS: dict[str, Callable[[], AttentionBackend]] = {"torch": TorchAttention, "triton": _triton}


def make_attention_backend(name: str) -> AttentionBackend:
    if name not in ATTENTION_BACKENDS:
        raise ConfigError(f"unknown attention backend {name!r}; known: {sorted(ATTENTION_BACKENDS)}")
    return ATTENTION_BACKENDS[name]()


class MLAAttention(nn.Module):
    def __init__(self, text: TextConfig, rope: Rope, backend: AttentionBackend) -> None:
        super().__init__()
        self.backend = backend
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
        cache.view(-1, cache.shape[-1])[meta.slot_mapping] = latent

        q = torch.cat([q_nope, q_rot], dim=-1) * meta.query_scale.to(q.dtype)[:, None, None]  # [T, h, qk]
        out = torch.empty(t, self.heads, self.v_dim, dtype=x.dtype, device=x.device)  # [T, h, v]
        rank, scale = self.kv_lora_rank, self.rope.softmax_scale
        if meta.decode is not None:
            rows = meta.decode.rows
            decode = partial(self.backend.decode, cache=cache, batch=meta.decode, kv_lora_rank=rank, scale=scale)
            out[rows] = self._latent(q[rows], decode)
        for span in meta.spans:
            chunk = slice(span.start, span.start + span.num_new)
            if span.context_len == span.num_new:  # a first chunk: nothing cached before it to expand
                out[chunk] = self._fresh(q[chunk], latent[chunk])
            else:
                prefill = partial(self.backend.prefill, cache=cache, span=span, kv_lora_rank=rank, scale=scale)
                out[chunk] = self._latent(q[chunk], prefill)
        return self.o_proj(out.reshape(t, self.heads * self.v_dim))

    def _latent(self, q: torch.Tensor, attend: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """q [n, h, qk] -> [n, h, v] through the backend in latent space: W_UK absorbed into the
        query, W_UV applied to the attended latents."""
        w = self.kv_b_proj.weight.view(self.heads, self.nope + self.v_dim, self.kv_lora_rank)
        w_uk, w_uv = w.split([self.nope, self.v_dim], dim=1)  # [h, nope, c], [h, v, c]
        q_nope, q_rot = q.split([self.nope, self.rope_dim], dim=-1)
        query = torch.cat([torch.einsum("thn,hnc->thc", q_nope, w_uk), q_rot], dim=-1)  # [n, h, c+r]
        return torch.einsum("thc,hvc->thv", attend(query), w_uv)  # [n, h, v]

    def _fresh(self, q: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """q [n, h, qk] of a sequence's first n tokens, their latents [n, c+r] -> [n, h, v]: keys and
        values expanded per head, which costs less than latent space for a chunk alone."""
        c, k_rot = latent.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        kv = self.kv_b_proj(c).view(-1, self.heads, self.nope + self.v_dim)  # [n, h, nope+v]
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rot[:, None, :].expand(-1, self.heads, -1)], dim=-1)  # [n, h, qk]
        return self.backend.prefill_fresh(q, k, v, self.rope.softmax_scale)
