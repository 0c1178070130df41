"""Routed experts of one MoE layer, any subset of them, computed by a kernel chosen by name:
`grouped` (default) sorts the (token, expert) pairs by expert and runs one grouped product per
projection (`torch._grouped_mm`, on CPU and CUDA), `loop` runs one product per expert (the
reference the grouped kernel is tested against).

Unquantized experts are held as they were read. FP8 experts stay fp8 with their scales
(`Fp8Experts`) and each expert is dequantized into the compute dtype when a step routes tokens
to it; a cache of dequantized experts (`DequantizedCache`, one per shard across its layers, capped
in bytes; none by default) keeps the most recently used ones so hot experts are not dequantized
every step. The grouped kernel dequantizes just the experts a step hits, in one batched op; FP8
block scales (128 x 128) have no scaled grouped product in torch (`_scaled_grouped_mm` takes
row-wise scales only), so the product itself runs in the compute dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from cluster.errors import ConfigError
from cluster.model.fp8 import ExpertMatrices, Fp8Experts

CacheKey = tuple[int, int]  # (layer, local expert)
EXPERT_KERNELS = ("grouped", "loop")


class DequantizedCache:
    """Dequantized experts (gate_up [2I, H], down [H, I]) under a byte cap. A step walks the layers
    in order, so least-recently-used eviction would throw out each expert just before its next use
    whenever the working set exceeds the cap; instead an expert is let in over the cached one used
    least often, and only if it has been used more often: hot experts stay, whatever the cap."""

    def __init__(self, cap_bytes: int) -> None:
        if cap_bytes < 0:
            raise ConfigError(f"expert_cache_bytes must be >= 0, got {cap_bytes}")
        self.cap_bytes = cap_bytes
        self.nbytes = 0
        self.hits = self.misses = 0
        self._uses: dict[CacheKey, int] = {}
        self._entries: dict[CacheKey, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, expert: CacheKey) -> tuple[torch.Tensor, torch.Tensor] | None:
        self._uses[expert] = self._uses.get(expert, 0) + 1
        entry = self._entries.get(expert)
        if entry is None:
            self.misses += 1
        else:
            self.hits += 1
        return entry

    def put(self, expert: CacheKey, entry: tuple[torch.Tensor, torch.Tensor]) -> None:
        size = sum(t.nbytes for t in entry)
        if size > self.cap_bytes:
            return
        while self.nbytes + size > self.cap_bytes:
            victim = min(self._entries, key=lambda k: self._uses[k])
            if self._uses[victim] >= self._uses.get(expert, 0):
                return  # the newcomer is no hotter than anything cached
            self.nbytes -= sum(t.nbytes for t in self._entries.pop(victim))
        self._entries[expert] = entry
        self.nbytes += size

    def check_integrity(self) -> None:
        held = sum(t.nbytes for entry in self._entries.values() for t in entry)
        if held != self.nbytes or self.nbytes > self.cap_bytes:
            raise RuntimeError(f"dequantized cache holds {held} bytes, counts {self.nbytes}, cap {self.cap_bytes}")


class RoutedExperts(nn.Module):
    """Holds experts `expert_ids` (global ids) of one layer; computes only the (token, expert)
    pairs whose expert it holds and counts them per expert for load statistics."""

    global_to_local: torch.Tensor  # [num_experts] local index of a global expert id, -1 if not held
    token_counts: torch.Tensor  # [num_experts] (token, expert) pairs computed since the last reset

    def __init__(self, num_experts: int, expert_ids: Sequence[int], gate_up: ExpertMatrices,
                 down: ExpertMatrices, compute_dtype: torch.dtype | None = None,
                 cache: DequantizedCache | None = None, layer: int = 0, kernel: str = "grouped") -> None:
        super().__init__()
        if kernel not in EXPERT_KERNELS:
            raise ConfigError(f"expert_kernel must be one of {', '.join(EXPERT_KERNELS)}, got {kernel!r}")
        self.kernel = kernel
        sizes = (_count(gate_up), _count(down))
        if sizes != (len(expert_ids), len(expert_ids)):
            raise ValueError(f"{len(expert_ids)} expert ids but tensors for {sizes[0]}/{sizes[1]}")
        if isinstance(gate_up, Fp8Experts) != isinstance(down, Fp8Experts):
            raise ValueError("gate_up and down must both be fp8 or both unquantized")
        self.expert_ids = tuple(int(e) for e in expert_ids)
        self.fp8: tuple[Fp8Experts, Fp8Experts] | None = None
        if isinstance(gate_up, Fp8Experts) and isinstance(down, Fp8Experts):
            self.fp8 = (gate_up, down)
            if compute_dtype is None:
                raise ValueError("fp8 experts need the compute dtype to dequantize into")
            self.dtype = compute_dtype
        elif isinstance(gate_up, torch.Tensor) and isinstance(down, torch.Tensor):
            self.gate_up_proj = nn.Parameter(gate_up, requires_grad=False)  # [E, 2I, H]
            self.down_proj = nn.Parameter(down, requires_grad=False)  # [E, H, I]
            self.dtype = gate_up.dtype
        self.cache = cache  # shared by the shard's layers; None: dequantize at every use
        self.layer = layer
        local = torch.full((num_experts,), -1, dtype=torch.long)
        local[list(self.expert_ids)] = torch.arange(len(self.expert_ids))
        self.register_buffer("global_to_local", local, persistent=False)
        self.register_buffer("token_counts", torch.zeros(num_experts, dtype=torch.long), persistent=False)

    def weights(self, local: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(gate_up [2I, H], down [H, I]) of local expert `local` in the compute dtype."""
        if self.fp8 is None:
            return self.gate_up_proj[local], self.down_proj[local]
        cached = self.cache.get((self.layer, local)) if self.cache is not None else None
        if cached is not None:
            return cached
        gate_up, down = (m.dequantize(local, self.dtype) for m in self.fp8)
        if self.cache is not None:
            self.cache.put((self.layer, local), (gate_up, down))
        return gate_up, down

    def stacked(self, fp8: tuple[Fp8Experts, Fp8Experts], hit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fp8 local experts `hit` [e] as (gate_up [e, 2I, H], down [e, H, I]) in the compute dtype:
        the cached ones taken, the rest dequantized together in one batched op."""
        if self.cache is None:
            return fp8[0].dequantize_many(hit, self.dtype), fp8[1].dequantize_many(hit, self.dtype)
        ids = hit.tolist()
        entries = [self.cache.get((self.layer, e)) for e in ids]
        missing = [i for i, entry in enumerate(entries) if entry is None]
        if missing:
            need = hit[missing]
            gate_up, down = (m.dequantize_many(need, self.dtype) for m in fp8)  # [m, 2I, H], [m, H, I]
            for j, i in enumerate(missing):
                entries[i] = (gate_up[j], down[j])
                self.cache.put((self.layer, ids[i]), (gate_up[j].clone(), down[j].clone()))
        held = [entry for entry in entries if entry is not None]
        return torch.stack([g for g, _ in held]), torch.stack([d for _, d in held])

    def held(self) -> dict[str, int]:
        """Weight elements held per projection (scales not counted), for memory assertions."""
        if self.fp8 is None:
            return {n: p.numel() for n, p in self.named_parameters()}
        return {"gate_up_proj": self.fp8[0].weight.numel(), "down_proj": self.fp8[1].weight.numel()}

    def resident_bytes(self) -> int:
        """Bytes of this layer's expert weights and scales (the shared cache is the shard's)."""
        if self.fp8 is None:
            return sum(p.nbytes for p in self.parameters())
        return sum(m.nbytes for m in self.fp8)

    def graph_safe(self, every_slot: bool) -> bool:
        """Whether `forward(..., every_slot)` makes no host sync: the grouped kernel over every slot,
        without the dequantized cache (whose bookkeeping is on the host)."""
        return (every_slot and self.kernel == "grouped" and self.cache is None
                and _grouped_mm_supports(torch.empty(0, dtype=self.dtype, device=self.global_to_local.device)))

    def forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                every_slot: bool = False) -> torch.Tensor:
        """hidden [T, H], topk_ids/topk_weights [T, K] -> weighted sum over held experts [T, H].
        `every_slot`: every expert is held and no slot is -1 (the caller's promise), so no host sync."""
        if self.graph_safe(every_slot):
            return self._every_slot(hidden, topk_ids, topk_weights)
        t, k = topk_ids.shape
        flat = topk_ids.reshape(-1)  # [T*K]; -1 marks a slot another shard computes
        local = torch.where(flat >= 0, self.global_to_local[flat.clamp(min=0)], -1)
        held = (local >= 0).nonzero().squeeze(1)
        if held.numel() == 0:
            return torch.zeros_like(hidden)
        local = local[held]
        order = torch.argsort(local, stable=True)
        pairs = held[order]  # flat (token, k) indices grouped by expert
        counts = torch.bincount(local, minlength=len(self.expert_ids))  # [E_local]
        self.token_counts += torch.bincount(flat[held], minlength=self.token_counts.shape[0])
        x_sorted = hidden[pairs // k]  # [P, H], grouped by expert
        if self.kernel == "grouped" and _grouped_mm_supports(x_sorted):
            y_sorted = self._grouped(x_sorted, counts)
        else:
            y_sorted = self._loop(x_sorted, counts.tolist())
        y_sorted *= topk_weights.reshape(-1)[pairs, None].to(y_sorted.dtype)
        # Scatter back per (token, k) pair, then sum over k: one reduction instead of an
        # index_add per expert.
        per_pair = hidden.new_zeros(t * k, hidden.shape[1])
        per_pair[pairs] = y_sorted
        return per_pair.view(t, k, -1).sum(1)


    def _every_slot(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
        """`forward` when every slot is ours, with shapes fixed by the batch alone and no host sync
        (no nonzero, no bincount, whose CUDA kernels read their sizes back): capturable."""
        t, k = topk_ids.shape
        local = self.global_to_local[topk_ids.reshape(-1)]  # [P = T*K]
        pairs = torch.argsort(local, stable=True)  # [P] flat (token, k) indices grouped by expert
        ones = torch.ones_like(local)
        counts = torch.zeros(len(self.expert_ids), dtype=torch.long, device=local.device).index_add_(0, local, ones)
        self.token_counts.index_add_(0, topk_ids.reshape(-1), ones)
        x_sorted = hidden[pairs // k]  # [P, H]
        gate_up: torch.Tensor
        down: torch.Tensor
        if self.fp8 is None:
            gate_up, down, sizes = self.gate_up_proj, self.down_proj, counts
        else:
            hit, sizes = _distinct(local[pairs], counts)  # [M] each; M = min(E, P), unused ones empty
            gate_up, down = (m.dequantize_many(hit, self.dtype) for m in self.fp8)
        y_sorted = self._grouped_by(x_sorted, gate_up, down, sizes)
        y_sorted *= topk_weights.reshape(-1)[pairs, None].to(y_sorted.dtype)
        per_pair = torch.empty_like(y_sorted).index_copy_(0, pairs, y_sorted)  # [P, H] back in (token, k) order
        return per_pair.view(t, k, -1).sum(1)

    def _grouped_by(self, x_sorted: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor,
                    sizes: torch.Tensor) -> torch.Tensor:
        """x_sorted [P, H] in groups of `sizes` [e] rows, gate_up [e, 2I, H], down [e, H, I] -> [P, H]."""
        offs = torch.cumsum(sizes, 0).to(torch.int32)  # [e] end row of each group
        h = torch._grouped_mm(x_sorted, gate_up.transpose(1, 2), offs=offs)  # [P, 2I]
        gate, up = h.chunk(2, dim=-1)
        return torch._grouped_mm(F.silu(gate) * up, down.transpose(1, 2), offs=offs)  # [P, H]

    def _grouped(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x_sorted [P, H] grouped by local expert, counts [E_local] -> [P, H]: one grouped product
        per projection. Unquantized experts are used in place (empty groups cost nothing); fp8
        ones are dequantized for the hit experts only."""
        gate_up: torch.Tensor
        down: torch.Tensor
        if self.fp8 is None:
            gate_up, down, sizes = self.gate_up_proj, self.down_proj, counts
        else:
            hit = counts.nonzero().squeeze(1)  # [e]
            gate_up, down = self.stacked(self.fp8, hit)
            sizes = counts[hit]
        return self._grouped_by(x_sorted, gate_up, down, sizes)

    def _loop(self, x_sorted: torch.Tensor, counts: list[int]) -> torch.Tensor:
        """The per-expert reference: one product per projection and expert."""
        y_sorted = torch.empty_like(x_sorted)
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            w_gate_up, w_down = self.weights(e)
            gate, up = F.linear(x_sorted[start:start + n], w_gate_up).chunk(2, dim=-1)  # [n, I]
            y_sorted[start:start + n] = F.linear(F.silu(gate) * up, w_down)  # [n, H]
            start += n
        return y_sorted


def _distinct(sorted_local: torch.Tensor, counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The experts a step hits, in a size fixed by the batch: sorted_local [P] (ascending local ids)
    and counts [E] -> (hit [M], sizes [M]) with M = min(E, P): the distinct ids in order, then
    expert 0 again with size 0 for the places left over (an empty group costs no product)."""
    p = sorted_local.shape[0]
    m = min(counts.shape[0], p)
    first = torch.ones(p, dtype=torch.bool, device=sorted_local.device)
    first[1:] = sorted_local[1:] != sorted_local[:-1]  # [P] the first pair of each expert
    slot = torch.cumsum(first, 0) - 1  # [P] the place of each pair's expert among the distinct ones
    hit = torch.zeros(m, dtype=torch.long, device=sorted_local.device).scatter_(0, slot, sorted_local)  # [M]
    used = torch.zeros(m, dtype=torch.bool, device=sorted_local.device).scatter_(0, slot, torch.ones_like(first))  # [M]
    return hit, torch.where(used, counts[hit], 0)


def _grouped_mm_supports(x: torch.Tensor) -> bool:
    """torch's grouped product runs float32 and bfloat16 on CPU; CUDA's takes bfloat16 (Hopper on)."""
    if x.device.type == "cpu":
        return x.dtype in (torch.float32, torch.bfloat16)
    return x.dtype == torch.bfloat16


def _count(m: ExpertMatrices) -> int:
    return m.num_experts if isinstance(m, Fp8Experts) else int(m.shape[0])
