"""The grouped expert kernel against the per-expert loop, unquantized and fp8 (with and without
the dequantized cache), in fp32 and bf16; and that it is one grouped product per projection."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cluster.errors import ConfigError
from cluster.model.checkpoint import CheckpointReader
from cluster.model.routed_experts import DequantizedCache, RoutedExperts


def _batch(hidden_size: int, experts: list[int], tokens: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, generator=gen)  # [T, H]
    ids = torch.tensor(experts)[torch.randint(0, len(experts), (tokens, 4), generator=gen)]  # [T, K]
    ids[0, 0] = -1  # a slot another shard computes
    weights = torch.rand(tokens, 4, generator=gen)  # [T, K]
    return hidden, ids, weights


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_kernel_matches_the_loop_on_unquantized_experts(tiny_ckpt: Path, dtype: torch.dtype,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    reader = CheckpointReader(tiny_ckpt)
    text = reader.config.text
    held = [0, 2, 3, 5, 6]
    gate_up, down = reader.read_experts(1, held)
    grouped = RoutedExperts(text.n_routed_experts, held, gate_up.to(dtype), down.to(dtype))
    loop = RoutedExperts(text.n_routed_experts, held, gate_up.to(dtype), down.to(dtype), kernel="loop")
    calls: list[tuple[int, ...]] = []
    real = torch._grouped_mm

    def counting(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(b.shape))
        return real(a, b, offs=offs)

    monkeypatch.setattr(torch, "_grouped_mm", counting)
    # Experts 1, 4 and 7 are another shard's; 5 gets no token in this batch.
    hidden, ids, weights = _batch(text.hidden_size, [0, 1, 2, 3, 4, 6, 7], 9, seed=1)
    out = grouped(hidden.to(dtype), ids, weights)
    assert len(calls) == 2  # one grouped product for gate_up, one for down, whatever the experts hit
    want = loop(hidden.to(dtype), ids, weights)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out, want, rtol=tol, atol=tol)
    assert torch.equal(grouped.token_counts, loop.token_counts)
    # The hand-written sum of the held experts, independent of both kernels.
    x = hidden.double()
    expect = torch.zeros_like(x)
    for t in range(ids.shape[0]):
        for slot in range(ids.shape[1]):
            e = int(ids[t, slot])
            if e not in held:
                continue
            gu = gate_up[held.index(e)].to(dtype).double() @ x[t].to(dtype).double()
            g, u = gu.chunk(2)
            expect[t] += weights[t, slot].double() * (down[held.index(e)].to(dtype).double()
                                                      @ (torch.nn.functional.silu(g) * u))
    torch.testing.assert_close(out.double(), expect, rtol=5 * tol, atol=5 * tol)


@pytest.mark.parametrize("cache_bytes", [0, 10**9])
def test_grouped_kernel_matches_the_loop_on_fp8_experts(make_ckpt, cache_bytes: int) -> None:
    path = make_ckpt("fp8_block_per_expert_kernels", preset="tiny", seed=7, expert_layout="per_expert",
                     fp8="block", fp8_block=(24, 32))
    reader = CheckpointReader(path)
    text = reader.config.text
    gate_up, down = reader.read_experts(1, list(range(8)))
    cache = DequantizedCache(cache_bytes) if cache_bytes else None
    grouped = RoutedExperts(text.n_routed_experts, range(8), gate_up, down, torch.float32, cache, layer=1)
    loop = RoutedExperts(text.n_routed_experts, range(8), gate_up, down, torch.float32, kernel="loop")
    for seed, experts in enumerate(([0, 1, 2], [0, 1, 2, 5], [3, 4, 5, 6, 7])):  # misses, then hits and misses
        hidden, ids, weights = _batch(text.hidden_size, experts, 7, seed)
        torch.testing.assert_close(grouped(hidden, ids, weights), loop(hidden, ids, weights), rtol=1e-5, atol=1e-5)
        if cache is not None:
            cache.check_integrity()
    if cache is not None:
        assert cache.hits > 0 and cache.misses > 0


def test_an_unknown_kernel_is_refused_by_name(tiny_ckpt: Path) -> None:
    reader = CheckpointReader(tiny_ckpt)
    gate_up, down = reader.read_experts(1, [0])
    with pytest.raises(ConfigError, match="expert_kernel"):
        RoutedExperts(reader.config.text.n_routed_experts, [0], gate_up, down, kernel="triton")
