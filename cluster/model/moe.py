"""The MoE block of a decoder layer: gate, top-k choice, dispatch, shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from cluster.model.config import TextConfig
from cluster.model.dispatch import Dispatcher
from cluster.model.layers import MLP


class MoEGate(nn.Module):
    """Mistral 4's gate (its checkpoint's `gate`): softmax scores, group-limited top-k, optional
    renormalisation."""

    def __init__(self, text: TextConfig) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(text.n_routed_experts, text.hidden_size))
        self.top_k = text.num_experts_per_tok
        self.n_group, self.topk_group = text.n_group, text.topk_group
        self.norm_topk_prob = text.norm_topk_prob
        self.routed_scaling_factor = text.routed_scaling_factor

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (topk_ids [T, K], topk_weights [T, K])."""
        t, e = x.shape[0], self.weight.shape[0]
        scores = F.linear(x, self.weight).softmax(-1)  # [T, E]
        group_scores = scores.view(t, self.n_group, e // self.n_group).topk(2, dim=-1)[0].sum(-1)  # [T, G]
        group_idx = torch.topk(group_scores, k=self.topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, -1, e // self.n_group).reshape(t, e)
        choice = scores.masked_fill(~score_mask.bool(), 0.0)
        topk_ids = torch.topk(choice, k=self.top_k, dim=-1, sorted=False)[1]  # [T, K]
        weights = scores.gather(1, topk_ids)
        if self.norm_topk_prob:
            weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
        return topk_ids, weights * self.routed_scaling_factor


class MoEBlock(nn.Module):
    def __init__(self, text: TextConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.gate = MoEGate(text)
        shared = text.moe_intermediate_size * text.n_shared_experts
        self.shared_experts = MLP(text.hidden_size, shared) if shared else None

    def forward(self, x: torch.Tensor, dispatcher: Dispatcher) -> torch.Tensor:
        topk_ids, topk_weights = self.gate(x)
        out = dispatcher.dispatch(self.layer, x, topk_ids, topk_weights)
        if self.shared_experts is not None:
            out = out + self.shared_experts(x)
        return out
