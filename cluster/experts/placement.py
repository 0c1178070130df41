"""Which expert shard ranks hold which routed experts, per MoE layer."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from cluster.errors import ConfigError
from cluster.model.config import TextConfig


@dataclass(frozen=True)
class ExpertPlacement:
    """`owners[layer][expert]` is the tuple of ranks holding a copy of that expert. An expert
    with several copies (a hot expert) has its tokens spread over them by token index."""

    num_ranks: int
    num_experts: int
    owners: dict[int, tuple[tuple[int, ...], ...]]

    @classmethod
    def contiguous(cls, moe_layers: Sequence[int], num_experts: int, num_ranks: int) -> ExpertPlacement:
        if num_ranks < 1:
            raise ConfigError(f"num_expert_shards must be >= 1, got {num_ranks}")
        if num_ranks > num_experts:
            raise ConfigError(f"num_expert_shards ({num_ranks}) exceeds the routed experts ({num_experts})")
        per = -(-num_experts // num_ranks)
        layer_owners = tuple((min(e // per, num_ranks - 1),) for e in range(num_experts))
        return cls(num_ranks, num_experts, {layer: layer_owners for layer in moe_layers})

    @classmethod
    def of_model(cls, text: TextConfig, num_ranks: int) -> ExpertPlacement:
        """The default placement of a model's routed experts over `num_ranks` shards (contiguous)."""
        return cls.contiguous(text.moe_layers, text.n_routed_experts, num_ranks)

    def with_copies(self, layer: int, expert: int, ranks: Sequence[int]) -> ExpertPlacement:
        """The same placement with `expert` of `layer` also held by `ranks` (redundant copies)."""
        owners = dict(self.owners)
        row = list(owners[layer])
        row[expert] = tuple(dict.fromkeys([*row[expert], *ranks]))
        owners[layer] = tuple(row)
        placement = ExpertPlacement(self.num_ranks, self.num_experts, owners)
        placement.check_integrity()
        return placement

    def experts_of(self, rank: int, layer: int) -> list[int]:
        return [e for e, ranks in enumerate(self.owners[layer]) if rank in ranks]

    def owner_table(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ranks [E, max_copies] (padded with -1) and copies [E]."""
        rows = self.owners[layer]
        width = max(len(r) for r in rows)
        table = torch.full((self.num_experts, width), -1, dtype=torch.long)
        for e, ranks in enumerate(rows):
            table[e, :len(ranks)] = torch.tensor(ranks)
        return table, torch.tensor([len(r) for r in rows])

    def assign(self, layer: int, topk_ids: torch.Tensor) -> torch.Tensor:
        """topk_ids [T, K] -> the rank computing each (token, expert) pair [T, K]."""
        table, copies = (t.to(topk_ids.device) for t in self.owner_table(layer))
        token = torch.arange(topk_ids.shape[0], device=topk_ids.device)[:, None]  # [T, 1]
        copy = token % copies[topk_ids]  # [T, K]
        return table[topk_ids, copy]

    def check_integrity(self) -> None:
        for layer, rows in self.owners.items():
            if len(rows) != self.num_experts:
                raise RuntimeError(f"layer {layer}: {len(rows)} experts placed, expected {self.num_experts}")
            for e, ranks in enumerate(rows):
                if not ranks:
                    raise RuntimeError(f"layer {layer} expert {e} has no rank")
                if any(not 0 <= r < self.num_ranks for r in ranks) or len(set(ranks)) != len(ranks):
                    raise RuntimeError(f"layer {layer} expert {e} has invalid ranks {ranks}")
