"""An expert shard: the routed experts its rank holds, for every MoE layer, read from disk
alone (no other tensor), computing partial sums for the tokens it is sent."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from cluster.experts.placement import ExpertPlacement
from cluster.model.fp8 import ExpertMatrices, Fp8Experts, ScaleSegment
from cluster.model.routed_experts import DequantizedCache, RoutedExperts
from cluster.model.weight_source import WeightSource


@dataclass(frozen=True)
class ShareOfLayer:
    """The rows of a step's batch that one rank computes, and which of their k slots."""

    rank: int
    rows: torch.Tensor  # [n] token rows
    topk_ids: torch.Tensor  # [n, K] expert ids, -1 where the slot belongs to another rank
    topk_weights: torch.Tensor  # [n, K]


def split_by_rank(placement: ExpertPlacement, layer: int, topk_ids: torch.Tensor,
                  topk_weights: torch.Tensor) -> list[ShareOfLayer]:
    """One share per rank (possibly empty): every (token, expert) pair goes to exactly one rank."""
    owner = placement.assign(layer, topk_ids)  # [T, K]
    shares = []
    for rank in range(placement.num_ranks):
        mine = owner == rank  # [T, K]
        rows = mine.any(dim=1).nonzero().flatten()
        ids = torch.where(mine, topk_ids, -1)[rows]
        shares.append(ShareOfLayer(rank, rows, ids, topk_weights[rows]))
    return shares


class ExpertShard:
    """`cache_bytes` caps the shard's cache of dequantized experts, over all its layers (FP8
    checkpoints; 0: every routed expert is dequantized when a step uses it). The experts live on
    `device` (the CPU by default) in `dtype` (the checkpoint's unquantized dtype by default);
    FP8 experts stay fp8 there, with their scales."""

    def __init__(self, reader: WeightSource, placement: ExpertPlacement, rank: int, cache_bytes: int = 0,
                 device: torch.device | None = None, dtype: torch.dtype | None = None) -> None:
        text = reader.config.text
        self.rank = rank
        self.device = torch.device(device or "cpu")
        self.dtype = dtype or reader.compute_dtype  # hidden states arrive and leave in it
        self.experts: dict[int, RoutedExperts] = {}
        self.cache = DequantizedCache(cache_bytes) if cache_bytes else None
        for layer in text.moe_layers:
            ids = placement.experts_of(rank, layer)
            if ids:
                gate_up, down = (_placed(m, self.device, self.dtype) for m in reader.read_experts(layer, ids))
                self.experts[layer] = RoutedExperts(text.n_routed_experts, ids, gate_up, down,
                                                    self.dtype, self.cache, layer).to(self.device)
        self.num_experts = text.n_routed_experts
        self.reads = list(reader.reads)

    def compute(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                topk_weights: torch.Tensor, every_slot: bool = False) -> torch.Tensor:
        """hidden [n, H], topk_ids [n, K] (-1 = not this rank's) -> partial sums [n, H].
        `every_slot`: the caller vouches that this shard holds every expert and no slot is -1 (one
        in-process shard), which takes the path without host syncs (CUDA graphs)."""
        experts = self.experts.get(layer)
        if experts is None or hidden.shape[0] == 0:
            return torch.zeros_like(hidden)
        return experts(hidden, topk_ids, topk_weights, every_slot=every_slot)

    def compute_moved(self, layer: int, hidden: torch.Tensor, topk_ids: torch.Tensor,
                      topk_weights: torch.Tensor) -> torch.Tensor:
        """`compute` for rows that arrive from elsewhere (a socket, a collective's buffer): moved to
        this shard's device and dtype, answered on the rows' device in their dtype."""
        out = self.compute(layer, hidden.to(self.device, self.dtype), topk_ids.to(self.device),
                           topk_weights.to(self.device))  # [n, H]
        return out.to(hidden.device, hidden.dtype)

    def graph_safe(self) -> bool:
        """Whether `compute(..., every_slot=True)` runs without host syncs (capturable in a CUDA graph)."""
        return all(e.graph_safe(every_slot=True) for e in self.experts.values())

    def token_counts(self) -> dict[int, torch.Tensor]:
        return {layer: e.token_counts.clone() for layer, e in self.experts.items()}

    def held(self) -> dict[str, int]:
        """Weight name -> element count (scales not counted), for memory assertions."""
        return {f"layers.{layer}.experts[{','.join(map(str, e.expert_ids))}].{n}": count
                for layer, e in self.experts.items() for n, count in e.held().items()}

    def resident_bytes(self) -> int:
        """Bytes of routed-expert state this shard keeps: weights, scales and dequantized caches."""
        cached = self.cache.nbytes if self.cache is not None else 0
        return sum(e.resident_bytes() for e in self.experts.values()) + cached


def _placed(m: ExpertMatrices, device: torch.device, dtype: torch.dtype) -> ExpertMatrices:
    """Experts on `device`: unquantized ones in `dtype`, fp8 ones as fp8 with their scales."""
    if isinstance(m, Fp8Experts):
        return Fp8Experts(m.weight.to(device), tuple(ScaleSegment(s.start, s.stop, s.scale_inv.to(device))
                                                     for s in m.segments), m.block)
    return m.to(device=device, dtype=dtype)
