"""The routed experts' path without host syncs (one in-process shard holding every expert: what a
CUDA graph captures) against the general path, unquantized and fp8; its fixed-size list of the
experts a step hits; and the experts placed on the engine's device and dtype."""

from __future__ import annotations

import pytest
import torch

from cluster.experts.dispatchers import load_local_dispatcher
from cluster.model.checkpoint import CheckpointReader
from cluster.model.routed_experts import RoutedExperts, _distinct


def _batch(hidden_size: int, num_experts: int, tokens: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(tokens, hidden_size, generator=gen)  # [T, H]
    ids = torch.stack([torch.randperm(num_experts, generator=gen)[:4] for _ in range(tokens)])  # [T, K]
    return hidden, ids, torch.rand(tokens, 4, generator=gen)


def test_distinct_lists_each_hit_expert_once_in_a_fixed_size() -> None:
    local = torch.tensor([1, 1, 3, 3, 3, 6])  # sorted local ids of 6 pairs
    counts = torch.bincount(local, minlength=8)
    hit, sizes = _distinct(local, counts)
    assert hit.tolist() == [1, 3, 6, 0, 0, 0]  # min(8 experts, 6 pairs) places; the rest empty groups
    assert sizes.tolist() == [2, 3, 1, 0, 0, 0]
    hit, sizes = _distinct(torch.tensor([2, 2]), torch.bincount(torch.tensor([2, 2]), minlength=4))
    assert hit.tolist() == [2, 0] and sizes.tolist() == [2, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("fp8", [False, True])
def test_every_slot_path_matches_the_general_one(make_ckpt, dtype: torch.dtype, fp8: bool) -> None:
    path = make_ckpt("every_slot_fp8" if fp8 else "every_slot", preset="tiny", seed=3,
                     **({"fp8": "block", "fp8_block": (24, 32)} if fp8 else {}))
    reader = CheckpointReader(path)
    text = reader.config.text
    every = list(range(text.n_routed_experts))
    gate_up, down = reader.read_experts(1, every)
    if not fp8:
        gate_up, down = gate_up.to(dtype), down.to(dtype)
    experts = RoutedExperts(text.n_routed_experts, every, gate_up, down, dtype)
    general = RoutedExperts(text.n_routed_experts, every, gate_up, down, dtype)
    assert experts.graph_safe(every_slot=True) and not experts.graph_safe(every_slot=False)
    for tokens in (1, 3, 9):
        hidden, ids, weights = _batch(text.hidden_size, text.n_routed_experts, tokens, seed=tokens)
        got = experts(hidden.to(dtype), ids, weights, every_slot=True)
        want = general(hidden.to(dtype), ids, weights)
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # the same products in the same order
    assert torch.equal(experts.token_counts, general.token_counts)


def test_local_dispatcher_places_experts_on_the_engine_dtype(make_ckpt) -> None:
    fp8 = load_local_dispatcher(make_ckpt("every_slot_fp8", preset="tiny", seed=3, fp8="block", fp8_block=(24, 32)),
                                dtype=torch.bfloat16)
    plain = load_local_dispatcher(make_ckpt("every_slot", preset="tiny", seed=3), dtype=torch.bfloat16)
    layer = plain.shards[0].experts[0]
    assert layer.gate_up_proj.dtype == torch.bfloat16 and plain.graph_safe()
    fp8_layer = fp8.shards[0].experts[0]
    assert fp8_layer.fp8 is not None and fp8_layer.fp8[0].weight.dtype == torch.float8_e4m3fn  # stays fp8
    assert fp8_layer.dtype == torch.bfloat16
    hidden = torch.randn(5, fp8.shards[0].experts[0].fp8[0].weight.shape[2]).bfloat16()
    ids = torch.stack([torch.randperm(16)[:4] for _ in range(5)])
    out = fp8.dispatch(0, hidden, ids, torch.rand(5, 4))
    assert out.dtype == torch.bfloat16 and out.shape == hidden.shape
