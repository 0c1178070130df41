"""FP8 (e4m3fn) weights and their scales, dequantized as transformers does
(`_dequantize_fp8_weight` in transformers/integrations/finegrained_fp8.py): each weight is its fp8
value times its block's scale, the product taken in the compute dtype. Block (i, j) of a grid covers
rows [i*b0, (i+1)*b0) and columns [j*b1, (j+1)*b1); edge blocks are partial (ceil division), and a
grid may carry more rows than ceil(N / b0) (transformers keeps two for a fused gate_up of one block).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8 = torch.float8_e4m3fn
_VALUES: dict[tuple[torch.dtype, torch.device], torch.Tensor] = {}


def _values(dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The value of every e4m3fn byte in `dtype` [256] (exact: e4m3 values fit fp32, bf16 and fp16)."""
    key = (dtype, device)
    if key not in _VALUES:
        _VALUES[key] = torch.arange(256, dtype=torch.uint8, device=device).view(FP8).to(dtype)
    return _VALUES[key]


def to_dtype(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """e4m3fn -> `dtype`, equal to `weight.to(dtype)`; on CPUs a table lookup, which is faster."""
    if weight.device.type != "cpu":
        return weight.to(dtype)
    return _values(dtype, weight.device)[weight.view(torch.uint8).long()]


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] | None,
               dtype: torch.dtype) -> torch.Tensor:
    """weight [..., N, K] e4m3fn with scale_inv [..., ceil(N/b0)+, ceil(K/b1)] (block) or one scale
    broadcast over it ([] or [..., 1, 1], per-tensor) -> [..., N, K] in `dtype`."""
    w = to_dtype(weight, dtype)
    scale = scale_inv.to(dtype)
    if block is None:
        return w.mul_(scale)
    rows, cols = w.shape[-2:]
    full, rem = divmod(cols, block[1])
    # Scales expanded over rows only; columns broadcast through a view of the weight, so no second
    # weight-sized tensor is made (as transformers does).
    scale = scale.repeat_interleave(block[0], dim=-2)[..., :rows, :]  # [..., N, ceil(K/b1)]
    w[..., : full * block[1]].unflatten(-1, (full, block[1])).mul_(scale[..., :full, None])
    if rem:
        w[..., full * block[1]:].mul_(scale[..., full:full + 1])
    return w


@dataclass(frozen=True)
class ScaleSegment:
    """Rows [start, stop) of every expert's matrix and their scales [E, r, c] (a block grid over
    just these rows, or [E, 1, 1] for one scale per expert)."""

    start: int
    stop: int
    scale_inv: torch.Tensor  # [E, r, c] float32


@dataclass(frozen=True)
class Fp8Experts:
    """One projection of several experts kept in fp8: weight [E, N, K] e4m3fn and its scales by
    row segment. A fused gate_up grid is one segment over all 2I rows (read over the fused matrix,
    as transformers' FP8 experts are); one tensor per expert gives a gate and an up segment."""

    weight: torch.Tensor  # [E, N, K] e4m3fn
    segments: tuple[ScaleSegment, ...]
    block: tuple[int, int] | None

    def dequantize(self, expert: int, dtype: torch.dtype) -> torch.Tensor:
        """Local expert `expert`'s matrix [N, K] in `dtype`."""
        parts = [dequantize(self.weight[expert, s.start:s.stop], s.scale_inv[expert], self.block, dtype)
                 for s in self.segments]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def dequantize_many(self, experts: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Local experts `experts` [e] as [e, N, K] in `dtype`, in one batched op per segment."""
        parts = [dequantize(self.weight[experts, s.start:s.stop], s.scale_inv[experts], self.block, dtype)
                 for s in self.segments]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    @property
    def num_experts(self) -> int:
        return int(self.weight.shape[0])

    @property
    def nbytes(self) -> int:
        """Resident bytes: the fp8 weight and every scale."""
        return self.weight.nbytes + sum(s.scale_inv.nbytes for s in self.segments)


ExpertMatrices = torch.Tensor | Fp8Experts  # [E, N, K] of several experts, unquantized or fp8
