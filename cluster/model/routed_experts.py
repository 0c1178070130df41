"""Routed experts of one MoE layer, any subset of them, computed as grouped matrix products."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class RoutedExperts(nn.Module):
    """Holds experts `expert_ids` (global ids) of one layer; computes only the (token, expert)
    pairs whose expert it holds and counts them per expert for load statistics."""

    global_to_local: torch.Tensor  # [num_experts] local index of a global expert id, -1 if not held
    token_counts: torch.Tensor  # [num_experts] (token, expert) pairs computed since the last reset

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
        flat = topk_ids.reshape(-1)  # [T*K]; -1 marks a slot another shard computes
        local = torch.where(flat >= 0, self.global_to_local[flat.clamp(min=0)], -1)
        held = (local >= 0).nonzero().squeeze(1)
        if held.numel() == 0:
            return torch.zeros_like(hidden)
        local = local[held]
        order = torch.argsort(local, stable=True)
        pairs = held[order]  # flat (token, k) indices grouped by expert
        counts = torch.bincount(local, minlength=len(self.expert_ids)).tolist()
        self.token_counts += torch.bincount(flat[held], minlength=self.token_counts.shape[0])
        x_sorted = hidden[pairs // k]  # [P, H], grouped by expert
        y_sorted = torch.empty_like(x_sorted)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            gate, up = F.linear(x_sorted[start:start + n], self.gate_up_proj[e]).chunk(2, dim=-1)  # [n, I]
            y_sorted[start:start + n] = F.linear(F.silu(gate) * up, self.down_proj[e])  # [n, H]
            start += n
        y_sorted *= topk_weights.reshape(-1)[pairs, None].to(y_sorted.dtype)
        # Scatter back per (token, k) pair, then sum over k: one reduction instead of an
        # index_add per expert.
        per_pair = hidden.new_zeros(t * k, hidden.shape[1])
        per_pair[pairs] = y_sorted
        return per_pair.view(t, k, -1).sum(1)
