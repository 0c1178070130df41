"""Routed experts of one MoE layer, any subset of them, computed as grouped matrix products."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class RoutedExperts(nn.Module):
    """Holds experts `expert_ids` (global ids) of one layer; computes only the (token, expert)
    pairs whose expert it holds and counts them per expert for load statistics."""

    def __init__(self, num_experts: int, expert_ids: Sequence[int], gate_up: torch.Tensor,
                 down: torch.Tensor) -> None:
        super().__init__()
        if gate_up.shape[0] != len(expert_ids) or down.shape[0] != len(expert_ids):
            raise ValueError(f"{len(expert_ids)} expert ids but tensors for {gate_up.shape[0]}/{down.shape[0]}")
        self.expert_ids = tuple(int(e) for e in expert_ids)
        self.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)  # [E, 2I, H]
        self.down_proj = nn.Parameter(down, requires_grad=False)  # [E, H, I]
        local = torch.full((num_experts,), -1, dtype=torch.long)
        local[list(self.expert_ids)] = torch.arange(len(self.expert_ids))
        self.register_buffer("global_to_local", local, persistent=False)
        self.register_buffer("token_counts", torch.zeros(num_experts, dtype=torch.long), persistent=False)

    def forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """hidden [T, H], topk_ids/topk_weights [T, K] -> weighted sum over held experts [T, H]."""
        t, k = topk_ids.shape
        out = torch.zeros_like(hidden)
        local = self.global_to_local[topk_ids.reshape(-1)]  # [T*K]
        held = (local >= 0).nonzero().squeeze(1)
        if held.numel() == 0:
            return out
        local = local[held]
        order = torch.argsort(local, stable=True)
        pairs = held[order]  # flat (token, k) indices grouped by expert
        counts = torch.bincount(local, minlength=len(self.expert_ids)).tolist()
        self.token_counts.index_add_(0, topk_ids.reshape(-1)[held], torch.ones_like(held))
        tokens = pairs // k
        weights = topk_weights.reshape(-1)[pairs]
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            tok = tokens[start:start + n]
            x = hidden[tok]  # [n, H]
            gate, up = F.linear(x, self.gate_up_proj[e]).chunk(2, dim=-1)  # [n, I] each
            y = F.linear(F.silu(gate) * up, self.down_proj[e])  # [n, H]
            out.index_add_(0, tok, y * weights[start:start + n, None].to(y.dtype))
            start += n
        return out
