"""Small building blocks shared by the text model: norm, dense MLP, rope."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cluster.model.config import TextConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: the dense layers and the shared experts."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Rope:
    """cos/sin tables from `transformers`' own Mistral4 rotary embedding (YaRN included), so
    frequencies and attention scaling are the reference's by construction."""

    def __init__(self, text: TextConfig) -> None:
        from transformers.models.mistral4.modeling_mistral4 import (
            Mistral4RotaryEmbedding,
            get_llama_4_attn_scale,
            yarn_apply_mscale,
        )

        hf = text.hf_config()
        self._rotary = Mistral4RotaryEmbedding(hf)
        self._llama4_scale = get_llama_4_attn_scale
        rope_params = hf.rope_parameters
        self.softmax_scale = yarn_apply_mscale(rope_params, text.qk_head_dim ** (-0.5))
        self.beta = rope_params.get("llama_4_scaling_beta")
        self.original_max = rope_params.get("original_max_position_embeddings")
        self.interleave = text.rope_interleave

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, rope_dim]."""
        probe = torch.empty(0, dtype=dtype)
        cos, sin = self._rotary(probe, positions[None, :])
        return cos[0], sin[0]

    def query_scale(self, positions: torch.Tensor) -> torch.Tensor:
        """The llama-4 query scaling per position, [T]; ones when the config has no beta."""
        if self.beta is None or self.original_max is None:
            return torch.ones(positions.shape, dtype=torch.float32)
        return self._llama4_scale(positions[None, :], self.beta, self.original_max)[0, 0, :, 0]

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [T, heads, r] rotated by cos/sin [T, r]; interleaved pairs come out de-interleaved,
        exactly as the reference lays them out."""
        if self.interleave:
            half = cos.shape[-1] // 2
            c, s = cos[:, None, :half], sin[:, None, :half]
            x1, x2 = x[..., 0::2], x[..., 1::2]
            return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)
        c, s = cos[:, None, :], sin[:, None, :]
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * c + rotated * s
